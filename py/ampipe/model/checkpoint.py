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
- `load_megatron_state_dict(model, source)` / `megatron_state_dict(model, experts=...)` /
  `save_megatron_checkpoint(model, path)`: a Megatron-Core GPT checkpoint (``torch.save``
  format, ``{"model": state_dict, ...}`` or a bare state dict) into and out of ampipe's
  `GPTModel`; unknown and missing keys are listed by name (the name table: docs/model.md).
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

import torch
import torch.distributed as dist

from ..parallel.groups import ExpertParallel
from .config import ModelConfig

__all__ = ["shard_experts", "gather_experts", "grouped_to_sequential", "sequential_to_grouped", "is_expert_key",
           "from_megatron_names", "load_megatron_state_dict", "megatron_state_dict",
           "save_megatron_checkpoint", "CheckpointKeyError", "MegatronLoadReport"]

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


# ---------------------------------------------------------------------------- Megatron-Core checkpoints

# Transformer Engine spec names for the same tensors (the fused layernorm-linear holds the norm).
_TE_RENAMES = [
    (re.compile(r"(.*)\.self_attention\.linear_qkv\.layer_norm_(weight|bias)$"), r"\1.input_layernorm.\2"),
    (re.compile(r"(.*)\.mlp\.linear_fc1\.layer_norm_(weight|bias)$"), r"\1.pre_mlp_layernorm.\2"),
    (re.compile(r"(.*\.mlp\.experts\.)linear_fc([12])\.(weight|bias)(\d+)$"), r"\1local_experts.\4.linear_fc\2.\3"),
]


class CheckpointKeyError(KeyError):
    """A checkpoint whose keys do not match the model: ``missing`` and ``unexpected`` name them."""

    def __init__(self, missing: list[str], unexpected: list[str], source: str = "checkpoint"):
        self.missing, self.unexpected = missing, unexpected
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {', '.join(missing)}")
        if unexpected:
            parts.append(f"unknown {len(unexpected)} key(s): {', '.join(unexpected)}")
        super().__init__(f"{source}: " + "; ".join(parts))

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


@dataclass
class MegatronLoadReport:
    """What `load_megatron_state_dict` did: keys loaded, ignored (``_extra_state``), and — when
    not strict — the model keys the checkpoint lacked and the checkpoint keys the model lacks."""

    loaded: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def from_megatron_names(sd: Mapping[str, Any], cfg: ModelConfig) -> tuple[dict, list[str]]:
    """A Megatron-Core GPT state dict in ampipe's names: ``_extra_state`` entries dropped
    (returned as the second value), Transformer Engine's fused-norm and grouped-expert names
    read as the local spec's, SequentialMLP experts merged into GroupedMLP tensors."""
    out, ignored = {}, []
    for key, t in sd.items():
        if key.endswith("._extra_state") or key == "_extra_state":
            ignored.append(key)
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{key}: holds a {type(t).__name__}, not a tensor")
        for pattern, repl in _TE_RENAMES:
            key = pattern.sub(repl, key)
        out[key] = t
    return sequential_to_grouped(out, cfg), ignored


def _read_checkpoint(source: Any, weights_only: bool) -> Mapping[str, Any]:
    if isinstance(source, (str, os.PathLike, io.IOBase)):
        try:
            obj = torch.load(source, map_location="cpu", weights_only=weights_only)
        except Exception as e:
            if weights_only and "weights_only" in str(e):
                raise ValueError(f"{source}: holds more than tensors (Megatron saves its args as a "
                                 f"Namespace); if you trust the file, pass weights_only=False") from e
            raise
    else:
        obj = source
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]  # Megatron's {"model": ..., "iteration": ..., "args": ...}
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint: expected a state dict, got {type(obj).__name__}")
    return obj


def load_megatron_state_dict(model: torch.nn.Module, source: Any, *, strict: bool = True,
                             weights_only: bool = True) -> MegatronLoadReport:
    """Load a Megatron-Core GPT checkpoint (a path, a file object or a mapping; global, i.e.
    every expert) into ampipe's `GPTModel`; an EP-sharded model takes its own experts.

    ``strict``: any missing or unknown key raises `CheckpointKeyError` naming each one, and
    nothing is loaded. Otherwise the matching keys are loaded and the report lists the rest.
    A shape mismatch always raises, naming the key."""
    cfg: ModelConfig = model.cfg
    sd, ignored = from_megatron_names(_read_checkpoint(source, weights_only), cfg)
    ep = getattr(model, "ep", None)
    if ep is not None and ep.size > 1:
        sd = shard_experts(sd, cfg, ep.rank, ep.size)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if strict and (missing or unexpected):
        raise CheckpointKeyError(missing, unexpected, str(source) if isinstance(source, (str, os.PathLike)) else "checkpoint")
    for k, t in sd.items():
        if k in own and tuple(t.shape) != tuple(own[k].shape):
            raise ValueError(f"{k}: the checkpoint has shape {list(t.shape)}, the model {list(own[k].shape)}")
    loadable = {k: t for k, t in sd.items() if k in own}
    model.load_state_dict(loadable, strict=False)
    return MegatronLoadReport(list(loadable), ignored, missing, unexpected)


def megatron_state_dict(model: torch.nn.Module,
                        experts: Literal["SequentialMLP", "GroupedMLP"] = "SequentialMLP") -> dict:
    """ampipe's `GPTModel` as a Megatron-Core (local spec) GPT state dict, every expert in it
    (collective over the EP group when the model is sharded)."""
    if experts not in ("SequentialMLP", "GroupedMLP"):
        raise ValueError(f"experts: must be SequentialMLP or GroupedMLP; got {experts!r}")
    cfg: ModelConfig = model.cfg
    sd = {k: t.detach() for k, t in model.state_dict().items()}
    ep = getattr(model, "ep", None)
    if ep is not None and ep.active:
        sd = gather_experts(sd, cfg, ep)
    return grouped_to_sequential(sd, cfg) if experts == "SequentialMLP" else sd


def save_megatron_checkpoint(model: torch.nn.Module, path: str | os.PathLike, *,
                             experts: Literal["SequentialMLP", "GroupedMLP"] = "SequentialMLP",
                             iteration: int = 0) -> None:
    """`megatron_state_dict` written as Megatron does (``{"model": ..., "checkpoint_version": 3.0,
    "iteration": ...}``, `torch.save`), atomically."""
    from ..atomic import write_bytes_atomic

    buf = io.BytesIO()
    torch.save({"model": megatron_state_dict(model, experts), "checkpoint_version": 3.0,
                "iteration": iteration}, buf)
    write_bytes_atomic(path, buf.getvalue())
