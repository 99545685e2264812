"""A small, independent writer of Megatron-LM's MMapIndexedDataset, struct-packed from the layout
documented in megatron/core/datasets/indexed_dataset.py (_IndexWriter, IndexedDatasetBuilder).
It shares no code with ampipe's writer or reader, so the reader is tested against the format,
not against itself."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

CODES = {"uint8": 1, "int8": 2, "int16": 3, "int32": 4, "int64": 5, "float64": 6, "float32": 7, "uint16": 8}


def write_megatron(prefix: Path, documents: list[list[list[int]]], dtype: str, *, modes: bool = False) -> None:
    """``documents``: each a list of sequences (sentences), each a list of token ids."""
    item = np.dtype(dtype).itemsize
    sizes, pointers, doc_idx = [], [], [0]
    ptr = 0
    with open(f"{prefix}.bin", "wb") as b:
        for doc in documents:
            for seq in doc:
                b.write(np.asarray(seq, dtype=dtype).tobytes())
                sizes.append(len(seq))
                pointers.append(ptr)
                ptr += len(seq) * item
            doc_idx.append(len(sizes))
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", CODES[dtype]))
        f.write(struct.pack("<Q", len(sizes)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(struct.pack(f"<{len(sizes)}i", *sizes))
        f.write(struct.pack(f"<{len(pointers)}q", *pointers))
        f.write(struct.pack(f"<{len(doc_idx)}q", *doc_idx))
        if modes:
            f.write(struct.pack(f"<{len(sizes)}b", *([0] * len(sizes))))
