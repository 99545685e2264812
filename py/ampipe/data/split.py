"""The train/validation split by document, deterministic from a seed.

The same rule as src/data/split.ts (a test checks the two agree), so a dataset without our
sidecar -- one written by Megatron-LM's preprocess_data.py -- splits exactly as
``ampipe data prepare`` would have split it:

document j gets the key ``splitmix64((splitmix64(seed) + j) mod 2**64)``; documents are ordered
by (key, j); the first ``n_valid`` of that order are the validation split, where n_valid is 0
for fraction 0, else ``min(N - 1, max(1, floor(fraction * N + 0.5)))``.
Both lists are returned in ascending document order.
"""

from __future__ import annotations

import math

import numpy as np

DEFAULT_SEED = 1234
DEFAULT_VALID_FRACTION = 0.05

_M = (1 << 64) - 1


def splitmix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & _M
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M
    return z ^ (z >> 31)


def _splitmix64_array(x: np.ndarray) -> np.ndarray:
    # uint64 arithmetic wraps mod 2**64, as the masked integer version does.
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def valid_count(num_documents: int, fraction: float) -> int:
    if fraction == 0 or num_documents == 0:
        return 0
    return min(num_documents - 1, max(1, math.floor(fraction * num_documents + 0.5)))


def check_split_args(seed: int, fraction: float) -> None:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not 0 <= seed <= 0xFFFFFFFF:
        raise ValueError(f"split seed: must be an integer in [0, 2**32 - 1], got {seed!r}")
    if not (isinstance(fraction, (int, float)) and math.isfinite(fraction) and 0 <= fraction < 1):
        raise ValueError(f"valid_fraction: must be in [0, 1), got {fraction!r}")


def split_documents(num_documents: int, seed: int = DEFAULT_SEED,
                    fraction: float = DEFAULT_VALID_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """(train, valid) document ids, each ascending, as int64 arrays."""
    check_split_args(seed, fraction)
    j = np.arange(num_documents, dtype=np.uint64)
    with np.errstate(over="ignore"):
        keys = _splitmix64_array(np.uint64(splitmix64(int(seed))) + j)
    order = np.lexsort((j, keys))  # by key, then by j
    n = valid_count(num_documents, fraction)
    is_valid = np.zeros(num_documents, dtype=bool)
    is_valid[order[:n]] = True
    ids = np.arange(num_documents, dtype=np.int64)
    return ids[~is_valid], ids[is_valid]
