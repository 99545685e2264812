"""Which layers the pipelined block runs over, and how each is read (`LayerAdapter`).

- ampipe's own `TransformerLayer` (MoE) is its own adapter;
- a Megatron-Core `TransformerLayer` (local spec) is read by `MegatronLayerAdapter`
  (`ampipe.adapters.megatron`), duck-typed on its attribute paths; nothing from Megatron is
  imported at module load.

`adapter_for(layer)` picks one, or raises `NotSwappable` with the reason (naming the
attribute or config field it could not accept). `is_layer_like` says which modules are
transformer layers at all (the ones `swap_blocks` reports when it cannot swap them).
"""

from __future__ import annotations

from torch import nn

from ..model.adapter import ExpertWeights, LayerAdapter, NotSwappable

__all__ = ["ExpertWeights", "LayerAdapter", "NotSwappable", "adapter_for", "is_layer_like"]


def is_layer_like(module: nn.Module) -> bool:
    """A transformer layer of some kind: ampipe's, or anything with ``self_attention`` and ``mlp``."""
    from ..model.layers import TransformerLayer

    return isinstance(module, TransformerLayer) or (
        hasattr(module, "self_attention") and hasattr(module, "mlp"))


def adapter_for(layer: nn.Module) -> LayerAdapter:
    """The adapter that recognises `layer`; `NotSwappable` says why none does."""
    from ..model.layers import TransformerLayer

    if isinstance(layer, TransformerLayer):
        if not layer.is_moe:
            raise NotSwappable("a dense layer (mlp is an MLP, not an MoE layer)")
        return layer
    if hasattr(layer, "config") and hasattr(layer, "self_attention") and hasattr(layer, "mlp"):
        from .megatron import MegatronLayerAdapter

        return MegatronLayerAdapter(layer)
    missing = [a for a in ("config", "self_attention", "mlp") if not hasattr(layer, a)]
    raise NotSwappable(f"{type(layer).__name__} is neither ampipe's TransformerLayer nor a "
                       f"Megatron-Core TransformerLayer (no attribute {', '.join(map(repr, missing))})")
