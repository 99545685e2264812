"""Megatron-LM's ``--spec`` entry point: the pipelined block with no change to the training script.

    ampipe plan --from-megatron --out plan.json -- <the model flags of pretrain_gpt.py>
    AMPIPE_PLAN=plan.json python pretrain_gpt.py <flags> --spec ampipe.megatron gpt_layer_spec

``pretrain_gpt.py`` (``gpt_builders.gpt_builder``) imports ``gpt_layer_spec`` with
``import_module((module, name))`` and builds the GPT from it instead of its own spec. The spec
names one layer class, `PipelinedLayer`: a Megatron-Core `TransformerLayer` that builds the
local-spec submodules Megatron would build for its position (an MoE layer where
``config.moe_layer_freq`` says so, else a dense one; QK layernorm and the norm type from the
config) and, when it is an MoE layer, pipelines itself (`ampipe.apply_ampipe`) with the plan
in the file named by ``AMPIPE_PLAN``. Same parameters, state-dict names and checkpoints as
Megatron's local-spec layer; a layer the block cannot run, or a plan that does not fit it,
fails the model build naming the config field (and the ``ampipe plan`` command that makes a
fitting plan).

This module imports Megatron-Core (it is for Megatron's users); nothing else in ampipe does.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer

from .pipeline.block import apply_ampipe
from .pipeline.plan import Plan, load_plan

__all__ = ["PLAN_ENV", "PipelinedLayer", "gpt_layer_spec"]

PLAN_ENV = "AMPIPE_PLAN"


@functools.lru_cache(maxsize=4)
def _load(path: str) -> Plan:
    return load_plan(path)


def plan_from_env() -> Plan:
    """The plan named by ``AMPIPE_PLAN`` (read once per path; every layer shares it)."""
    path = os.environ.get(PLAN_ENV)
    if not path:
        raise RuntimeError(f"ampipe.megatron: set {PLAN_ENV} to a plan for this model, made with "
                           f"`ampipe plan --from-megatron --out plan.json -- <pretrain_gpt.py flags>`")
    return _load(path)


def is_moe_layer(config: Any, layer_number: int) -> bool:
    """Whether layer ``layer_number`` (1-based, over the whole model) is an MoE layer:
    Megatron's ``moe_layer_freq`` pattern (`get_gpt_decoder_layer_specs`)."""
    if not getattr(config, "num_moe_experts", None):
        return False
    freq = getattr(config, "moe_layer_freq", 1)
    if isinstance(freq, int):
        return (layer_number - 1) % freq == 0
    return bool(list(freq)[layer_number - 1])


def _global_layer_number(config: Any, layer_number: int, vp_stage: int | None) -> int:
    if (getattr(config, "pipeline_model_parallel_size", 1) or 1) == 1 and vp_stage is None:
        return layer_number
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    return layer_number + get_transformer_layer_offset(config, vp_stage)


class PipelinedLayer(TransformerLayer):
    """Megatron-Core's local-spec layer for its position; an MoE one runs ampipe's plan."""

    def __init__(self, config: Any, submodules: Any = None, layer_number: int = 1, *args: Any,
                 **kwargs: Any) -> None:
        number = _global_layer_number(config, layer_number, kwargs.get("vp_stage"))
        moe = is_moe_layer(config, number)
        if submodules is None:
            submodules = get_gpt_layer_local_spec(
                num_experts=config.num_moe_experts if moe else None,
                moe_grouped_gemm=bool(getattr(config, "moe_grouped_gemm", False)),
                qk_layernorm=bool(getattr(config, "qk_layernorm", False)),
                multi_latent_attention=bool(getattr(config, "multi_latent_attention", False)),
                normalization=getattr(config, "normalization", "LayerNorm"),
            ).submodules
        super().__init__(config, submodules, layer_number, *args, **kwargs)
        if moe:
            apply_ampipe(self, plan_from_env())


gpt_layer_spec = ModuleSpec(module=PipelinedLayer)
"""``--spec ampipe.megatron gpt_layer_spec``: every layer a `PipelinedLayer`."""
