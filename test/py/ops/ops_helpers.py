"""Shared helpers of the dispatch/combine op tests (imported as `ops_helpers`).

``compiled`` is the loaded extension (``torch.ops.ampipe``). A missing or stale build is a
test FAILURE (set-up builds it); a build that was tried and failed on this machine (no
compiler) skips the compiled tests with the build's error, since ampipe then runs on the
reference by design.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ampipe.ops import paths, reference
from ampipe.ops.loader import load_extension

CUDA = torch.cuda.is_available()

# Device parameters: the CUDA ones carry the `cuda` mark (select with `pytest -m cuda`).
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="no CUDA device")]
    ),
]


def extension_or_skip() -> SimpleNamespace:
    state = load_extension()
    if not state.loaded:
        stamp = paths.read_stamp()
        if stamp is not None and stamp.get("ok") is False:
            pytest.skip(f"the extension failed to build here: {stamp.get('error')}")
        pytest.fail(f"the extension is not loaded ({state.reason}); run `python -m ampipe.ops.build`")
    ops = torch.ops.ampipe
    return SimpleNamespace(
        make_row_map=ops.make_row_map, permute=ops.permute, unpermute=ops.unpermute, cuda=state.cuda
    )


REFERENCE = SimpleNamespace(
    make_row_map=reference.make_row_map, permute=reference.permute, unpermute=reference.unpermute
)


def need_device_kernels(ext: SimpleNamespace, device: str) -> None:
    if device == "cuda" and not ext.cuda:
        pytest.fail("a CUDA device is present but the extension was built without CUDA kernels")


def random_indices(T: int, K: int, E: int, gen: torch.Generator, distinct: bool = True) -> torch.Tensor:
    """Top-k-like expert ids: distinct per token when possible, else with repeats."""
    if distinct and K <= E:
        return torch.rand(T, E, generator=gen).argsort(dim=1)[:, :K].contiguous()
    return torch.randint(0, E, (T, K), generator=gen)


def naive_row_map(indices: torch.Tensor, E: int, capacity: int | None):
    """Slot ranks by a plain loop in (k, t) order: the oracle for make_row_map."""
    T, K = indices.shape
    idx = indices.tolist()
    counts = [0] * E
    rank = [[0] * K for _ in range(T)]
    for k in range(K):
        for t in range(T):
            e = idx[t][k]
            rank[t][k] = counts[e]
            counts[e] += 1
    starts = [sum(counts[:e]) for e in range(E)]
    rows = [[0] * K for _ in range(T)]
    for t in range(T):
        for k in range(K):
            e, r = idx[t][k], rank[t][k]
            if capacity is None:
                rows[t][k] = starts[e] + r
            else:
                rows[t][k] = e * capacity + r if r < capacity else -1
    kept = counts if capacity is None else [min(c, capacity) for c in counts]
    return torch.tensor(rows, dtype=torch.long).view(T, K), torch.tensor(kept, dtype=torch.long)


def num_rows(T: int, K: int, E: int, capacity: int | None) -> int:
    return T * K if capacity is None else E * capacity


def forward_backward(impl, x, indices, gates, E, capacity, weight=None, seed=0):
    """Route, permute, scale the buffer (a stand-in expert), unpermute; grads of everything."""
    row_map, tpe = impl.make_row_map(indices, E, capacity)
    R = num_rows(x.shape[0], indices.shape[1], E, capacity)
    buffer = impl.permute(x, row_map, R)
    scaled = buffer * weight if weight is not None else buffer
    out = impl.unpermute(scaled, row_map, gates)
    gen = torch.Generator().manual_seed(seed)
    cot = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out)
    inputs = [t for t in (x, gates, scaled) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(out, inputs, cot, allow_unused=True) if out.numel() else []
    return row_map, tpe, buffer, out, list(grads)
