"""`AMPipeBlock` and how a layer becomes one: `apply_ampipe`, `unapply_ampipe`.

`apply_ampipe(layer, plan)` makes an MoE layer pipelined in place, the way FSDP2's
`fully_shard` makes a module sharded: the module object stays where it is (same
parameters, same state_dict names, its hooks kept) and its class becomes a subclass of
both `AMPipeBlock` and its own class, whose `forward` runs the plan (`function.BlockEngine`);
`unapply_ampipe` restores the class. The engine reads the layer through its adapter
(`ampipe.model.adapter`), so any layer an adapter recognises can be pipelined.

The executor's parts: `ops.py` (one forward and one backward function per op kind),
`step.py` (one step's state and gradient accumulation), `function.py` (the autograd Function
over the whole block and the engine that runs it), `dataflow.py` (what each op reads and
writes, from the op-kind table), `streams.py` (running a pass over the plan's streams).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ..adapters import adapter_for
from ..model.adapter import LayerAdapter
from .dims import block_dims, plan_fit_error  # noqa: F401  (block_dims: the public name here too)
from .emulation import EmulatedComm
from .function import BlockEngine
from .plan import Plan, PlanError, check_dims, load_plan
from .streams import OpTimes

__all__ = ["AMPipeBlock", "apply_ampipe", "prepare_ampipe", "unapply_ampipe", "block_dims"]


class AMPipeBlock(nn.Module):
    """The base of every pipelined layer's class: `isinstance(layer, AMPipeBlock)` says a
    layer runs a plan. Its `forward` is the adapter's `pipelined_forward` over the plan
    (ampipe's layer: ``x -> (y, MoELosses)``; Megatron-Core's: its own call signature and
    return value). Per-op times of the latest step are in `last_times`
    (``{"forward": OpTimes, "backward": OpTimes}``), and with emulated communication the
    delay modelled per comm op in `last_delays_ms` (``{pass: {op id: ms}}``).

    Made by `apply_ampipe` (in place) or `AMPipeBlock.from_layer` (a twin sharing the
    layer's submodules, for running the baseline and the pipelined block side by side).
    """

    _ampipe: BlockEngine

    @classmethod
    def from_layer(cls, layer: nn.Module, plan: Plan | str | Path | Mapping[str, Any], *,
                   emulated_comm: EmulatedComm | Mapping[str, Any] | None = None,
                   record_times: bool = True) -> "AMPipeBlock":
        """A pipelined twin of `layer`: a new module object over the same submodules (same
        Parameter objects, same state_dict names); `layer` itself is left as it is."""
        return apply_ampipe(_twin(layer), plan, emulated_comm=emulated_comm,
                            record_times=record_times)

    def to_layer(self) -> nn.Module:
        """The baseline layer over the same submodules (a twin; this block is left as it is)."""
        return unapply_ampipe(_twin(self))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        engine = self._ampipe
        return engine.adapter.pipelined_forward(engine.run, *args, **kwargs)

    @property
    def plan(self) -> Plan:
        return self._ampipe.plan

    @property
    def emulated_comm(self) -> EmulatedComm | None:
        return self._ampipe.emulated_comm

    @property
    def last_times(self) -> dict[str, OpTimes] | None:
        return self._ampipe.last_times

    @property
    def last_delays_ms(self) -> dict[str, dict[str, float]] | None:
        return self._ampipe.last_delays_ms


_PIPELINED_CLASSES: dict[type, type] = {}


def _pipelined_class(cls: type) -> type:
    """``AMPipe<cls>``: a subclass of `AMPipeBlock` and `cls` (one per class)."""
    out = _PIPELINED_CLASSES.get(cls)
    if out is None:
        out = _PIPELINED_CLASSES[cls] = type(f"AMPipe{cls.__name__}", (AMPipeBlock, cls),
                                             {"__module__": cls.__module__})
    return out


def _twin(layer: nn.Module) -> nn.Module:
    """A shallow copy of `layer`: the same submodules, parameters and buffers, but its own
    registries and hook tables (so registering on one leaves the other alone)."""
    twin = copy.copy(layer)
    for k, v in twin.__dict__.items():
        if isinstance(v, dict):
            twin.__dict__[k] = type(v)(v)
    return twin


def apply_ampipe(layer: nn.Module, plan: Plan | str | Path | Mapping[str, Any], *,
                 adapter: LayerAdapter | None = None,
                 emulated_comm: EmulatedComm | Mapping[str, Any] | None = None,
                 record_times: bool = True) -> AMPipeBlock:
    """Make one MoE layer run `plan`, in place; returns the same object (now an `AMPipeBlock`).

    `adapter` defaults to the one that recognises the layer (`ampipe.adapters.adapter_for`;
    `NotSwappable` names what it missed). A plan whose dims differ from the layer's is
    refused naming the field and the `ampipe plan` command that makes a fitting one."""
    return _install(layer, prepare_ampipe(layer, plan, adapter=adapter, emulated_comm=emulated_comm,
                                          record_times=record_times))


def prepare_ampipe(layer: nn.Module, plan: Plan | str | Path | Mapping[str, Any], *,
                   adapter: LayerAdapter | None = None,
                   emulated_comm: EmulatedComm | Mapping[str, Any] | None = None,
                   record_times: bool = True) -> BlockEngine:
    """Every check of `apply_ampipe`, changing nothing: the engine it would install.
    Raises `NotSwappable` (the layer) or `PlanError` (the plan does not fit it)."""
    if isinstance(layer, AMPipeBlock):
        raise ValueError(f"apply_ampipe: {type(layer).__name__} is pipelined already")
    adapter = adapter if adapter is not None else adapter_for(layer)
    if not isinstance(plan, Plan):
        plan = load_plan(plan)
    if isinstance(emulated_comm, Mapping):
        emulated_comm = EmulatedComm.from_dict(emulated_comm)
    try:
        check_dims(plan, block_dims(adapter))
    except PlanError as e:
        raise plan_fit_error(e, adapter) from None
    return BlockEngine(adapter, plan, emulated_comm, record_times, type(layer))


def _install(layer: nn.Module, engine: BlockEngine) -> AMPipeBlock:
    layer.__dict__["_ampipe"] = engine
    layer.__class__ = _pipelined_class(type(layer))
    return layer  # type: ignore[return-value]


def unapply_ampipe(layer: AMPipeBlock) -> nn.Module:
    """Undo `apply_ampipe` in place (the class it had, no weight copied); returns the layer."""
    if not isinstance(layer, AMPipeBlock):
        raise ValueError(f"unapply_ampipe: {type(layer).__name__} is not pipelined")
    engine = layer.__dict__.pop("_ampipe")
    if type(layer) is not _PIPELINED_CLASSES.get(engine.original_class):
        layer.__dict__["_ampipe"] = engine
        raise ValueError(f"unapply_ampipe: the layer's class was changed after apply_ampipe "
                         f"(now {type(layer).__name__}); undo that first")
    layer.__class__ = engine.original_class
    return layer
