"""Pure-torch reference of the dispatch/combine ops (docs/contracts.md, section 3).

This is the specification the compiled kernels are tested against and the fallback used
wherever the extension is not built. Everything here is plain differentiable torch; no
hand-written derivatives.

Layout: ``x`` is ``[T, H]`` (one row per token), ``indices`` is ``[T, K]`` expert ids.
Slots are ranked inside an expert in ``(k, t)`` order: every token's first choice before
any second choice, then token order (GShard/Tutel priority), so with a capacity the
lowest-priority slots are the ones dropped.
"""

from __future__ import annotations

import torch

from .validate import check_make_row_map, check_permute, check_unpermute

__all__ = ["make_row_map", "permute", "unpermute"]


def _check_range(op: str, name: str, t: torch.Tensor, lo: int, hi: int, bounds: str) -> None:
    """Every entry of the [T, K] tensor ``t`` in [lo, hi), else IndexError naming the slot.

    On CUDA an asynchronous device-side assert instead, so the reference never forces a
    host synchronize in the middle of a block.
    """
    if t.numel() == 0:
        return
    bad = (t < lo) | (t >= hi)
    if t.device.type != "cpu":
        torch._assert_async(~bad.any(), f"ampipe.{op}: {name} entry out of range {bounds}")
        return
    if bool(bad.any()):
        i, k = (int(v) for v in bad.nonzero()[0])
        raise IndexError(f"ampipe.{op}: {name}[{i}, {k}] = {int(t[i, k])} is out of range {bounds}")


def _check_rows(op: str, row_map: torch.Tensor, num_rows: int) -> None:
    """Row map entries in [-1, num_rows) and no row shared by two slots (CPU)."""
    _check_range(op, "row_map", row_map, -1, num_rows, f"[-1, {num_rows})")
    if row_map.device.type != "cpu" or row_map.numel() == 0:
        return
    flat = row_map.reshape(-1)
    kept = flat[flat >= 0]
    if kept.numel() and int(torch.bincount(kept, minlength=1).max()) > 1:
        K = row_map.shape[1]
        row = int(torch.bincount(kept).argmax())
        a, b = (int(v) for v in (flat == row).nonzero().flatten()[:2])
        raise IndexError(
            f"ampipe.{op}: row_map[{b // K}, {b % K}] and row_map[{a // K}, {a % K}] both map to "
            f"row {row} (rows must be distinct, as make_row_map makes them)"
        )


def make_row_map(
    indices: torch.Tensor, num_experts: int, capacity: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Buffer row of every (token, choice) slot, and the rows each expert keeps.

    Returns ``(row_map [T, K] int64, tokens_per_expert [E] int64)``. Dropless
    (``capacity=None``): rows ``0..T*K-1``, expert ``e`` owns a contiguous run, experts in
    order. With capacity ``C``: expert ``e`` owns rows ``[e*C, (e+1)*C)`` and a slot ranked
    ``>= C`` inside its expert gets ``-1`` (dropped); ``tokens_per_expert`` counts kept rows.
    """
    check_make_row_map(indices, num_experts, capacity)
    T, K = indices.shape
    device = indices.device
    flat = indices.t().reshape(-1).long()  # (k, t) order: position p = k*T + t
    _check_range("make_row_map", "indices", indices, 0, num_experts, f"[0, num_experts={num_experts})")
    counts = torch.zeros(num_experts, dtype=torch.long, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    starts = torch.cumsum(counts, 0) - counts
    # A stable sort by expert keeps (k, t) order inside each expert; the position in the
    # sorted order minus the expert's start is the slot's rank inside its expert.
    sorted_e, order = torch.sort(flat, stable=True)
    rank = torch.empty_like(flat)
    rank[order] = torch.arange(flat.numel(), device=device) - starts[sorted_e]
    if capacity is None:
        rows = starts[flat] + rank
        tokens_per_expert = counts
    else:
        rows = torch.where(rank < capacity, flat * capacity + rank, torch.full_like(flat, -1))
        tokens_per_expert = counts.clamp(max=capacity)
    row_map = rows.view(K, T).t().contiguous()
    return row_map, tokens_per_expert


def _slots(row_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flattened (t, k) slots that are kept: their rows, their tokens, their flat slot ids."""
    T, K = row_map.shape
    rows = row_map.reshape(-1)
    keep = (rows >= 0).nonzero().squeeze(1)
    return rows[keep], keep // K, keep


def permute(x: torch.Tensor, row_map: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Copy token rows into an expert-contiguous ``[num_rows, H]`` buffer (unused rows zero)."""
    check_permute(x, row_map, num_rows)
    _check_rows("permute", row_map, num_rows)
    rows, tokens, _ = _slots(row_map)
    buffer = x.new_zeros(num_rows, x.shape[1])
    return buffer.index_copy(0, rows, x.index_select(0, tokens))


def unpermute(
    buffer: torch.Tensor, row_map: torch.Tensor, gates: torch.Tensor | None = None
) -> torch.Tensor:
    """Gate-weighted combine back to token order: ``out[t] = sum_k gates[t,k] * buffer[row_map[t,k]]``.

    Dropped slots (``row_map == -1``) contribute zero. ``gates=None`` sums with weight 1.
    """
    check_unpermute(buffer, row_map, gates)
    T, K = row_map.shape
    _check_rows("unpermute", row_map, buffer.shape[0])
    rows, tokens, slot = _slots(row_map)
    picked = buffer.index_select(0, rows)
    if gates is not None:
        picked = picked * gates.reshape(-1).index_select(0, slot).unsqueeze(1)
    out = buffer.new_zeros(T, buffer.shape[1])
    return out.index_add(0, tokens, picked)
