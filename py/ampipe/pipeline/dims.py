"""A plan's block dims and the config field each comes from: the one dims table (dims.json,
written from src/plan/dims.ts by scripts/export-schemas.ts, read by plan.py: `DIM_SOURCES`).

From it: the dims an experiment config implies (`dims_from_config`, what `ampipe plan` writes),
the dims of a layer (`block_dims`, which a plan must match to run on it), the model config of a
plan's dims (`model_config_from_plan`), and the `ampipe plan` command that makes a plan for a
layer whose plan does not fit (`plan_fit_error`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .plan import DIM_SOURCES, INPUT_DIMS, PlanError

if TYPE_CHECKING:
    from ..model.adapter import LayerAdapter
    from ..model.config import ModelConfig
    from .plan import Plan

__all__ = ["DIM_SOURCES", "INPUT_DIMS", "dims_from_config", "block_dims", "model_config_from_plan",
           "fitting_plan_command", "plan_fit_error"]


def _dims(sections: Mapping[str, Mapping[str, Any]], skip: tuple[str, ...] = ()) -> dict[str, Any]:
    out = {}
    for dim, source in DIM_SOURCES.items():
        if dim not in skip:
            section, field = source.split(".")
            out[dim] = sections[section][field]
    return out


def dims_from_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The plan `dims` a resolved experiment config implies (the same fields as `ampipe plan` writes)."""
    from ..config_schema import resolve_section
    from ..model.config import ModelConfig

    model = ModelConfig.from_dict(resolve_section(config, "model")).to_dict()  # derived fields resolved
    return _dims({"model": model, "parallelism": resolve_section(config, "parallelism")})


def block_dims(layer: "LayerAdapter", seq_length: int | None = None,
               micro_batch_size: int | None = None) -> dict[str, Any]:
    """The plan `dims` a layer (its adapter) implies (sequence and batch sizes only when given:
    those come from the input)."""
    given = {"seq_length": seq_length, "micro_batch_size": micro_batch_size}
    dims = _dims({"model": layer.cfg.to_dict(),
                  "parallelism": {"expert_model_parallel_size": layer.ep.size}}, skip=INPUT_DIMS)
    return {**dims, **{k: v for k, v in given.items() if v is not None}}


def model_config_from_plan(plan: "Plan", base: "ModelConfig | Mapping[str, Any] | None" = None,
                           **overrides: Any) -> "ModelConfig":
    """A one-layer `ModelConfig` with the plan's dims (other fields from `base` or defaults)."""
    from ..model.config import ModelConfig

    d: dict[str, Any] = dict(base.to_dict() if isinstance(base, ModelConfig) else (base or {}))
    d["num_layers"] = d.get("num_layers", 1)
    for dim, source in DIM_SOURCES.items():
        section, field = source.split(".")
        if section == "model" and dim in plan.dims:
            d[field] = plan.dims[dim]
    d.update(overrides)
    return ModelConfig.from_dict(d)


def fitting_plan_command(dims: Mapping[str, Any]) -> str:
    """The `ampipe plan` command that makes a plan with these dims."""
    sets = " ".join(f"--set {DIM_SOURCES[k]}={'null' if v is None else v}" for k, v in dims.items())
    return f"ampipe plan <config> {sets} --out plan.json"


def plan_fit_error(error: Exception, adapter: "LayerAdapter") -> PlanError:
    """`error` (a plan that does not fit the layer) with the command that makes one that does."""
    return PlanError(f"{error}; make a plan for this layer with: "
                     f"{fitting_plan_command(block_dims(adapter))} "
                     f"(from Megatron-LM flags: ampipe plan --from-megatron --out plan.json -- <flags>)")
