"""Expert-parallel dispatch and combine: the all-to-all that moves tokens to their experts.

On each rank the permute step (`ampipe.ops.permute`) has already laid the chunk's token
slots out in global expert order, so the rows for EP rank r (experts
``[r*E_local, (r+1)*E_local)``) are one contiguous run. Then:

- `dispatch_layout`: the split sizes. With a capacity every expert has exactly C rows and
  the layout is static (no communication). Otherwise (dropless, or a capacity over the
  whole sequence applied chunk by chunk) the ranks first exchange their per-expert counts
  (`exchange_counts`, a small all-to-all) and read them on the host (`layout_from_counts`),
  because `all_to_all_single` takes host split sizes. That one host read per dispatch is
  inherent to a variable layout.
- `dispatch`: all-to-all of the rows, then a local reorder from source-rank-major
  ``[src][local expert]`` to expert-major ``[local expert][src]``, so each local expert's
  rows are contiguous for the expert FFN.
- `combine`: the exact inverse (reorder back, all-to-all back).

With one EP rank no collective is issued: dispatch and combine return their input.
Both are differentiable (the backward of an all-to-all is the all-to-all with the split
sizes swapped), so the autograd graph runs through them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist

from .. import spans
from .groups import ExpertParallel

__all__ = ["DispatchLayout", "all_to_all", "start_all_to_all", "dispatch_layout", "static_layout",
           "exchange_counts", "layout_from_counts", "to_expert_major", "to_source_major", "dispatch", "combine"]


@dataclass(frozen=True)
class DispatchLayout:
    """Host-side split sizes of one dispatch (and of its combine)."""

    num_local_experts: int
    ep_size: int
    capacity: int | None
    send_splits: list[int]  # rows this rank sends to each EP rank (in buffer order)
    recv_splits: list[int]  # rows this rank receives from each EP rank
    recv_counts: list[list[int]]  # [src rank][local expert] rows received
    expert_counts: list[int]  # rows per local expert after the reorder (what the FFN sees)

    @property
    def num_send_rows(self) -> int:
        return sum(self.send_splits)

    @property
    def num_recv_rows(self) -> int:
        return sum(self.recv_splits)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> torch.Tensor:
        ctx.splits = (out_splits, in_splits)
        ctx.group = group
        x = x.contiguous()
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        with spans.span("all_to_all", "comm", bytes=x.numel() * x.element_size()):
            dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        grad = grad.contiguous()
        gin = grad.new_empty((sum(in_splits),) + tuple(grad.shape[1:]))
        with spans.span("all_to_all (backward)", "comm", bytes=grad.numel() * grad.element_size()):
            dist.all_to_all_single(gin, grad, in_splits, out_splits, group=ctx.group)
        return gin, None, None, None


def all_to_all(x: torch.Tensor, out_splits: Sequence[int], in_splits: Sequence[int], group: Any) -> torch.Tensor:
    """Differentiable `all_to_all_single` over dim 0 with host split sizes."""
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group)


def start_all_to_all(x: torch.Tensor, out_splits: Sequence[int], in_splits: Sequence[int],
                     ep: ExpertParallel, *, async_op: bool) -> tuple[torch.Tensor, Any]:
    """`all_to_all_single` of `x`'s rows, outside autograd (the pipelined block's comm ops
    differentiate their local parts and run the exchange and its transpose themselves):
    ``(output, work)``; with ``async_op`` the output's rows are there once ``work`` is done
    (``work`` None: done already). With one EP rank nothing travels: ``(x, None)``."""
    if not ep.active:
        return x, None
    x = x.detach().contiguous()
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    if async_op:
        return out, dist.all_to_all_single(out, x, list(out_splits), list(in_splits), group=ep.group, async_op=True)
    with spans.span("all_to_all", "comm", bytes=x.numel() * x.element_size()):
        dist.all_to_all_single(out, x, list(out_splits), list(in_splits), group=ep.group)
    return out, None


def static_layout(ep_size: int, num_experts: int, capacity: int) -> DispatchLayout:
    """A capacity layout: the buffer has E*C rows and every expert is given all C of them
    (unused rows are zero), so the shapes are static and nothing is exchanged or read."""
    R, El = ep_size, num_experts // ep_size
    per_rank = El * capacity
    return DispatchLayout(
        num_local_experts=El, ep_size=R, capacity=capacity,
        send_splits=[per_rank] * R, recv_splits=[per_rank] * R,
        recv_counts=[[capacity] * El for _ in range(R)],
        expert_counts=[R * capacity] * El,
    )


def exchange_counts(tokens_per_expert: torch.Tensor, ep: ExpertParallel, *,
                    async_op: bool = False) -> tuple[torch.Tensor, Any]:
    """The count exchange of a variable layout, on the device, nothing read: ``([2, E] int64,
    work)``, row 0 the rows this rank sends per global expert, row 1 the rows it receives
    (``[src * E_local + j]``: from rank ``src`` for its local expert ``j``), valid once
    ``work`` is done (None: at once). With EP > 1 a small all-to-all; with one rank both rows
    are the counts."""
    send = tokens_per_expert.to(torch.int64).contiguous()
    if not ep.active:
        return torch.stack([send, send]), None
    both = torch.empty((2, send.shape[0]), dtype=send.dtype, device=send.device)
    both[0].copy_(send)
    if async_op:
        return both, dist.all_to_all_single(both[1], send, group=ep.group, async_op=True)
    with spans.span("count exchange", "comm"):
        dist.all_to_all_single(both[1], send, group=ep.group)
    return both, None


def layout_from_counts(send: Sequence[int], recv: Sequence[int], ep_size: int,
                       num_experts: int) -> DispatchLayout:
    """The variable layout from the exchanged counts, on the host (`exchange_counts`)."""
    if len(send) != num_experts or len(recv) != num_experts:
        raise ValueError(f"dispatch layout: counts must have {num_experts} entries; "
                         f"got {len(send)} and {len(recv)}")
    R, El = ep_size, num_experts // ep_size
    send, recv = list(send), list(recv)
    if R == 1:
        return DispatchLayout(El, 1, None, [sum(send)], [sum(send)], [send], send)
    send_splits = [sum(send[r * El:(r + 1) * El]) for r in range(R)]
    recv_counts = [recv[s * El:(s + 1) * El] for s in range(R)]
    recv_splits = [sum(c) for c in recv_counts]
    expert_counts = [sum(recv_counts[s][j] for s in range(R)) for j in range(El)]
    return DispatchLayout(El, R, None, send_splits, recv_splits, recv_counts, expert_counts)


def dispatch_layout(tokens_per_expert: torch.Tensor, ep: ExpertParallel, num_experts: int,
                    capacity: int | None) -> DispatchLayout:
    """Split sizes for dispatching a permuted buffer: static with a `capacity`; otherwise the
    counts are exchanged and read on the host here (`all_to_all_single` takes host split
    sizes). `tokens_per_expert` [E] is the rows kept per global expert. The pipelined block
    splits this into its own ops (`exchange_counts` early, `layout_from_counts` at dispatch)."""
    if capacity is not None:
        return static_layout(ep.size, num_experts, capacity)
    if tokens_per_expert.shape != (num_experts,):
        raise ValueError(
            f"dispatch_layout: tokens_per_expert must have shape [{num_experts}]; got {list(tokens_per_expert.shape)}"
        )
    send, recv = exchange_counts(tokens_per_expert, ep)[0].tolist()
    return layout_from_counts(send, recv, ep.size, num_experts)


def to_expert_major(x: torch.Tensor, layout: DispatchLayout) -> torch.Tensor:
    """Received rows, source-rank-major ``[src][local expert]``, to expert-major
    ``[local expert][src]`` (each local expert's rows contiguous for its FFN)."""
    R, El = layout.ep_size, layout.num_local_experts
    if R == 1 or El == 1:
        return x
    if layout.capacity is not None:
        C = layout.capacity
        return x.view(R, El, C, -1).transpose(0, 1).reshape(R * El * C, -1)
    sizes = [layout.recv_counts[s][j] for s in range(R) for j in range(El)]
    pieces = torch.split(x, sizes)
    return torch.cat([pieces[s * El + j] for j in range(El) for s in range(R)])


def to_source_major(x: torch.Tensor, layout: DispatchLayout) -> torch.Tensor:
    """The inverse of `to_expert_major`: expert outputs back in the order they arrived."""
    R, El = layout.ep_size, layout.num_local_experts
    if R == 1 or El == 1:
        return x
    if layout.capacity is not None:
        C = layout.capacity
        return x.view(El, R, C, -1).transpose(0, 1).reshape(R * El * C, -1)
    sizes = [layout.recv_counts[s][j] for j in range(El) for s in range(R)]
    pieces = torch.split(x, sizes)
    return torch.cat([pieces[j * R + s] for s in range(R) for j in range(El)])


def dispatch(buffer: torch.Tensor, layout: DispatchLayout, ep: ExpertParallel) -> torch.Tensor:
    """Rows in global expert order → this rank's local experts' rows, expert-contiguous."""
    if buffer.shape[0] != layout.num_send_rows:
        raise ValueError(f"dispatch: buffer has {buffer.shape[0]} rows but the layout sends {layout.num_send_rows}")
    if not ep.active:
        return buffer
    recv = all_to_all(buffer, layout.recv_splits, layout.send_splits, ep.group)
    return to_expert_major(recv, layout)


def combine(expert_output: torch.Tensor, layout: DispatchLayout, ep: ExpertParallel) -> torch.Tensor:
    """Inverse of `dispatch`: expert outputs back to the source ranks, in global expert order."""
    if expert_output.shape[0] != layout.num_recv_rows:
        raise ValueError(
            f"combine: expert output has {expert_output.shape[0]} rows but the layout received {layout.num_recv_rows}"
        )
    if not ep.active:
        return expert_output
    back = to_source_major(expert_output, layout)
    return all_to_all(back, layout.send_splits, layout.recv_splits, ep.group)
