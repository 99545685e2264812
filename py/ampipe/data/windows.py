"""GPT-style training samples: windows of ``seq_length + 1`` tokens over a split's documents.

The split's documents are shuffled once (by ``seed``) and concatenated; window k is tokens
``[k * seq_length, k * seq_length + seq_length + 1)`` of that concatenation, so consecutive
windows share one token (the last input's label is the next window's first input), as in
Megatron's GPTDataset; ``num_samples = (tokens - 1) // seq_length``. Sample i is window
``perm_e[i % num_samples]`` where ``e = i // num_samples`` is its epoch and ``perm_e`` a
permutation seeded by (seed, e). So ``sample(i)`` depends on (dataset, split, seq_length, seed, i)
alone: a run resumed at step t re-reads exactly the samples it would have read.

The shuffles use ``numpy.random.RandomState``, whose streams numpy keeps frozen across versions
(as Megatron's dataset code does).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from ampipe.data.indexed import DatasetError, IndexedDataset
from ampipe.data.split import DEFAULT_SEED

_DOC_STREAM = 0
_EPOCH_STREAM = 1


class TokenWindows:
    """``sample(i) -> int64 [seq_length + 1]`` for any i >= 0; ``samples(indices) -> [n, seq_length + 1]``.

    Which samples form a step's global batch, and which of them a rank reads, is the training
    loop's layout (`ampipe.train.loop.sample_indices`, docs/train.md).

    ``split``: "train", "valid" or "all" (see :meth:`IndexedDataset.split_documents`;
    ``split_seed`` and ``valid_fraction`` matter only for a dataset without a sidecar, and
    ``split_origin`` records which split applied).
    """

    def __init__(self, data: IndexedDataset | str | os.PathLike[str], seq_length: int, *,
                 split: str = "train", seed: int = DEFAULT_SEED,
                 split_seed: int | None = None, valid_fraction: float | None = None):
        self.dataset = data if isinstance(data, IndexedDataset) else IndexedDataset(data)
        if not isinstance(seq_length, (int, np.integer)) or seq_length < 1:
            raise ValueError(f"seq_length: must be a positive integer, got {seq_length!r}")
        if not isinstance(seed, (int, np.integer)) or not 0 <= seed <= 0xFFFFFFFF:
            raise ValueError(f"seed: must be an integer in [0, 2**32 - 1], got {seed!r}")
        self.seq_length = int(seq_length)
        self.split = split
        self.seed = int(seed)
        docs = self.dataset.split_documents(split, seed=split_seed, valid_fraction=valid_fraction)
        self.split_origin = self.dataset.split_origin(seed=split_seed, valid_fraction=valid_fraction)
        self.documents = docs[np.random.RandomState([self.seed, _DOC_STREAM]).permutation(len(docs))]
        starts, stops = self.dataset.doc_token_ranges(self.documents)
        self._doc_start = starts
        self._cum = np.concatenate(([0], np.cumsum(stops - starts)))
        self.num_tokens = int(self._cum[-1])
        self.num_samples = max(0, (self.num_tokens - 1) // self.seq_length)
        if self.num_samples < 1:
            raise DatasetError(f"{self.dataset.prefix}: split {split!r} has {self.num_tokens} tokens in {len(docs)} documents, "
                               f"fewer than one window of seq_length + 1 = {self.seq_length + 1}")
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()

    def _epoch_order(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.RandomState([self.seed, _EPOCH_STREAM, epoch]).permutation(self.num_samples)
            self._perms[epoch] = perm
            if len(self._perms) > 2:
                self._perms.popitem(last=False)
        return perm

    def window(self, k: int) -> np.ndarray:
        """Window k of the concatenation, in order (no epoch shuffle): int64 [seq_length + 1]."""
        if not 0 <= k < self.num_samples:
            raise IndexError(f"window {k} out of range ({self.num_samples} windows)")
        pos, end = k * self.seq_length, k * self.seq_length + self.seq_length + 1
        out = np.empty(end - pos, dtype=np.int64)
        d = int(np.searchsorted(self._cum, pos, side="right")) - 1
        filled = 0
        while pos < end:
            take = min(end, int(self._cum[d + 1])) - pos
            a = int(self._doc_start[d]) + pos - int(self._cum[d])
            out[filled:filled + take] = self.dataset.tokens(a, a + take)
            filled += take
            pos += take
            d += 1
        return out

    def sample(self, i: int) -> np.ndarray:
        if not isinstance(i, (int, np.integer)) or i < 0:
            raise IndexError(f"sample index must be an integer >= 0, got {i!r}")
        epoch, r = divmod(int(i), self.num_samples)
        return self.window(int(self._epoch_order(epoch)[r]))

    def samples(self, indices: Sequence[int]) -> np.ndarray:
        """The samples at ``indices`` stacked: int64 [len(indices), seq_length + 1]."""
        return np.stack([self.sample(i) for i in indices]) if len(indices) else np.zeros((0, self.seq_length + 1), np.int64)

    def __len__(self) -> int:
        return self.num_samples

    def __repr__(self) -> str:
        return (f"TokenWindows({self.dataset.prefix!r}, split={self.split!r}, seq_length={self.seq_length}, "
                f"seed={self.seed}: {self.num_samples} samples per epoch)")
