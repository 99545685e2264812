"""The modules that hold a block's parameters, named as in Megatron-Core's GPT.

A `TransformerLayer` is ``input_layernorm → self_attention (linear_qkv, linear_proj) →
pre_mlp_layernorm → mlp`` where `mlp` is an `MoELayer` (``router``, ``experts``) or a dense
`MLP` (``linear_fc1``, ``linear_fc2``). The modules only hold parameters and configuration:
the math lives in the per-step functions of :mod:`ampipe.model.block_pieces`, and
`TransformerLayer.forward` is their composition over one chunk (the whole sequence).
Name mapping to Megatron-Core checkpoints: docs/model.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..parallel.groups import ExpertParallel
from .adapter import ExpertWeights
from .block_pieces import activation, block_forward
from .config import ModelConfig

__all__ = ["RMSNorm", "make_norm", "SelfAttention", "TopKRouter", "GroupedMLP", "SharedExpertMLP", "MoELayer",
           "MLP", "TransformerLayer"]


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (Megatron-Core's `RMSNorm`: ``weight`` only)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def make_norm(cfg: ModelConfig, size: int | None = None) -> nn.Module:
    """`model.normalization` over the last ``size`` features (default: the hidden size)."""
    size = cfg.hidden_size if size is None else size
    if cfg.normalization == "RMSNorm":
        return RMSNorm(size, eps=cfg.norm_epsilon)
    return nn.LayerNorm(size, eps=cfg.norm_epsilon)


class SelfAttention(nn.Module):
    """``linear_qkv`` [(heads + 2*groups) * d, H] in Megatron's per-group layout, ``linear_proj``.

    `linear_qkv`'s output rows are grouped by query group: for each of the `g` groups, its
    `heads/g` query heads, then its key head, then its value head (Megatron-Core's
    `get_query_key_value_tensors`), so its weight loads from Megatron-Core unchanged.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_groups = cfg.query_groups
        self.head_dim = cfg.head_dim
        qkv_out = (self.num_heads + 2 * self.num_groups) * self.head_dim
        self.linear_qkv = nn.Linear(cfg.hidden_size, qkv_out, bias=cfg.add_bias_linear)
        self.linear_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=cfg.add_bias_linear)
        # QK layernorm (Megatron's `q_layernorm`, `k_layernorm`): each head's query and key
        # normalised over the head dim, after the split and before rope.
        self.q_layernorm = make_norm(cfg, self.head_dim) if cfg.qk_layernorm else None
        self.k_layernorm = make_norm(cfg, self.head_dim) if cfg.qk_layernorm else None


class TopKRouter(nn.Module):
    """``weight`` [E, H], kept and applied in fp32 (Megatron-Core's `TopKRouter`).

    With ``moe_router_enable_expert_bias`` it also holds Megatron's two buffers: ``expert_bias``
    [E] fp32 (in the state dict; added to the scores when choosing experts) and
    ``local_tokens_per_expert`` [E] fp32 (not saved): the slots routed to each expert (after
    any capacity drop) by every forward with grad enabled since the last bias update
    (`ampipe.model.expert_bias.update_expert_bias`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size, dtype=torch.float32))
        nn.init.normal_(self.weight, std=cfg.init_method_std)
        if cfg.moe_router_enable_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))
            self.register_buffer("local_tokens_per_expert", torch.zeros(cfg.num_experts, dtype=torch.float32),
                                 persistent=False)
        else:
            self.expert_bias = None
            self.local_tokens_per_expert = None


class GroupedMLP(nn.Module):
    """The rank's local experts, stored as Megatron-Core's `GroupedMLP`.

    ``weight1`` has shape [H, E_local * F1] and ``weight2`` [E_local * F, H], where F is
    `moe_ffn_hidden_size` and F1 = 2F for SwiGLU (gate half first, as in Megatron) or F for
    GeLU. Like Megatron, the memory is read as ``weight1.view(E_local, H, F1)`` and
    ``weight2.view(E_local, F, H)``: expert e's fc1 is ``x @ w1[e]``. With
    ``add_bias_linear`` the experts also have ``bias1`` [E_local, F1] and ``bias2`` [E_local, H]
    (an ampipe addition; Megatron's GroupedMLP has no expert biases).

    Expert parameters carry ``allreduce = False`` (Megatron's marker): they are reduced over
    the expert-data-parallel group, not the data-parallel group.
    """

    def __init__(self, cfg: ModelConfig, num_local_experts: int, first_expert: int):
        super().__init__()
        self.num_local_experts = num_local_experts
        self.first_expert = first_expert  # global index of local expert 0
        self.hidden_size = cfg.hidden_size
        self.ffn_hidden_size = cfg.moe_ffn_hidden_size
        self.gated = cfg.moe_expert_activation == "swiglu"
        self.activation = cfg.moe_expert_activation
        f1 = self.ffn_hidden_size * (2 if self.gated else 1)
        self.fc1_size = f1
        self.weight1 = nn.Parameter(torch.empty(cfg.hidden_size, num_local_experts * f1))
        self.weight2 = nn.Parameter(torch.empty(num_local_experts * self.ffn_hidden_size, cfg.hidden_size))
        nn.init.normal_(self.weight1, std=cfg.init_method_std)
        nn.init.normal_(self.weight2, std=cfg.init_method_std)
        if cfg.add_bias_linear:
            self.bias1 = nn.Parameter(torch.zeros(num_local_experts, f1))
            self.bias2 = nn.Parameter(torch.zeros(num_local_experts, cfg.hidden_size))
        else:
            self.register_parameter("bias1", None)
            self.register_parameter("bias2", None)
        for p in self.parameters():
            p.allreduce = False  # type: ignore[attr-defined]

    def w1(self) -> torch.Tensor:
        """[E_local, H, F1] view of ``weight1``."""
        return self.weight1.view(self.num_local_experts, self.hidden_size, self.fc1_size)

    def w2(self) -> torch.Tensor:
        """[E_local, F, H] view of ``weight2``."""
        return self.weight2.view(self.num_local_experts, self.ffn_hidden_size, self.hidden_size)


class SharedExpertMLP(nn.Module):
    """Megatron-Core's `SharedExpertMLP`: a dense FFN of ``moe_shared_expert_intermediate_size``
    (``linear_fc1`` [F1s, H], ``linear_fc2`` [H, Fs], no biases, the experts' activation) that
    every token goes through; with ``moe_shared_expert_gate`` its output is scaled by
    ``sigmoid(x @ gate_weightᵀ)``, ``gate_weight`` [1, H]. Replicated on every EP rank."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        F_ = cfg.moe_shared_expert_intermediate_size
        self.activation = cfg.moe_expert_activation
        f1 = F_ * (2 if self.activation == "swiglu" else 1)
        self.linear_fc1 = nn.Linear(cfg.hidden_size, f1, bias=False)
        self.linear_fc2 = nn.Linear(F_, cfg.hidden_size, bias=False)
        if cfg.moe_shared_expert_gate:
            self.gate_weight = nn.Parameter(torch.empty(1, cfg.hidden_size))
            nn.init.normal_(self.gate_weight, std=cfg.init_method_std)
        else:
            self.register_parameter("gate_weight", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear_fc2(activation(self.linear_fc1(x), self.activation))
        if self.gate_weight is not None:
            out = out * torch.sigmoid(F.linear(x, self.gate_weight))
        return out


class MoELayer(nn.Module):
    """``router`` + ``experts`` (+ ``shared_experts``); holds the expert-parallel group the
    experts are sharded over."""

    def __init__(self, cfg: ModelConfig, ep: ExpertParallel):
        super().__init__()
        self.ep = ep
        self.num_experts = cfg.num_experts
        self.num_local_experts = cfg.num_experts // ep.size
        self.router = TopKRouter(cfg)
        self.experts = GroupedMLP(cfg, self.num_local_experts, ep.rank * self.num_local_experts)
        self.shared_experts = SharedExpertMLP(cfg) if cfg.has_shared_expert else None


class MLP(nn.Module):
    """A dense FFN: ``linear_fc1`` [F1, H], ``linear_fc2`` [H, F] (SwiGLU: gate half first)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.moe_expert_activation == "swiglu"
        self.activation = cfg.moe_expert_activation
        f1 = cfg.ffn_hidden_size * (2 if self.gated else 1)
        self.linear_fc1 = nn.Linear(cfg.hidden_size, f1, bias=cfg.add_bias_linear)
        self.linear_fc2 = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size, bias=cfg.add_bias_linear)


class TransformerLayer(nn.Module):
    """One block: causal self-attention and an MoE layer (or a dense MLP).

    It is its own `LayerAdapter` (`ampipe.model.adapter`): the methods after `forward` are
    what the block pieces read."""

    def __init__(self, cfg: ModelConfig, layer_number: int, ep: ExpertParallel | None = None):
        super().__init__()
        self.cfg = cfg
        self.layer_number = layer_number
        self.is_moe = cfg.is_moe_layer(layer_number)
        ep = ep if ep is not None else ExpertParallel.single()
        cfg.check_parallel(ep.size)
        self.input_layernorm = make_norm(cfg)
        self.self_attention = SelfAttention(cfg)
        self.pre_mlp_layernorm = make_norm(cfg)
        self.mlp: nn.Module = MoELayer(cfg, ep) if self.is_moe else MLP(cfg)
        # Attention backend: "auto" (FlashAttention >= 2.1 when usable, else SDPA), "sdpa" or "flash".
        self.attention_backend = "auto"

    def forward(self, x: torch.Tensor):
        """``x [s, b, H]`` → ``(y [s, b, H], MoELosses | None)``; see `block_pieces.block_forward`."""
        return block_forward(self, x)

    # -- LayerAdapter (ampipe.model.adapter) -----------------------------------------------

    @property
    def adapted(self) -> "TransformerLayer":
        return self

    def pipelined_forward(self, run, x: torch.Tensor):
        """The pipelined layer's forward (`AMPipeBlock`): ``run(x) -> (y, MoELosses)``, the
        same call and return value as `forward`."""
        return run(x)

    @property
    def ep(self) -> ExpertParallel:
        return self.mlp.ep

    @property
    def op_modules(self) -> dict[str, list[nn.Module]]:
        attn = self.self_attention
        qk_norms = [m for m in (attn.q_layernorm, attn.k_layernorm) if m is not None]
        shared = self.mlp.shared_experts
        return {"qkv": [self.input_layernorm, attn.linear_qkv, *qk_norms],
                "proj": [attn.linear_proj, self.pre_mlp_layernorm],
                "route": [self.mlp.router], "experts": [self.mlp.experts],
                "shared": [shared] if shared is not None else []}

    def norm1(self, x: torch.Tensor) -> torch.Tensor:
        return self.input_layernorm(x)

    def qkv_proj(self, x: torch.Tensor) -> torch.Tensor:
        return self.self_attention.linear_qkv(x)

    def out_proj(self, context: torch.Tensor) -> torch.Tensor:
        return self.self_attention.linear_proj(context)

    def norm2(self, h: torch.Tensor) -> torch.Tensor:
        return self.pre_mlp_layernorm(h)

    def q_norm(self, q: torch.Tensor) -> torch.Tensor:
        return self.self_attention.q_layernorm(q)

    def k_norm(self, k: torch.Tensor) -> torch.Tensor:
        return self.self_attention.k_layernorm(k)

    def router_weight(self) -> torch.Tensor:
        return self.mlp.router.weight

    @property
    def expert_bias(self) -> torch.Tensor | None:
        return self.mlp.router.expert_bias

    @property
    def routed_counts(self) -> torch.Tensor | None:
        return self.mlp.router.local_tokens_per_expert

    def shared_expert(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp.shared_experts(x)

    def expert_weights(self) -> ExpertWeights:
        ex = self.mlp.experts
        return ExpertWeights(ex.w1(), ex.w2(), ex.bias1, ex.bias2)
