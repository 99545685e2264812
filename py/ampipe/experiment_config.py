"""The whole experiment config, resolved in Python as TypeScript's `resolveConfig` does.

`resolve_config` fills every section's defaults and checks its fields from the shared schema
(`ampipe.config_schema`), runs the checks between fields (`ModelConfig`, `TrainConfig`,
`DataConfig`, and the ones across sections, in src/config/schema.ts's wording) and makes the
derived model fields concrete. test/ts/config/cross-language.test.ts holds the two languages to
the same result.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .config_schema import SECTIONS, ConfigError, resolve_section
from .model.config import ModelConfig, check_capacity_scope
from .train.config import DataConfig, TrainConfig
from .train.loop import micro_batches_per_rank

__all__ = ["resolve_config"]


def resolve_config(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The whole experiment config resolved as TypeScript's `resolveConfig` does: defaults
    filled, every field and the invariants between fields checked (a `ConfigError` naming the
    field), the derived model fields made concrete. The ``bench`` section's own cross-field
    rules are TypeScript's alone (Python never reads it); its fields are checked here."""
    config = {} if config is None else config
    if not isinstance(config, Mapping):
        raise ConfigError("config", f"expected a mapping, got {type(config).__name__}")
    unknown = sorted(k for k in config if k not in SECTIONS)
    if unknown:
        raise ConfigError(unknown[0], "unknown section (known: " + ", ".join(SECTIONS) + ")")
    out = {name: resolve_section(config, name) for name in SECTIONS}
    model = ModelConfig.from_dict(out["model"])
    par, pl = out["parallelism"], out["pipeline"]
    model.check_parallel(par["expert_model_parallel_size"], par["world_size"])
    if par["backend"] == "nccl" and par["device"] == "cpu":
        raise ConfigError("parallelism.backend", "nccl needs parallelism.device cuda (or auto); use gloo on cpu")
    train = TrainConfig.from_dict(out["train"])
    micro_batches_per_rank(train.global_batch_size, model.micro_batch_size, par["world_size"])
    DataConfig.from_dict(out["data"])
    check_capacity_scope(pl["capacity_scope"], model.moe_token_drop_policy)
    _check_degree_and_boundaries(pl, model.seq_length)
    out["model"] = model.to_dict()
    return out


def _check_degree_and_boundaries(pl: Mapping[str, Any], seq: int) -> None:
    """`pipeline.degree` and `pipeline.boundaries` against the sequence (src/config/schema.ts's wording)."""
    degree, b = pl["degree"], pl["boundaries"]
    if degree != "auto" and degree > seq:
        raise ConfigError("pipeline.degree", f"must be <= model.seq_length ({seq}); got {degree}")
    if b is None:
        return
    shown = ", ".join(map(str, b))
    if len(b) < 2:
        raise ConfigError("pipeline.boundaries", f"needs at least two entries [0, ..., {seq}]; got [{shown}]")
    if b[0] != 0 or b[-1] != seq:
        raise ConfigError("pipeline.boundaries", f"must start at 0 and end at model.seq_length ({seq}); got [{shown}]")
    bad = next((i for i in range(1, len(b)) if b[i] <= b[i - 1]), None)
    if bad is not None:
        raise ConfigError("pipeline.boundaries", f"must be strictly increasing; entry {bad} ({b[bad]}) is not "
                                                 f"greater than entry {bad - 1} ({b[bad - 1]})")
    if degree != "auto" and len(b) != degree + 1:
        raise ConfigError("pipeline.boundaries", f"must have pipeline.degree + 1 = {degree + 1} entries; got {len(b)}")
