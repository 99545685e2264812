"""A test double of Megatron-Core's GPT-MoE (megatron-core 0.20, local spec).

Same attribute paths, config field names, call signatures and return values as Megatron's
`TransformerLayer` built by `get_gpt_layer_local_spec` (``input_layernorm``,
``self_attention.linear_qkv/core_attention/linear_proj``, ``pre_mlp_layernorm``,
``mlp.router``, ``mlp.experts`` as `SequentialMLP` or `GroupedMLP`, ``mlp.token_dispatcher``),
linear layers returning ``(output, bias)``, ``layer(hidden_states, attention_mask=None,
rotary_pos_emb=..., ...) -> (output, context)``, the aux and z-losses attached to the
activations through `MoEAuxLossAutoScaler` and logged into an aux-loss tracker.

Its math is written here from Megatron's definitions, independently of ampipe's block
pieces: explicit-softmax causal attention with repeated KV heads, a dense routing map,
per-expert gather / index_add token movement. The equivalence tests compare ampipe's
pipelined block against it; two paths built from the same pieces could share one bug.

Also from Megatron-Core 0.20's source: QK layernorm (per head, before rope), shared experts
(`SharedExpertMLP`, optional sigmoid gate, added to the routed output), sigmoid scores with
the expert bias (selection only), group-limited top-k, the top-k scaling factor, capacity
dropping (`apply_router_token_dropping`), the router's ``local_tokens_per_expert`` count and
the bias update of `finalize_model_grads` (`finalize_expert_bias`), and the spec machinery
(`ModuleSpec`, `build_module`, `import_module`, `get_gpt_layer_local_spec`, a
`TransformerBlock` built from a layer spec). `megatron_modules()` installs this module under
Megatron-Core's import paths, so code that imports ``megatron.core...`` (ampipe.megatron)
can be tested against it.
"""

from __future__ import annotations

import contextlib
import enum
import math
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn


# --------------------------------------------------------------------------- config


class AttnMaskType(enum.Enum):
    padding = 1
    causal = 2
    no_mask = 3


@dataclass
class TransformerConfig:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int | None = None
    kv_channels: int | None = None
    ffn_hidden_size: int | None = None
    num_moe_experts: int | None = None
    moe_router_topk: int = 2
    moe_router_pre_softmax: bool = False
    moe_router_score_function: str = "softmax"
    moe_router_topk_scaling_factor: float | None = None
    moe_router_load_balancing_type: str = "aux_loss"
    moe_router_enable_expert_bias: bool = False
    moe_router_bias_update_rate: float = 1e-3
    moe_router_num_groups: int | None = None
    moe_router_group_topk: int | None = None
    moe_router_dtype: str | None = None
    moe_expert_capacity_factor: float | None = None
    moe_token_drop_policy: str = "probs"
    moe_pad_expert_input_to_capacity: bool = False
    moe_shared_expert_intermediate_size: int | None = None
    moe_shared_expert_gate: bool = False
    moe_shared_expert_overlap: bool = False
    moe_layer_freq: int = 1
    moe_aux_loss_coeff: float = 0.0
    moe_z_loss_coeff: float | None = None
    moe_ffn_hidden_size: int | None = None
    moe_grouped_gemm: bool = False
    gated_linear_unit: bool = False
    activation_func: Callable[..., torch.Tensor] = F.gelu
    normalization: str = "LayerNorm"
    layernorm_epsilon: float = 1e-5
    add_bias_linear: bool = True
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    init_method_std: float = 0.02
    bf16: bool = False
    fp16: bool = False
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    sequence_parallel: bool = False
    rotary_interleaved: bool = False
    qk_layernorm: bool = False
    multi_latent_attention: bool = False
    calculate_per_token_loss: bool = False
    mtp_num_layers: int | None = None

    def __post_init__(self) -> None:
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.kv_channels is None:
            self.kv_channels = self.hidden_size // self.num_attention_heads
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.moe_ffn_hidden_size is None:
            self.moe_ffn_hidden_size = self.ffn_hidden_size
        # Megatron's TransformerConfig checks
        if self.moe_shared_expert_intermediate_size is not None:
            assert not self.add_bias_linear, "bias is not supported in the shared experts"
        if self.moe_router_enable_expert_bias and self.moe_router_score_function != "sigmoid":
            raise ValueError("Expert bias for aux-loss-free routing only supports 'sigmoid'")
        if self.moe_router_group_topk:
            assert self.moe_router_num_groups and self.num_moe_experts % self.moe_router_num_groups == 0
            assert self.moe_router_group_topk <= self.moe_router_num_groups


# --------------------------------------------------------------------------- aux losses

_TRACKER: dict[str, dict[str, torch.Tensor]] = {}


def save_to_aux_losses_tracker(name: str, loss: torch.Tensor, layer_number: int, num_layers: int,
                               reduce_group: Any = None, avg_group: Any = None) -> None:
    entry = _TRACKER.setdefault(name, {"values": torch.zeros(num_layers)})
    entry["values"][layer_number - 1] += loss.detach()


def clear_aux_losses_tracker() -> None:
    _TRACKER.clear()


def get_moe_layer_wise_logging_tracker() -> dict[str, dict[str, torch.Tensor]]:
    return _TRACKER


class MoEAuxLossAutoScaler(torch.autograd.Function):
    """Identity on `output`; in backward, the aux loss receives ``main_loss_backward_scale``."""

    main_loss_backward_scale: torch.Tensor = torch.tensor(1.0)

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(aux_loss)
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (aux_loss,) = ctx.saved_tensors
        scale = MoEAuxLossAutoScaler.main_loss_backward_scale
        return grad_output, torch.ones_like(aux_loss) * scale

    @staticmethod
    def set_loss_scale(scale: torch.Tensor) -> None:
        MoEAuxLossAutoScaler.main_loss_backward_scale = scale


# --------------------------------------------------------------------------- building blocks


class IdentityOp(nn.Module):
    def forward(self, x, *args, **kwargs):
        return x


class ColumnParallelLinear(nn.Module):
    """``weight [out, in]``; returns ``(x Wᵀ + b, None)``, or ``(x Wᵀ, b)`` with skip_bias_add."""

    def __init__(self, in_f: int, out_f: int, bias: bool, skip_bias_add: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_f, in_f))
        self.bias = nn.Parameter(torch.empty(out_f)) if bias else None
        self.skip_bias_add = skip_bias_add

    def forward(self, x: torch.Tensor):
        y = torch.matmul(x, self.weight.t())
        if self.bias is None:
            return y, None
        if self.skip_bias_add:
            return y, self.bias
        return y + self.bias, None


RowParallelLinear = ColumnParallelLinear


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = (x.float() ** 2).mean(dim=-1, keepdim=True)
        return (x.float() / torch.sqrt(var + self.eps)).type_as(x) * self.weight


def make_norm(config: TransformerConfig, hidden_size: int | None = None, eps: float | None = None) -> nn.Module:
    size = config.hidden_size if hidden_size is None else hidden_size
    eps = config.layernorm_epsilon if eps is None else eps
    if config.normalization == "RMSNorm":
        return RMSNorm(size, eps)
    return nn.LayerNorm(size, eps=eps)


class WrappedTorchNorm:
    """Megatron's local-spec norm builder: ``(config=, hidden_size=, eps=)`` -> the config's norm."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        return make_norm(config, hidden_size, eps)


# --------------------------------------------------------------------------- specs (spec_utils.py)


@dataclass
class ModuleSpec:
    module: Any
    params: dict = field(default_factory=dict)
    submodules: object = None
    metainfo: dict = field(default_factory=dict)


def import_module(module_path: tuple[str, str]) -> Any:
    """Megatron's `spec_utils.import_module`: the object ``name`` of module ``base_path``."""
    base_path, name = module_path
    module = __import__(base_path, globals(), locals(), [name])
    return vars(module)[name]


def build_module(spec_or_module: Any, *args: Any, **kwargs: Any) -> Any:
    if isinstance(spec_or_module, types.FunctionType):
        return spec_or_module
    if isinstance(spec_or_module, type):
        module = spec_or_module
    elif isinstance(spec_or_module.module, type):
        module = spec_or_module.module
    else:
        module = import_module(spec_or_module.module)
    if getattr(spec_or_module, "submodules", None) is not None:
        kwargs["submodules"] = spec_or_module.submodules
    return module(*args, **getattr(spec_or_module, "params", {}), **kwargs)


@dataclass
class SelfAttentionSubmodules:
    linear_qkv: Any = None
    core_attention: Any = None
    linear_proj: Any = None
    q_layernorm: Any = None
    k_layernorm: Any = None


@dataclass
class MLPSubmodules:
    linear_fc1: Any = None
    linear_fc2: Any = None


@dataclass
class MoESubmodules:
    experts: Any = None
    shared_experts: Any = None


@dataclass
class TransformerLayerSubmodules:
    input_layernorm: Any = None
    self_attention: Any = None
    pre_mlp_layernorm: Any = None
    mlp: Any = None


@dataclass
class TransformerBlockSubmodules:
    layer_specs: list = field(default_factory=list)
    layer_norm: Any = None


class BaseTransformerLayer:
    """Megatron's marker: a spec whose module subclasses it is fanned out over the block's layers."""


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_pos_emb(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Megatron's `_apply_rotary_pos_emb_bshd`, non-interleaved: ``t·cos + rotate_half(t)·sin``."""
    cos_, sin_ = torch.cos(freqs).to(t.dtype), torch.sin(freqs).to(t.dtype)
    return t * cos_ + _rotate_half(t) * sin_


class RotaryEmbedding(nn.Module):
    def __init__(self, kv_channels: int, rotary_base: float = 10000.0):
        super().__init__()
        # a buffer (not saved), so .cuda() moves it as Megatron's does
        self.register_buffer("inv_freq", 1.0 / (rotary_base ** (
            torch.arange(0, kv_channels, 2, dtype=torch.float32) / kv_channels)), persistent=False)

    def forward(self, max_seq_len: int) -> torch.Tensor:
        seq = torch.arange(max_seq_len, dtype=torch.float32, device=self.inv_freq.device)
        freqs = seq[:, None] * self.inv_freq[None, :]
        return torch.cat((freqs, freqs), dim=-1)[:, None, None, :]


# --------------------------------------------------------------------------- attention


class DotProductAttention(nn.Module):
    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType):
        super().__init__()
        self.config = config
        self.attn_mask_type = attn_mask_type
        self.dropout = nn.Dropout(config.attention_dropout)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, **kwargs):
        s, b, h, d = query.shape
        rep = h // key.shape[2]
        key = key.repeat_interleave(rep, dim=2)
        value = value.repeat_interleave(rep, dim=2)
        scores = torch.einsum("sbhd,tbhd->bhst", query, key) / math.sqrt(d)
        if attention_mask is None:
            attention_mask = torch.ones(s, s, dtype=torch.bool, device=query.device).triu(1)
        scores = scores.masked_fill(attention_mask, float("-inf"))
        probs = self.dropout(torch.softmax(scores.float(), dim=-1).type_as(query))
        ctx = torch.einsum("bhst,tbhd->sbhd", probs, value)
        return ctx.reshape(s, b, h * d)


class SelfAttention(nn.Module):
    def __init__(self, config: TransformerConfig, submodules: SelfAttentionSubmodules | None = None,
                 layer_number: int = 1, attn_mask_type: AttnMaskType = AttnMaskType.causal, **kwargs: Any):
        super().__init__()
        self.config = config
        self.attn_mask_type = attn_mask_type
        h, g, d = config.num_attention_heads, config.num_query_groups, config.kv_channels
        self.linear_qkv = ColumnParallelLinear(config.hidden_size, (h + 2 * g) * d, config.add_bias_linear)
        self.core_attention = DotProductAttention(config, layer_number, attn_mask_type)
        self.linear_proj = RowParallelLinear(h * d, config.hidden_size, config.add_bias_linear, skip_bias_add=True)
        # QK layernorm: one norm over the head dim, shared by the heads, applied before rope.
        norm = (submodules.q_layernorm if submodules is not None else None) or WrappedTorchNorm
        self.q_layernorm = norm(config=config, hidden_size=d, eps=config.layernorm_epsilon) if config.qk_layernorm else None
        norm = (submodules.k_layernorm if submodules is not None else None) or WrappedTorchNorm
        self.k_layernorm = norm(config=config, hidden_size=d, eps=config.layernorm_epsilon) if config.qk_layernorm else None

    def get_query_key_value_tensors(self, hidden_states):
        c = self.config
        g, d = c.num_query_groups, c.kv_channels
        hpg = c.num_attention_heads // g
        mixed, _ = self.linear_qkv(hidden_states)
        s, b = mixed.shape[:2]
        mixed = mixed.view(s, b, g, (hpg + 2) * d)
        query, key, value = torch.split(mixed, [hpg * d, d, d], dim=3)
        query = query.reshape(s, b, -1, d)
        if self.q_layernorm is not None:
            query = self.q_layernorm(query)
        if self.k_layernorm is not None:
            key = self.k_layernorm(key)
        return query, key, value

    def forward(self, hidden_states, attention_mask, rotary_pos_emb=None, **kwargs):
        query, key, value = self.get_query_key_value_tensors(hidden_states)
        if rotary_pos_emb is not None:
            if isinstance(rotary_pos_emb, tuple):
                q_emb, k_emb = rotary_pos_emb
            else:
                q_emb = k_emb = rotary_pos_emb
            query = apply_rotary_pos_emb(query, q_emb[: query.shape[0]])
            key = apply_rotary_pos_emb(key, k_emb[: key.shape[0]])
        ctx = self.core_attention(query, key, value, attention_mask)
        return self.linear_proj(ctx)


# --------------------------------------------------------------------------- MoE


class TopKRouter(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.topk = config.moe_router_topk
        self.weight = nn.Parameter(torch.empty(config.num_moe_experts, config.hidden_size))
        self.layer_number: int | None = None
        if config.moe_router_enable_expert_bias:
            E = config.num_moe_experts
            self.register_buffer("local_tokens_per_expert", torch.zeros(E, dtype=torch.float32), persistent=False)
            self.register_buffer("expert_bias", torch.zeros(E, dtype=torch.float32))
        else:
            self.local_tokens_per_expert = None
            self.expert_bias = None

    def set_layer_number(self, layer_number: int) -> None:
        self.layer_number = layer_number

    def _choose(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k over experts; group-limited (Megatron's `group_limited_topk`): keep the
        group_topk groups whose top-(k/group_topk) scores sum highest, then top-k inside them."""
        c = self.config
        if c.moe_router_group_topk:
            T, E = scores.shape
            per = E // c.moe_router_num_groups
            ranked = scores.view(T, c.moe_router_num_groups, per).sort(dim=-1, descending=True).values
            group_score = ranked[..., : self.topk // c.moe_router_group_topk].sum(dim=-1)
            chosen = group_score.argsort(dim=-1, descending=True)[:, : c.moe_router_group_topk]
            group_ok = torch.zeros_like(group_score, dtype=torch.bool).scatter(1, chosen, True)
            expert_ok = group_ok[:, torch.arange(E, device=scores.device) // per]
            scores = scores.masked_fill(~expert_ok, float("-inf"))
        return torch.topk(scores, self.topk, dim=1)

    def _scores_and_map(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Megatron's `topk_routing_with_score_function`: dense probs and routing map [T, E]."""
        c = self.config
        if c.moe_router_score_function == "softmax":
            if c.moe_router_pre_softmax:
                top_probs, top_idx = self._choose(torch.softmax(logits, dim=-1, dtype=torch.float32))
            else:
                top_logits, top_idx = self._choose(logits)
                top_probs = torch.softmax(top_logits, dim=-1, dtype=torch.float32)
        elif c.moe_router_score_function == "sigmoid":
            sig = torch.sigmoid(logits.float())
            if self.expert_bias is not None:  # the bias chooses; the gates stay the sigmoids
                _, top_idx = self._choose(sig + self.expert_bias.float())
                top = torch.gather(sig, 1, top_idx)
            else:
                top, top_idx = self._choose(sig)
            top_probs = top / (top.sum(dim=-1, keepdim=True) + 1e-20) if self.topk > 1 else top
        else:
            raise ValueError(f"score function {c.moe_router_score_function}")
        if c.moe_router_topk_scaling_factor:
            top_probs = top_probs * c.moe_router_topk_scaling_factor
        probs = torch.zeros_like(logits).scatter(1, top_idx, top_probs.type_as(logits))
        routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, top_idx, True)
        return probs, routing_map

    def _drop(self, probs: torch.Tensor, routing_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`apply_router_token_dropping`: capacity ceil((T*k/E) * factor) per expert; `probs` keeps
        the highest probabilities, `position` the earliest tokens."""
        c = self.config
        T, E = probs.shape
        capacity = math.ceil((T * self.topk / E) * c.moe_expert_capacity_factor)
        if capacity > T:
            return probs, routing_map
        if c.moe_token_drop_policy == "probs":
            best = torch.topk(probs, k=capacity, dim=0).indices
            keep = torch.zeros_like(routing_map).scatter(0, best, True)
        else:  # the first `capacity` tokens routed to each expert
            keep = torch.cumsum(routing_map.long(), dim=0) <= capacity
        routing_map = routing_map & keep
        return probs * routing_map, routing_map

    def forward(self, input: torch.Tensor):
        c = self.config
        x = input.reshape(-1, input.shape[-1])
        logits = F.linear(x, self.weight)
        num_layers = c.num_layers + (c.mtp_num_layers or 0)
        per_token = logits.shape[0] if c.calculate_per_token_loss else 1
        if c.moe_z_loss_coeff and self.training and torch.is_grad_enabled():
            z = c.moe_z_loss_coeff * torch.mean(torch.logsumexp(logits, dim=-1) ** 2)
            logits = MoEAuxLossAutoScaler.apply(logits, z * per_token)
            save_to_aux_losses_tracker("z_loss", z / c.moe_z_loss_coeff, self.layer_number, num_layers)
        probs, routing_map = self._scores_and_map(logits)
        if c.moe_expert_capacity_factor is not None:
            probs, routing_map = self._drop(probs, routing_map)
        if c.moe_aux_loss_coeff > 0 and self.training and torch.is_grad_enabled():
            # `compute_routing_scores_for_aux_loss`: the scores over every expert (sigmoids
            # normalised per token) and their own plain top-k, before any drop.
            T, E = logits.shape
            if c.moe_router_score_function == "softmax":
                scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
            else:
                scores = torch.sigmoid(logits.float())
                scores = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
            aux_map = torch.zeros_like(scores, dtype=torch.bool).scatter(1, torch.topk(scores, self.topk, dim=1).indices, True)
            tokens_per_expert = aux_map.sum(dim=0).to(scores.dtype)
            aux = torch.sum(scores.sum(dim=0) * tokens_per_expert) * (E * c.moe_aux_loss_coeff / (T * T * self.topk))
            probs = MoEAuxLossAutoScaler.apply(probs, aux * per_token)
            save_to_aux_losses_tracker("load_balancing_loss", aux / c.moe_aux_loss_coeff,
                                       self.layer_number, num_layers)
        if self.expert_bias is not None and torch.is_grad_enabled():
            with torch.no_grad():
                self.local_tokens_per_expert += routing_map.sum(dim=0)
        return probs, routing_map


def finalize_expert_bias(model: nn.Module, group: Any = None) -> None:
    """`finalize_model_grads._update_router_expert_bias` + `reset_model_temporary_tensors`:
    the counts summed over the data-parallel group, each training router's bias moved by
    ``rate * sign(average - count)``, every router's counts zeroed."""
    routers = [m for m in model.modules() if isinstance(m, TopKRouter) and m.expert_bias is not None]
    training = [m for m in routers if m.training]
    if training:
        with torch.no_grad():
            counts = torch.stack([m.local_tokens_per_expert for m in training])
            if group is not None:
                torch.distributed.all_reduce(counts, group=group)
            average = counts.sum(dim=-1, keepdim=True) / counts.shape[-1]
            updated = torch.stack([m.expert_bias for m in training]) + torch.sign(average - counts) * \
                training[0].config.moe_router_bias_update_rate
            for m, b in zip(training, updated):
                m.expert_bias.copy_(b)
    for m in routers:
        m.local_tokens_per_expert.zero_()


class MoEAlltoAllTokenDispatcher:
    """One rank: tokens gathered per expert in expert order, scattered back gate-weighted."""

    def __init__(self, num_local_experts: int, config: TransformerConfig):
        self.num_local_experts = num_local_experts
        self.config = config

    def token_permutation(self, hidden_states, probs, routing_map):
        self.hidden_shape = hidden_states.shape
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        self.rows = [routing_map[:, e].nonzero().squeeze(1) for e in range(routing_map.shape[1])]
        self.probs = probs
        tokens = torch.cat([x[r] for r in self.rows])
        return tokens, torch.tensor([len(r) for r in self.rows])

    def token_unpermutation(self, expert_output, bias=None):
        if bias is not None:
            expert_output = expert_output + bias
        out = torch.zeros(self.hidden_shape[0] * self.hidden_shape[1], expert_output.shape[-1],
                          dtype=expert_output.dtype, device=expert_output.device)
        start = 0
        for e, r in enumerate(self.rows):
            part = expert_output[start:start + len(r)] * self.probs[r, e].unsqueeze(1).to(expert_output.dtype)
            out = out.index_add(0, r, part)
            start += len(r)
        return out.view(self.hidden_shape), None


def _act(config: TransformerConfig, x: torch.Tensor) -> torch.Tensor:
    if config.gated_linear_unit:
        a, b = torch.chunk(x, 2, dim=-1)
        return config.activation_func(a) * b
    return config.activation_func(x)


class MLP(nn.Module):
    def __init__(self, config: TransformerConfig, submodules: MLPSubmodules | None = None,
                 ffn_hidden_size: int | None = None, **kwargs: Any):
        super().__init__()
        self.config = config
        ffn_hidden_size = config.ffn_hidden_size if ffn_hidden_size is None else ffn_hidden_size
        f1 = ffn_hidden_size * (2 if config.gated_linear_unit else 1)
        self.linear_fc1 = ColumnParallelLinear(config.hidden_size, f1, config.add_bias_linear, skip_bias_add=True)
        self.linear_fc2 = RowParallelLinear(ffn_hidden_size, config.hidden_size, config.add_bias_linear, skip_bias_add=True)

    def forward(self, x):
        h, b1 = self.linear_fc1(x)
        if b1 is not None:
            h = h + b1
        return self.linear_fc2(_act(self.config, h))


class SharedExpertMLP(MLP):
    """Megatron's `SharedExpertMLP`: an MLP of ``moe_shared_expert_intermediate_size`` (no
    biases); with a gate, its output times ``sigmoid(x @ gate_weightᵀ)``. Returns a tensor."""

    def __init__(self, config: TransformerConfig, submodules: MLPSubmodules | None = None, gate: bool = False,
                 **kwargs: Any):
        assert not config.add_bias_linear, "bias is not supported in the shared experts"
        super().__init__(config, submodules, ffn_hidden_size=config.moe_shared_expert_intermediate_size)
        self.use_shared_expert_gate = gate
        self.gate_weight = nn.Parameter(torch.empty(1, config.hidden_size)) if gate else None

    def forward(self, hidden_states):
        output, _ = super().forward(hidden_states)
        if self.use_shared_expert_gate:
            output = output * torch.sigmoid(F.linear(hidden_states, self.gate_weight))
        return output


class SequentialMLP(nn.Module):
    def __init__(self, num_local_experts: int, config: TransformerConfig, submodules: Any = None):
        super().__init__()
        self.num_local_experts = num_local_experts
        self.local_experts = nn.ModuleList(MLP(config, ffn_hidden_size=config.moe_ffn_hidden_size)
                                           for _ in range(num_local_experts))

    def forward(self, permuted_local_hidden_states, tokens_per_expert):
        outs, biases = [], []
        for expert, tokens in zip(self.local_experts, torch.split(permuted_local_hidden_states, tokens_per_expert.tolist())):
            o, b = expert(tokens)
            outs.append(o)
            if b is not None:
                biases.append(b.expand_as(o))
        return torch.cat(outs), (torch.cat(biases) if biases else None)


class GroupedMLP(nn.Module):
    def __init__(self, num_local_experts: int, config: TransformerConfig, submodules: Any = None):
        super().__init__()
        assert not config.add_bias_linear, "bias is not supported in GroupedMLP (as in Megatron)"
        self.config = config
        self.num_local_experts = num_local_experts
        F_ = config.moe_ffn_hidden_size
        f1 = F_ * (2 if config.gated_linear_unit else 1)
        self.weight1 = nn.Parameter(torch.empty(config.hidden_size, num_local_experts * f1))
        self.weight2 = nn.Parameter(torch.empty(num_local_experts * F_, config.hidden_size))

    def forward(self, permuted_local_hidden_states, tokens_per_expert):
        H = self.config.hidden_size
        w1 = self.weight1.view(self.num_local_experts, H, -1)
        w2 = self.weight2.view(self.num_local_experts, -1, H)
        outs = [_act(self.config, tok @ w1[e]) @ w2[e]
                for e, tok in enumerate(torch.split(permuted_local_hidden_states, tokens_per_expert.tolist()))]
        return torch.cat(outs), None


class MoELayer(nn.Module):
    """One expert-parallel rank holds every expert here (``ep_group`` None); the EP test
    builds a rank's layer by slicing this one's experts (its reference is the EP=1 layer).
    The shared expert (when configured) runs on the same input and is added to the routed output."""

    def __init__(self, config: TransformerConfig, submodules: MoESubmodules | None = None, **kwargs: Any):
        super().__init__()
        submodules = submodules or MoESubmodules(experts=ModuleSpec(SequentialMLP), shared_experts=ModuleSpec(SharedExpertMLP))
        self.config = config
        E = config.num_moe_experts
        self.ep_group = None
        self.num_local_experts = E
        self.local_expert_indices = list(range(E))
        self.router = TopKRouter(config)
        self.experts = build_module(submodules.experts, E, config)
        self.token_dispatcher = MoEAlltoAllTokenDispatcher(E, config)
        self.shared_experts = None
        if config.moe_shared_expert_intermediate_size is not None:
            self.shared_experts = build_module(submodules.shared_experts, config=config,
                                               gate=config.moe_shared_expert_gate)

    def forward(self, hidden_states):
        shared = self.shared_experts(hidden_states) if self.shared_experts is not None else None
        probs, routing_map = self.router(hidden_states)
        tokens, tokens_per_expert = self.token_dispatcher.token_permutation(hidden_states, probs, routing_map)
        out, bias = self.experts(tokens, tokens_per_expert)
        output, bias = self.token_dispatcher.token_unpermutation(out, bias)
        if shared is not None:
            output = output + shared
        return output, bias


def bias_dropout_add(x_with_bias, residual, prob: float, training: bool):
    x, bias = x_with_bias
    if bias is not None:
        x = x + bias
    return residual + F.dropout(x, p=prob, training=training)


class TransformerLayer(nn.Module, BaseTransformerLayer):
    """Built from its `TransformerLayerSubmodules` (norm builders, the attention and MLP specs),
    as Megatron's; `layer_number` is 1-based."""

    def __init__(self, config: TransformerConfig, submodules: TransformerLayerSubmodules,
                 layer_number: int = 1, **kwargs: Any):
        super().__init__()
        self.config = config
        self.submodules_config = submodules
        self.layer_number = layer_number
        self.hidden_dropout = config.hidden_dropout
        H, eps = config.hidden_size, config.layernorm_epsilon
        self.input_layernorm = build_module(submodules.input_layernorm, config=config, hidden_size=H, eps=eps)
        self.self_attention = build_module(submodules.self_attention, config=config, layer_number=layer_number)
        self.pre_cross_attn_layernorm = IdentityOp()
        self.cross_attention = IdentityOp()
        self.pre_mlp_layernorm = build_module(submodules.pre_mlp_layernorm, config=config, hidden_size=H, eps=eps)
        self.mlp = build_module(submodules.mlp, config=config)
        if isinstance(self.mlp, MoELayer):
            self.mlp.router.set_layer_number(layer_number)

    def forward(self, hidden_states, attention_mask=None, context=None, context_mask=None,
                rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None, attention_bias=None,
                inference_context=None, packed_seq_params=None, sequence_len_offset=None, *,
                inference_params=None):
        residual = hidden_states
        attn_out = self.self_attention(self.input_layernorm(hidden_states), attention_mask=attention_mask,
                                       rotary_pos_emb=rotary_pos_emb)
        hidden_states = bias_dropout_add(attn_out, residual, self.hidden_dropout, self.training)
        residual = hidden_states
        mlp_out = self.mlp(self.pre_mlp_layernorm(hidden_states))
        output = bias_dropout_add(mlp_out, residual, self.hidden_dropout, self.training)
        return output, context


def get_gpt_layer_local_spec(num_experts: int | None = None, moe_grouped_gemm: bool = False,
                             qk_layernorm: bool = False, multi_latent_attention: bool = False,
                             normalization: str | None = None, **kwargs: Any) -> ModuleSpec:
    """Megatron's local spec of one layer (dense when ``num_experts`` is None)."""
    assert not multi_latent_attention
    norm = WrappedTorchNorm
    if num_experts is None:
        mlp = ModuleSpec(MLP, submodules=MLPSubmodules(ColumnParallelLinear, RowParallelLinear))
    else:
        mlp = ModuleSpec(MoELayer, submodules=MoESubmodules(
            experts=ModuleSpec(GroupedMLP if moe_grouped_gemm else SequentialMLP),
            shared_experts=ModuleSpec(SharedExpertMLP)))
    return ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        input_layernorm=norm,
        self_attention=ModuleSpec(SelfAttention, params={"attn_mask_type": AttnMaskType.causal},
                                  submodules=SelfAttentionSubmodules(
                                      ColumnParallelLinear, DotProductAttention, RowParallelLinear,
                                      q_layernorm=norm if qk_layernorm else IdentityOp,
                                      k_layernorm=norm if qk_layernorm else IdentityOp)),
        pre_mlp_layernorm=norm,
        mlp=mlp))


def _block_submodules(config: TransformerConfig, spec: Any) -> TransformerBlockSubmodules:
    """Megatron's `_get_block_submodules`: block submodules as given, or a layer spec fanned out."""
    if isinstance(spec, TransformerBlockSubmodules):
        return spec
    if isinstance(spec, ModuleSpec) and issubclass(spec.module, BaseTransformerLayer):
        return TransformerBlockSubmodules(layer_specs=[spec] * config.num_layers, layer_norm=WrappedTorchNorm)
    raise Exception(f"specialize for {type(spec).__name__}.")


class TransformerBlock(nn.Module):
    def __init__(self, config: TransformerConfig, spec: Any):
        super().__init__()
        submodules = _block_submodules(config, spec)
        self.layers = nn.ModuleList(build_module(s, config=config, layer_number=i + 1)
                                    for i, s in enumerate(submodules.layer_specs))
        self.final_layernorm = make_norm(config)

    def forward(self, hidden_states, attention_mask=None, rotary_pos_emb=None):
        for layer in self.layers:
            hidden_states, _ = layer(hidden_states=hidden_states, attention_mask=attention_mask,
                                     context=None, context_mask=None, rotary_pos_emb=rotary_pos_emb,
                                     rotary_pos_cos=None, rotary_pos_sin=None, attention_bias=None,
                                     inference_context=None, packed_seq_params=None, sequence_len_offset=None)
        return self.final_layernorm(hidden_states)


class LanguageModelEmbedding(nn.Module):
    def __init__(self, config: TransformerConfig, vocab_size: int):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, config.hidden_size)

    def forward(self, input_ids):
        return self.word_embeddings(input_ids).transpose(0, 1).contiguous()


class GPTModel(nn.Module):
    """``forward(input_ids [b, s], position_ids, attention_mask, labels) -> per-token loss [b, s]``
    (logits [b, s, V] without labels), like Megatron-Core's GPTModel.

    ``transformer_layer_spec``: a layer `ModuleSpec` or `TransformerBlockSubmodules` (Megatron's
    argument); None builds the local spec of every layer (``grouped``: GroupedMLP experts;
    ``dense_layers``: 0-based indices of dense layers)."""

    def __init__(self, config: TransformerConfig, transformer_layer_spec: Any = None, vocab_size: int = 64,
                 max_sequence_length: int = 64, grouped: bool = False, rotary_base: float = 10000.0,
                 dense_layers: tuple[int, ...] = (), seed: int = 0, **kwargs: Any):
        super().__init__()
        self.config = config
        if transformer_layer_spec is None:
            transformer_layer_spec = TransformerBlockSubmodules(layer_specs=[
                get_gpt_layer_local_spec(None if i in dense_layers else config.num_moe_experts, grouped,
                                         config.qk_layernorm, normalization=config.normalization)
                for i in range(config.num_layers)])
        self.embedding = LanguageModelEmbedding(config, vocab_size)
        self.rotary_pos_emb = RotaryEmbedding(config.kv_channels, rotary_base)
        self.decoder = TransformerBlock(config, transformer_layer_spec)
        self.output_layer = ColumnParallelLinear(config.hidden_size, vocab_size, bias=False)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                    p.fill_(1.0)
                elif name.endswith("bias"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * config.init_method_std)

    def forward(self, input_ids, position_ids=None, attention_mask=None, labels=None):
        h = self.embedding(input_ids)
        h = self.decoder(h, attention_mask=attention_mask, rotary_pos_emb=self.rotary_pos_emb(h.shape[0]))
        logits, _ = self.output_layer(h)  # [s, b, V]
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.t().reshape(-1), reduction="none")
        return loss.view(labels.shape[1], labels.shape[0]).t().contiguous()


# --------------------------------------------------------------------------- Megatron's import paths

_PATHS = {
    "megatron": [], "megatron.core": [], "megatron.core.transformer": [], "megatron.core.models": [],
    "megatron.core.transformer.moe": [],
    "megatron.core.transformer.spec_utils": ["ModuleSpec", "build_module", "import_module"],
    "megatron.core.transformer.transformer_config": ["TransformerConfig"],
    "megatron.core.transformer.transformer_layer": ["TransformerLayer", "TransformerLayerSubmodules",
                                                    "BaseTransformerLayer"],
    "megatron.core.transformer.transformer_block": ["TransformerBlock", "TransformerBlockSubmodules"],
    "megatron.core.transformer.moe.moe_utils": ["MoEAuxLossAutoScaler", "save_to_aux_losses_tracker"],
    "megatron.core.models.gpt": ["GPTModel"],
    "megatron.core.models.gpt.gpt_layer_specs": ["get_gpt_layer_local_spec"],
}


@contextlib.contextmanager
def megatron_modules():
    """This double importable as Megatron-Core (``megatron.core.transformer.spec_utils`` and the
    rest of `_PATHS`) for the duration; ``ampipe.megatron``, which imports them, is forgotten
    afterwards too."""
    if "megatron" in sys.modules:
        raise RuntimeError("megatron is imported for real here; the double would shadow it")
    this = sys.modules[__name__]
    for name, attrs in _PATHS.items():
        mod = types.ModuleType(name)
        mod.__path__ = []  # a package, so submodules resolve
        for a in attrs:
            setattr(mod, a, getattr(this, a))
        sys.modules[name] = mod
    try:
        yield
    finally:
        for name in [*_PATHS, "ampipe.megatron"]:
            sys.modules.pop(name, None)
