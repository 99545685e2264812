"""The layer adapter: what the block pieces and the pipelined executor need from a layer.

The pieces (`ampipe.model.block_pieces`) never reach into a layer's modules themselves; they
ask an adapter where the norms, the QKV and out-projections, the router and the expert
weights are, in ampipe's layouts, and read the layer's config through ``cfg`` (a
`ModelConfig`: heads, groups, head dim, top-k, score order, capacity, activation, rope,
dropout, loss coefficients). Two adapters exist:

- ampipe's own `TransformerLayer` is its own adapter (its modules are laid out for the pieces);
- `ampipe.adapters.megatron.MegatronLayerAdapter` reads a Megatron-Core `TransformerLayer`
  (local spec) by attribute path, unwrapping its ``(output, bias)`` linear layers.

Layouts the adapter answers in (both Megatron-Core's):
- ``qkv_proj(x)`` ``[..., (heads + 2·groups)·d]``, rows grouped per query group (its
  query heads, then its key head, then its value head), bias included;
- ``expert_weights()``: ``w1 [E_local, H, F1]`` (SwiGLU: gate half first), ``w2
  [E_local, F, H]``, optional ``bias1 [E_local, F1]``, ``bias2 [E_local, H]``; views or
  differentiable stacks of the layer's own parameters (autograd reaches them);
- ``router_weight()`` ``[E, H]``;
- optional parts, read only when ``cfg`` says the layer has them: ``q_norm``/``k_norm``
  (``cfg.qk_layernorm``; per head, over the head dim), ``shared_expert(x)`` (the gated shared
  expert's output, ``cfg.moe_shared_expert_intermediate_size``), ``expert_bias`` and
  ``routed_counts`` (``cfg.moe_router_enable_expert_bias``: the [E] fp32 bias added to the
  scores when choosing experts, and the [E] fp32 buffer the kept slots per expert are added
  into, for the bias update after the step).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn

if TYPE_CHECKING:
    from ..parallel.groups import ExpertParallel
    from .config import ModelConfig

__all__ = ["ExpertWeights", "LayerAdapter", "NotSwappable"]


@dataclass
class ExpertWeights:
    """A layer's local experts in ampipe's layout (see the module docstring)."""

    w1: torch.Tensor
    w2: torch.Tensor
    bias1: torch.Tensor | None = None
    bias2: torch.Tensor | None = None


class NotSwappable(ValueError):
    """A layer an adapter does not recognise or cannot pipeline exactly; ``reason`` says why
    (naming the attribute or config field at fault)."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


@runtime_checkable
class LayerAdapter(Protocol):
    """What the block pieces and the executor read from a layer."""

    cfg: "ModelConfig"
    """The layer's config in ampipe's field names (what the pieces read)."""

    @property
    def adapted(self) -> nn.Module:
        """The adapted layer: its parameters are the block's."""

    @property
    def training(self) -> bool: ...

    @property
    def attention_backend(self) -> str:
        """"auto" | "sdpa" | "flash" (`ampipe.model.attention.attention_chunk`)."""

    @property
    def ep(self) -> "ExpertParallel":
        """The expert-parallel group the experts are sharded over."""

    @property
    def op_modules(self) -> Mapping[str, Sequence[nn.Module]]:
        """For the op kinds ``qkv``, ``proj``, ``route``, ``experts`` and ``shared``: the modules
        whose parameters that op differentiates (a missing kind: none). Together they must hold
        every parameter of ``adapted``."""

    def pipelined_forward(self, run: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """The pipelined layer's ``forward``: takes the layer's own call arguments, calls
        ``run(x [s, b, H], rope=None | (cos, sin)) -> (y, MoELosses)`` and returns what the
        layer's own forward returns (attaching the aux losses the way the layer does)."""

    def norm1(self, x: torch.Tensor) -> torch.Tensor: ...

    def qkv_proj(self, x: torch.Tensor) -> torch.Tensor: ...

    def out_proj(self, context: torch.Tensor) -> torch.Tensor: ...

    def norm2(self, h: torch.Tensor) -> torch.Tensor: ...

    def router_weight(self) -> torch.Tensor: ...

    def expert_weights(self) -> ExpertWeights: ...

    # Only when cfg says the layer has them:

    def q_norm(self, q: torch.Tensor) -> torch.Tensor:
        """``cfg.qk_layernorm``: the query norm of ``[..., heads, d]``."""

    def k_norm(self, k: torch.Tensor) -> torch.Tensor:
        """``cfg.qk_layernorm``: the key norm of ``[..., groups, d]``."""

    def shared_expert(self, x: torch.Tensor) -> torch.Tensor:
        """``cfg.moe_shared_expert_intermediate_size``: the (gated) shared expert of ``x``."""

    @property
    def expert_bias(self) -> torch.Tensor | None:
        """``cfg.moe_router_enable_expert_bias``: the [E] bias added to the scores to choose experts."""

    @property
    def routed_counts(self) -> torch.Tensor | None:
        """``cfg.moe_router_enable_expert_bias``: the [E] fp32 buffer kept slots are counted into."""
