"""Training data: Megatron-LM indexed datasets and GPT-style token windows (see docs/data.md)."""

from ampipe.data.indexed import DatasetError, IndexedDataset
from ampipe.data.split import DEFAULT_SEED, DEFAULT_VALID_FRACTION, split_documents
from ampipe.data.windows import TokenWindows

__all__ = ["DatasetError", "IndexedDataset", "TokenWindows", "split_documents", "DEFAULT_SEED", "DEFAULT_VALID_FRACTION"]
