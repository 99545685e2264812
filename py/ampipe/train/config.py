"""The `train` and `data` sections of the experiment config, in Python.

Field names, defaults and per-field checks come from the exported schema of
`src/config/schema.ts` (`ampipe.config_schema`, docs/contracts.md §1), so a Python-only user
gets the same defaults and field-named `ConfigError`s; the checks between fields are written
here with the schema's wording. Megatron-LM's flag names are used where one exists (``--lr``,
``--min-lr``, ``--clip-grad``, ``--adam-beta1`` ...).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..config_schema import ConfigError, check_fields, defaults

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


def _check_fields(cfg: Any, section: str) -> None:
    """Each field against the schema (types, ranges, choices); integral floats become ints."""
    names = [f.name for f in dataclasses.fields(cfg) if not f.name.startswith("_")]
    for name, v in check_fields(section, {n: getattr(cfg, n) for n in names}, cfg._prefix).items():
        setattr(cfg, name, v)


_T = defaults("train")
_DATA = defaults("data")


@dataclass
class TrainConfig:
    """Optimiser, schedule and loop settings (Megatron-LM's names)."""

    steps: int = _T["steps"]
    lr: float = _T["lr"]
    min_lr: float = _T["min_lr"]
    warmup_steps: int = _T["warmup_steps"]
    weight_decay: float = _T["weight_decay"]
    adam_beta1: float = _T["adam_beta1"]
    adam_beta2: float = _T["adam_beta2"]
    adam_eps: float = _T["adam_eps"]
    clip_grad: float = _T["clip_grad"]  # 0 = no clipping
    global_batch_size: int = _T["global_batch_size"]
    eval_interval: int = _T["eval_interval"]
    eval_iters: int = _T["eval_iters"]
    checkpoint_interval: int = _T["checkpoint_interval"]
    initial_loss_scale: float = _T["initial_loss_scale"]  # fp16 only: the dynamic loss scale's start
    _prefix: str = field(default="train", repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_fields(self, "train")
        p = self._prefix
        if self.min_lr > self.lr:
            raise ConfigError(f"{p}.min_lr", f"must be <= train.lr ({self.lr}); got {self.min_lr}")
        if self.warmup_steps > self.steps:
            raise ConfigError(f"{p}.warmup_steps", f"must be <= train.steps ({self.steps}); got {self.warmup_steps}")

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

    path: str | None = _DATA["path"]  # None = the default Brown dataset (built by `ampipe train` on first use)
    tokenizer: str = _DATA["tokenizer"]  # for the default dataset: byte | gpt2
    split: str = _DATA["split"]  # train,valid weights over documents (Megatron's --split; ampipe data prepare's default)
    seed: int = _DATA["seed"]  # the document split of a dataset that carries none
    _prefix: str = field(default="data", repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.split, str):  # Megatron's form, both weights > 0, said in its words
            parse_split(self.split, f"{self._prefix}.split")
        _check_fields(self, "data")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "DataConfig":
        return _from_dict(cls, d, "data")

    @property
    def valid_fraction(self) -> float:
        return parse_split(self.split, f"{self._prefix}.split")
