"""The `train` and `data` sections of the experiment config, mirrored in Python.

Field names, defaults and checks are those of `src/config/schema.ts` (docs/contracts.md §1),
so a Python-only user gets the same field-named `ConfigError`s. Megatron-LM's flag names are
used where one exists (``--lr``, ``--min-lr``, ``--clip-grad``, ``--adam-beta1`` ...).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..model.config import ConfigError

__all__ = ["TrainConfig", "DataConfig", "parse_split"]


def _from_dict(cls, d: Mapping[str, Any] | None, prefix: str):
    d = {} if d is None else d
    if not isinstance(d, Mapping):
        raise ConfigError(prefix, f"expected a mapping, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")}
    unknown = sorted(k for k in d if k not in known)
    if unknown:
        raise ConfigError(f"{prefix}.{unknown[0]}", "unknown field (known: " + ", ".join(sorted(known)) + ")")
    return cls(**dict(d))


def _positive_int(prefix: str, name: str, v: Any, minimum: int = 1) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(f"{prefix}.{name}", f"must be an integer >= {minimum}; got {v!r}")


def _number(prefix: str, name: str, v: Any, *, gt: float | None = None, ge: float | None = None,
            lt: float | None = None) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(f"{prefix}.{name}", f"must be a finite number; got {v!r}")
    if gt is not None and not v > gt:
        raise ConfigError(f"{prefix}.{name}", f"must be > {gt:g}; got {v}")
    if ge is not None and not v >= ge:
        raise ConfigError(f"{prefix}.{name}", f"must be >= {ge:g}; got {v}")
    if lt is not None and not v < lt:
        raise ConfigError(f"{prefix}.{name}", f"must be < {lt:g}; got {v}")
    return float(v)


@dataclass
class TrainConfig:
    """Optimiser, schedule and loop settings (Megatron-LM's names)."""

    steps: int = 200
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 10
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # 0 = no clipping
    global_batch_size: int = 8
    eval_interval: int = 50
    eval_iters: int = 4
    checkpoint_interval: int = 50
    initial_loss_scale: float = 65536.0  # fp16 only: the dynamic loss scale's start
    _prefix: str = field(default="train", repr=False, compare=False)

    def __post_init__(self) -> None:
        p = self._prefix
        for name in ("steps", "global_batch_size", "eval_interval", "eval_iters", "checkpoint_interval"):
            _positive_int(p, name, getattr(self, name))
        _positive_int(p, "warmup_steps", self.warmup_steps, minimum=0)
        _number(p, "lr", self.lr, gt=0)
        _number(p, "min_lr", self.min_lr, ge=0)
        if self.min_lr > self.lr:
            raise ConfigError(f"{p}.min_lr", f"must be <= train.lr ({self.lr}); got {self.min_lr}")
        if self.warmup_steps > self.steps:
            raise ConfigError(f"{p}.warmup_steps", f"must be <= train.steps ({self.steps}); got {self.warmup_steps}")
        _number(p, "weight_decay", self.weight_decay, ge=0)
        for name in ("adam_beta1", "adam_beta2"):
            _number(p, name, getattr(self, name), ge=0, lt=1)
        _number(p, "adam_eps", self.adam_eps, gt=0)
        _number(p, "clip_grad", self.clip_grad, ge=0)
        _number(p, "initial_loss_scale", self.initial_loss_scale, gt=0)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "TrainConfig":
        return _from_dict(cls, d, "train")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}

    def lr_at(self, step: int) -> float:
        """The learning rate of optimiser step `step` (0-based): linear warm-up from lr/warmup to
        lr over `warmup_steps`, then cosine decay to `min_lr` at the last step (Megatron's
        ``--lr-decay-style cosine`` with ``--lr-decay-iters = steps``)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        decay = max(1, self.steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / decay)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * t))


def parse_split(split: str, prefix: str = "data.split") -> float:
    """Megatron's ``--split`` weights ``"train,valid"`` (e.g. ``"98,2"``) → the validation fraction."""
    parts = [s.strip() for s in str(split).split(",")]
    try:
        weights = [float(s) for s in parts]
    except ValueError:
        raise ConfigError(prefix, f'expected "train,valid" weights such as "98,2"; got {split!r}') from None
    if len(weights) != 2 or any(not math.isfinite(w) or w < 0 for w in weights) or weights[0] <= 0 or weights[1] <= 0:
        raise ConfigError(prefix, f'expected two positive weights "train,valid" such as "98,2"; got {split!r}')
    return weights[1] / (weights[0] + weights[1])


@dataclass
class DataConfig:
    """Where the tokens come from: a Megatron indexed dataset prefix (``PREFIX.bin/.idx``)."""

    path: str | None = None  # None = the default Brown dataset (built by `ampipe train` on first use)
    tokenizer: str = "byte"  # for the default dataset: byte | gpt2
    split: str = "95,5"  # train,valid weights over documents (Megatron's --split; ampipe data prepare's default)
    seed: int = 1234  # the document split of a dataset that carries none
    _prefix: str = field(default="data", repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.path is not None and (not isinstance(self.path, str) or not self.path):
            raise ConfigError(f"{self._prefix}.path", f"must be a non-empty string or null; got {self.path!r}")
        if self.tokenizer not in ("byte", "gpt2"):
            raise ConfigError(f"{self._prefix}.tokenizer", f"must be one of byte, gpt2; got {self.tokenizer!r}")
        parse_split(self.split, f"{self._prefix}.split")
        _positive_int(self._prefix, "seed", self.seed, minimum=0)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "DataConfig":
        return _from_dict(cls, d, "data")

    @property
    def valid_fraction(self) -> float:
        return parse_split(self.split, f"{self._prefix}.split")
