"""The expert-bias update of aux-loss-free balancing, once per training step (Megatron's
`finalize_model_grads._update_router_expert_bias` and `reset_model_temporary_tensors`).

A router with ``moe_router_enable_expert_bias`` holds ``expert_bias`` [E] (added to the
sigmoid scores when experts are chosen) and ``local_tokens_per_expert`` [E]: the slots each
expert kept, counted by every forward with grad enabled (the baseline block counts once, the
pipelined block sums its chunks' counts once, in its `aux_loss` op). After the step's
backward passes, `update_expert_bias` sums the counts over the data-parallel ranks and moves
each bias by ``rate`` towards balance: ``bias += rate * sign(mean(counts) - counts)``, then
zeroes the counts. Works on ampipe's GPT and on Megatron-Core models (duck-typed on the two
buffers); the rate is the router config's ``moe_router_bias_update_rate`` unless given.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["update_expert_bias"]


def _rate(module: nn.Module) -> float:
    cfg = getattr(module, "cfg", None) or getattr(module, "config", None)
    rate = getattr(cfg, "moe_router_bias_update_rate", None)
    if rate is None:
        raise ValueError(f"{type(module).__name__}: has an expert_bias but its config has no "
                         f"moe_router_bias_update_rate (pass rate=)")
    return float(rate)


@torch.no_grad()
def update_expert_bias(model: nn.Module, group: Any = None, rate: float | None = None) -> int:
    """Update every training router's ``expert_bias`` from its ``local_tokens_per_expert``
    summed over ``group`` (default: every rank, when torch.distributed is initialised; collective
    then: every rank must call it), and zero the counts of every router. Returns how many
    biases were updated."""
    routers, seen = [], set()
    for m in model.modules():
        bias = m.__dict__.get("_buffers", {}).get("expert_bias")
        counts = m.__dict__.get("_buffers", {}).get("local_tokens_per_expert")
        if bias is None or counts is None or id(bias) in seen:
            continue
        seen.add(id(bias))
        routers.append((m, bias, counts))
    updated = [(m, b, c) for m, b, c in routers if m.training and not getattr(m, "frozen_expert_bias", False)]
    if updated:
        counts = torch.stack([c.float() for _, _, c in updated])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(counts, group=group)
        offset = counts.mean(dim=-1, keepdim=True) - counts
        for (m, bias, _), off in zip(updated, torch.sign(offset)):
            bias.add_(off.to(bias.dtype) * (rate if rate is not None else _rate(m)))
    for _, _, c in routers:
        c.zero_()
    return len(updated)
