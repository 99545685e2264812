"""Swapping the pipelined block into a whole model: `swap_blocks`, `unswap_blocks`.

`swap_blocks(model, plan)` walks the model; every transformer layer an adapter recognises
(ampipe's own MoE `TransformerLayer`, Megatron-Core's local-spec `TransformerLayer`) is made
pipelined in place by `apply_ampipe` — the same module object, the same Parameter objects
and state_dict names, its hooks kept. Layers it cannot swap (dense layers, structures no
adapter recognises, features the block does not implement) are left as they are and listed
by name with the reason. Nothing is swapped when the plan does not fit a layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ..adapters import is_layer_like
from ..model.adapter import NotSwappable
from .block import AMPipeBlock, _install, prepare_ampipe, unapply_ampipe
from .plan import Plan, PlanError, load_plan

__all__ = ["SwapReport", "swap_blocks", "unswap_blocks", "pipeline_layers", "baseline_layers"]


@dataclasses.dataclass
class SwapReport:
    """What `swap_blocks` did: the layers swapped (module names), those left as they were,
    each with the reason, and notes on swapped layers (e.g. a capacity the plan sizes per
    chunk: a different function from the layer's own)."""

    swapped: list[str]
    skipped: dict[str, str]
    plan: Plan | None = None
    notes: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"swapped {len(self.swapped)} layer(s): {', '.join(self.swapped) or '-'}"]
        lines += [f"left unswapped: {name}: {why}" for name, why in self.skipped.items()]
        lines += [f"note: {name}: {note}" for name, notes in self.notes.items() for note in notes]
        return "\n".join(lines)


def _layers(model: nn.Module, prefix: str = ""):
    """(name, module) of every transformer layer, in module order; a layer's insides are not
    searched further (a layer holds no other layers)."""
    if is_layer_like(model):
        yield prefix, model
        return
    for child_name, child in model.named_children():
        yield from _layers(child, f"{prefix}.{child_name}" if prefix else child_name)


def swap_blocks(model: nn.Module, plan: Plan | str | Path | Mapping[str, Any],
                **options: Any) -> SwapReport:
    """Make every MoE layer of `model` that an adapter recognises run `plan`, in place.

    `options` go to `apply_ampipe` (``emulated_comm``, ``record_times``). A plan whose dims
    differ from a layer's is refused (`PlanError` naming the field and the `ampipe plan`
    command that makes the right plan) before any layer is changed."""
    if not isinstance(plan, Plan):
        plan = load_plan(plan)
    chosen, skipped = [], {}
    for name, layer in _layers(model):
        label = name or "(model)"
        if isinstance(layer, AMPipeBlock):
            skipped[label] = "already pipelined"
            continue
        try:
            chosen.append((label, layer, prepare_ampipe(layer, plan, **options)))
        except NotSwappable as e:
            skipped[label] = e.reason
        except PlanError as e:
            raise PlanError(f"{label}: {e}") from None
    for _, layer, engine in chosen:  # every check passed: now change the model
        _install(layer, engine)
    return SwapReport([label for label, _, _ in chosen], skipped, plan,
                      {label: engine.notes for label, _, engine in chosen if engine.notes})


def unswap_blocks(model: nn.Module) -> list[str]:
    """Undo `swap_blocks`: every pipelined layer gets its own class back (no weight copied).
    Returns the names of the layers restored."""
    restored = []
    for name, layer in _layers(model):
        if isinstance(layer, AMPipeBlock):
            unapply_ampipe(layer)
            restored.append(name or "(model)")
    return restored


def pipeline_layers(model: nn.Module, plan: Plan | str | Path | Mapping[str, Any],
                    **options: Any) -> list[str]:
    """`swap_blocks`, returning only the names swapped (the older spelling)."""
    return swap_blocks(model, plan, **options).swapped


def baseline_layers(model: nn.Module) -> list[str]:
    """`unswap_blocks` (the older spelling)."""
    return unswap_blocks(model)
