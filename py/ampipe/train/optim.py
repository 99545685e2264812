"""The optimiser side of a training step: AdamW parameter groups, the global gradient norm
over expert-sharded parameters, clipping, and fp16's dynamic loss scale.

With expert parallelism a rank holds only its experts, so neither `clip_grad_norm_` nor
`torch.amp.GradScaler` sees the whole model: the norm and the overflow check are reduced over
the ranks here, as Megatron-Core's optimizer does, so every rank clips by the same factor and
skips the same steps.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from ..parallel.grad_sync import is_expert_parameter
from ..parallel.groups import ParallelGroups
from .config import TrainConfig

__all__ = ["param_groups", "make_optimizer", "global_grad_norm", "clip_gradients", "DynamicLossScale"]


def _no_decay(name: str, p: torch.Tensor) -> bool:
    """Norm weights and biases (every parameter with fewer than two dims) take no weight decay."""
    return p.ndim < 2 or name.endswith(".bias")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if _no_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    # foreach=False: the single-tensor path gives bitwise the same update whatever the grouping.
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                             betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, foreach=False)


def _grads(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    dense, expert = [], []
    for p in model.parameters():
        if p.grad is not None:
            (expert if is_expert_parameter(p) else dense).append(p.grad)
    return dense, expert


def _sq_sum(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float32, device=device)
    for g in grads:
        total += g.detach().float().pow(2).sum()
    return total


def global_grad_norm(model: nn.Module, groups: ParallelGroups) -> float:
    """The L2 norm of the whole model's gradient, after `sync_gradients`.

    Dense gradients are equal on every rank (counted once); each EP rank holds other experts,
    so their squared sums are added over the expert-parallel group.
    """
    dense, expert = _grads(model)
    device = next(model.parameters()).device
    sq_expert = _sq_sum(expert, device)
    if groups.ep.active:
        dist.all_reduce(sq_expert, group=groups.ep.group)
    return math.sqrt(float(_sq_sum(dense, device) + sq_expert))


def clip_gradients(model: nn.Module, norm: float, max_norm: float) -> float:
    """Scales every gradient by min(1, max_norm / norm) (0 = no clipping); returns the factor."""
    if max_norm <= 0 or not math.isfinite(norm):
        return 1.0
    coef = max_norm / (norm + 1e-6)
    if coef >= 1.0:
        return 1.0
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(coef)
    return coef


class DynamicLossScale:
    """fp16's dynamic loss scale (Megatron's ``DynamicGradScaler``, without hysteresis).

    The loss is multiplied by `scale` before backward; `unscale_and_check` divides the gradients
    back and reports whether any rank saw inf/NaN, in which case the step is skipped and the scale
    halved. After `growth_interval` clean steps the scale doubles.
    """

    def __init__(self, initial: float, growth_interval: int = 1000, min_scale: float = 1.0):
        self.scale = float(initial)
        self.growth_interval = growth_interval
        self.min_scale = min_scale
        self.clean_steps = 0

    def unscale_and_check(self, model: nn.Module, groups: ParallelGroups) -> bool:
        """True when every rank's gradients are finite (then they are unscaled)."""
        dense, expert = _grads(model)
        device = next(model.parameters()).device
        bad = torch.zeros((), dtype=torch.float32, device=device)
        for g in dense + expert:
            bad = torch.maximum(bad, (~torch.isfinite(g)).any().float())
        if dist.is_available() and dist.is_initialized() and groups.world_size > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if float(bad) > 0:
            self.scale = max(self.min_scale, self.scale * 0.5)
            self.clean_steps = 0
            return False
        inv = 1.0 / self.scale
        for g in dense + expert:
            g.mul_(inv)
        self.clean_steps += 1
        if self.clean_steps % self.growth_interval == 0:
            self.scale *= 2.0
        return True

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps}

    def load_state_dict(self, sd: dict) -> None:
        self.scale = float(sd["scale"])
        self.clean_steps = int(sd["clean_steps"])
