"""Expert-parallel checkpoints and Megatron-Core expert naming.

ampipe's parameters have Megatron-Core's GPT names (docs/model.md). Experts are stored as
Megatron-Core's `GroupedMLP` (``mlp.experts.weight1`` [H, E_local*F1], ``weight2``
[E_local*F, H], memory read as [E_local, H, F1] and [E_local, F, H]). On EP rank r these
hold global experts ``[r*E_local, (r+1)*E_local)``; everything else is replicated.

- `shard_experts(global_sd, cfg, ep_rank, ep_size)`: a global (EP=1) state dict → rank's.
- `gather_experts(local_sd, cfg, ep)`: the inverse, an all-gather over the EP group.
- `grouped_to_sequential(sd, cfg)` / `sequential_to_grouped(sd, cfg)`: to and from Megatron-Core's
  per-expert names ``mlp.experts.local_experts.{i}.linear_fc1.weight`` [F1, H] and
  ``...linear_fc2.weight`` [H, F] (SequentialMLP; TEGroupedMLP's ``linear_fc1.weight{i}`` holds
  the same tensors).
"""

from __future__ import annotations

import re
from typing import Mapping

import torch
import torch.distributed as dist

from ..parallel.groups import ExpertParallel
from .config import ModelConfig

__all__ = ["shard_experts", "gather_experts", "grouped_to_sequential", "sequential_to_grouped", "is_expert_key"]

_EXPERT_KEY = re.compile(r"(.*\.mlp\.experts\.)(weight1|weight2|bias1|bias2)$")
_SEQ_KEY = re.compile(r"(.*\.mlp\.experts\.)local_experts\.(\d+)\.(linear_fc1|linear_fc2)\.(weight|bias)$")


def is_expert_key(key: str) -> bool:
    return _EXPERT_KEY.match(key) is not None


def _f1(cfg: ModelConfig) -> int:
    return cfg.moe_ffn_hidden_size * (2 if cfg.moe_expert_activation == "swiglu" else 1)


def _as_experts(name: str, t: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """[n_experts, ...] view of an expert tensor."""
    H, F, F1 = cfg.hidden_size, cfg.moe_ffn_hidden_size, _f1(cfg)
    if name == "weight1":
        return t.reshape(-1, H, F1)
    if name == "weight2":
        return t.reshape(-1, F, H)
    return t  # bias1 [n, F1], bias2 [n, H]


def _from_experts(name: str, t: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    n = t.shape[0]
    if name == "weight1":
        return t.reshape(cfg.hidden_size, n * _f1(cfg))
    if name == "weight2":
        return t.reshape(n * cfg.moe_ffn_hidden_size, cfg.hidden_size)
    return t


def shard_experts(global_sd: Mapping[str, torch.Tensor], cfg: ModelConfig, ep_rank: int, ep_size: int) -> dict:
    """The state dict of EP rank ``ep_rank`` from a global one (expert tensors sliced, rest shared)."""
    cfg.check_parallel(ep_size)
    El = cfg.num_experts // ep_size
    out = {}
    for key, t in global_sd.items():
        m = _EXPERT_KEY.match(key)
        if m is None:
            out[key] = t
            continue
        e = _as_experts(m.group(2), t, cfg)
        if e.shape[0] != cfg.num_experts:
            raise ValueError(f"{key}: holds {e.shape[0]} experts, expected model.num_experts={cfg.num_experts}")
        out[key] = _from_experts(m.group(2), e[ep_rank * El:(ep_rank + 1) * El].clone(), cfg)
    return out


def gather_experts(local_sd: Mapping[str, torch.Tensor], cfg: ModelConfig, ep: ExpertParallel) -> dict:
    """The global state dict from every EP rank's (collective over the EP group)."""
    out = {}
    for key, t in local_sd.items():
        m = _EXPERT_KEY.match(key)
        if m is None or not ep.active:
            out[key] = t
            continue
        e = _as_experts(m.group(2), t, cfg).contiguous()
        parts = [torch.empty_like(e) for _ in range(ep.size)]
        dist.all_gather(parts, e, group=ep.group)
        out[key] = _from_experts(m.group(2), torch.cat(parts), cfg)
    return out


def grouped_to_sequential(sd: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict:
    """GroupedMLP names → Megatron-Core SequentialMLP names (``local_experts.{i}.linear_fc{1,2}``)."""
    out = {}
    for key, t in sd.items():
        m = _EXPERT_KEY.match(key)
        if m is None:
            out[key] = t
            continue
        base, name = m.groups()
        e = _as_experts(name, t, cfg)
        fc, kind = {"weight1": ("linear_fc1", "weight"), "weight2": ("linear_fc2", "weight"),
                    "bias1": ("linear_fc1", "bias"), "bias2": ("linear_fc2", "bias")}[name]
        for i in range(e.shape[0]):
            out[f"{base}local_experts.{i}.{fc}.{kind}"] = e[i].t().contiguous() if kind == "weight" else e[i].clone()
    return out


def sequential_to_grouped(sd: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict:
    """Megatron-Core SequentialMLP expert names → GroupedMLP (``weight1``, ``weight2``, ...)."""
    out: dict = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for key, t in sd.items():
        m = _SEQ_KEY.match(key)
        if m is None:
            out[key] = t
            continue
        base, i, fc, kind = m.groups()
        name = {("linear_fc1", "weight"): "weight1", ("linear_fc2", "weight"): "weight2",
                ("linear_fc1", "bias"): "bias1", ("linear_fc2", "bias"): "bias2"}[(fc, kind)]
        experts.setdefault((base, name), {})[int(i)] = t.t() if kind == "weight" else t
    for (base, name), per in experts.items():
        if sorted(per) != list(range(len(per))):
            raise ValueError(f"{base}local_experts: expert indices {sorted(per)} are not 0..{len(per) - 1}")
        out[base + name] = _from_experts(name, torch.stack([per[i] for i in range(len(per))]).contiguous(), cfg)
    return out
