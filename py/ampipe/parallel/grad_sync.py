"""Gradient reduction after backward: the global objective is the mean of the ranks' losses.

Dense parameters are replicated on every rank: their gradients are summed over the
data-parallel group and divided by its size. Expert parameters (``allreduce = False``) get,
through the all-to-all backward, the gradient contributions of every rank's tokens in the
EP group already; they are summed over the expert-data-parallel group (the replicas of the
same experts) and divided by the same data-parallel size, as Megatron-Core's DDP does
(``expert_gradient_scaling_factor = 1 / dp_size``). Gradients are flattened into one
buffer per group so each group costs one all-reduce.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .. import spans
from .groups import ParallelGroups

__all__ = ["sync_gradients", "is_expert_parameter"]


def is_expert_parameter(p: torch.Tensor) -> bool:
    return getattr(p, "allreduce", True) is False


def _reduce(grads: list[torch.Tensor], group, scale: float, issue: bool) -> None:
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    if issue:
        with spans.span("all_reduce", "comm", bytes=flat.numel() * flat.element_size()):
            dist.all_reduce(flat, group=group)
    if scale != 1.0:
        flat.mul_(scale)
    for g, r in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(r)


def sync_gradients(model: nn.Module, groups: ParallelGroups) -> None:
    """All-reduce ``.grad`` of every parameter that has one (missing grads count as zero)."""
    dense: list[torch.Tensor] = []
    expert: list[torch.Tensor] = []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:  # every rank must contribute the same tensors to the collective
            p.grad = torch.zeros_like(p)
        (expert if is_expert_parameter(p) else dense).append(p.grad)
    scale = 1.0 / groups.dp_size
    # Bucket by dtype: flattening needs one dtype per buffer.
    for dtype in sorted({g.dtype for g in dense}, key=str):
        _reduce([g for g in dense if g.dtype == dtype], groups.dp_group, scale, groups.dp_size > 1)
    for dtype in sorted({g.dtype for g in expert}, key=str):
        _reduce([g for g in expert if g.dtype == dtype], groups.expert_dp_group, scale, groups.expert_dp_size > 1)
