"""The model section of the experiment config, in Python (docs/contracts.md §1).

`ModelConfig` has the fields of the TypeScript schema, whose defaults and per-field checks it
takes from the exported schema (`ampipe.config_schema`), so a Python-only user gets the same
defaults and errors: every `ConfigError` names the field it is about. The checks that tie
fields together are written here with src/config/schema.ts's wording. The checks run in
`__post_init__`, i.e. before any parameter is allocated. The one check that needs the parallel
layout (experts divisible by the expert-parallel size) is `ModelConfig.check_parallel`, called
by the model before it allocates anything.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from ..config_schema import SCHEMA, ConfigError, check_fields, defaults
from ..wire import expert_capacity

__all__ = ["ConfigError", "ModelConfig", "TORCH_DTYPES", "DROP_POLICIES", "CAPACITY_SCOPES",
           "check_capacity_scope"]

TORCH_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}

SCORE_FUNCTIONS = tuple(SCHEMA["properties"]["model"]["properties"]["moe_router_score_function"]["enum"])
DROP_POLICIES = tuple(SCHEMA["properties"]["model"]["properties"]["moe_token_drop_policy"]["enum"])
_D = defaults("model")


# `pipeline.capacity_scope`: where a capacity is sized in the pipelined block (docs/model.md).
CAPACITY_SCOPES = tuple(SCHEMA["properties"]["pipeline"]["properties"]["capacity_scope"]["enum"])


def check_capacity_scope(scope: str, drop_policy: str) -> None:
    """`pipeline.capacity_scope` against `model.moe_token_drop_policy` (the wording of
    src/config/schema.ts): `sequence` is exact only with `position`, whose drops in chunk c
    follow from the earlier chunks alone; with `probs` they depend on later chunks too."""
    if scope not in CAPACITY_SCOPES:
        raise ConfigError("pipeline.capacity_scope", f"must be one of {', '.join(CAPACITY_SCOPES)}; got {scope!r}")
    if scope == "sequence" and drop_policy != "position":
        raise ConfigError(
            "pipeline.capacity_scope",
            "sequence needs model.moe_token_drop_policy: position (with probs, which tokens a chunk "
            f"drops depends on later chunks); got model.moe_token_drop_policy: {drop_policy}")


@dataclass
class ModelConfig:
    """A Megatron-style GPT-MoE stack. Field names are Megatron-LM's flag names."""

    num_layers: int = _D["num_layers"]
    hidden_size: int = _D["hidden_size"]
    num_attention_heads: int = _D["num_attention_heads"]
    num_query_groups: int | None = _D["num_query_groups"]  # GQA groups; None = num_attention_heads
    kv_channels: int | None = _D["kv_channels"]  # head dim; None = hidden_size / num_attention_heads
    seq_length: int = _D["seq_length"]
    micro_batch_size: int = _D["micro_batch_size"]
    vocab_size: int = _D["vocab_size"]
    ffn_hidden_size: int = _D["ffn_hidden_size"]  # dense MLP layers
    normalization: str = _D["normalization"]  # LayerNorm | RMSNorm
    norm_epsilon: float = _D["norm_epsilon"]
    position_embedding_type: str = _D["position_embedding_type"]  # learned_absolute | rope
    rotary_base: float = _D["rotary_base"]
    attention_dropout: float = _D["attention_dropout"]
    hidden_dropout: float = _D["hidden_dropout"]
    add_bias_linear: bool = _D["add_bias_linear"]
    untie_embeddings_and_output_weights: bool = _D["untie_embeddings_and_output_weights"]
    init_method_std: float = _D["init_method_std"]
    num_experts: int = _D["num_experts"]
    moe_layer_freq: int = _D["moe_layer_freq"]  # layer i is MoE when i % moe_layer_freq == 0 (Megatron)
    moe_router_topk: int = _D["moe_router_topk"]
    moe_router_score_order: str = _D["moe_router_score_order"]  # | topk_then_softmax
    moe_router_topk_renormalize: bool = _D["moe_router_topk_renormalize"]
    # Megatron's router options (same names and semantics; docs/model.md, Router):
    # sigmoid scores (then the gates are the chosen scores normalised to sum 1 for top-k > 1,
    # and score_order/renormalize do not apply), a per-expert bias that changes which experts
    # are chosen but not the gates (aux-loss-free balancing, sigmoid only), updated after each
    # step from the step's per-expert counts at this rate, a factor on the gates, and
    # group-limited top-k (experts in `num_groups` groups; each token picks `group_topk` groups
    # by the sum of their top-(k/group_topk) scores, then its k experts inside them).
    moe_router_score_function: str = _D["moe_router_score_function"]  # softmax | sigmoid
    moe_router_enable_expert_bias: bool = _D["moe_router_enable_expert_bias"]
    moe_router_bias_update_rate: float = _D["moe_router_bias_update_rate"]
    moe_router_topk_scaling_factor: float | None = _D["moe_router_topk_scaling_factor"]
    moe_router_num_groups: int | None = _D["moe_router_num_groups"]
    moe_router_group_topk: int | None = _D["moe_router_group_topk"]
    moe_expert_capacity_factor: float | None = _D["moe_expert_capacity_factor"]  # None = dropless
    # Which slots a full expert drops (Megatron's flag): probs keeps the highest gates,
    # position the earliest tokens. Only with a capacity factor.
    moe_token_drop_policy: str = _D["moe_token_drop_policy"]  # probs | position
    moe_aux_loss_coeff: float = _D["moe_aux_loss_coeff"]
    moe_z_loss_coeff: float = _D["moe_z_loss_coeff"]
    moe_ffn_hidden_size: int = _D["moe_ffn_hidden_size"]
    moe_expert_activation: str = _D["moe_expert_activation"]  # gelu | swiglu (dense MLP layers use it too)
    # A dense expert every token goes through beside the routed ones (Megatron's shared
    # experts: FFN width, same activation, no biases), its output optionally scaled by
    # sigmoid(x @ gate_weight^T) (`moe_shared_expert_gate`). None = no shared expert.
    moe_shared_expert_intermediate_size: int | None = _D["moe_shared_expert_intermediate_size"]
    moe_shared_expert_gate: bool = _D["moe_shared_expert_gate"]
    # LayerNorm/RMSNorm (model.normalization) of each query and key head before rope.
    qk_layernorm: bool = _D["qk_layernorm"]
    dtype: str = _D["dtype"]  # fp32 | bf16 | fp16 (autocast; parameters stay fp32)

    # Not part of the schema: where the errors point, for configs nested under another key.
    _prefix: str = field(default="model", repr=False, compare=False)

    def __post_init__(self) -> None:
        self._check()

    # ----------------------------------------------------------------- construction

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, strict: bool = True, prefix: str = "model") -> "ModelConfig":
        """Build from the `model` section (a resolved or partial dict; missing keys take defaults).

        Unknown keys are an error naming the key (``strict=False`` ignores them), as in the
        TypeScript schema. A whole experiment config (with a ``model`` key) is accepted too.
        """
        if not isinstance(d, Mapping):
            raise ConfigError(prefix, f"expected a mapping, got {type(d).__name__}")
        if "model" in d and isinstance(d["model"], Mapping):
            d = d["model"]
        known = set(cls.field_names())
        unknown = sorted(k for k in d if k not in known)
        if unknown and strict:
            raise ConfigError(f"{prefix}.{unknown[0]}", "unknown field (known: " + ", ".join(sorted(known)) + ")")
        return cls(**{k: v for k, v in d.items() if k in known}, _prefix=prefix)

    def to_dict(self) -> dict[str, Any]:
        """The `model` section with derived fields resolved (what TypeScript hands over)."""
        out = {n: getattr(self, n) for n in self.field_names()}
        out["num_query_groups"] = self.query_groups
        out["kv_channels"] = self.head_dim
        return out

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------- derived values

    @property
    def head_dim(self) -> int:
        return self.kv_channels if self.kv_channels is not None else self.hidden_size // self.num_attention_heads

    @property
    def query_groups(self) -> int:
        return self.num_query_groups if self.num_query_groups is not None else self.num_attention_heads

    @property
    def dropless(self) -> bool:
        return self.moe_expert_capacity_factor is None

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]

    def is_moe_layer(self, layer_number: int) -> bool:
        """Whether layer `layer_number` (0-based) is an MoE layer: Megatron's `i % freq == 0`."""
        return layer_number % self.moe_layer_freq == 0

    def expert_capacity(self, num_tokens: int) -> int | None:
        """Slots per expert for a chunk of `num_tokens` tokens: ceil(T * K / E * cf); None = dropless.

        Evaluated in Megatron's order (`get_capacity`: ``ceil((T*K / E) * cf)``), so a value
        that rounds to just above an integer rounds the same way in both."""
        return expert_capacity(num_tokens, self.moe_router_topk, self.num_experts, self.moe_expert_capacity_factor)

    @property
    def has_shared_expert(self) -> bool:
        return self.moe_shared_expert_intermediate_size is not None

    # ----------------------------------------------------------------- checks

    def _fail(self, name: str, message: str) -> None:
        raise ConfigError(f"{self._prefix}.{name}", message)

    def _check(self) -> None:
        # Each field against the schema (types, ranges, choices); integral floats become ints.
        for name, v in check_fields("model", {n: getattr(self, n) for n in self.field_names()},
                                    self._prefix).items():
            object.__setattr__(self, name, v)

        # The invariants that tie fields together (same wording as src/config/schema.ts).
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads != 0:
            self._fail(
                "num_attention_heads",
                f"must divide model.hidden_size ({self.hidden_size}) unless model.kv_channels is given; "
                f"got {self.num_attention_heads}",
            )
        if self.num_query_groups is not None and self.num_attention_heads % self.num_query_groups != 0:
            self._fail(
                "num_query_groups",
                f"must divide model.num_attention_heads ({self.num_attention_heads}); got {self.num_query_groups}",
            )
        if self.moe_router_topk > self.num_experts:
            self._fail("moe_router_topk", f"must be <= model.num_experts ({self.num_experts}); got {self.moe_router_topk}")
        self._check_router()
        if self.moe_shared_expert_gate and self.moe_shared_expert_intermediate_size is None:
            self._fail("moe_shared_expert_gate", "needs model.moe_shared_expert_intermediate_size (a shared expert to gate)")
        if self.moe_shared_expert_intermediate_size is not None and self.add_bias_linear:
            self._fail("moe_shared_expert_intermediate_size",
                       "shared experts have no biases (as in Megatron): needs model.add_bias_linear false")
        if self.moe_layer_freq > self.num_layers:
            self._fail("moe_layer_freq", f"must be <= model.num_layers ({self.num_layers}); got {self.moe_layer_freq}")
        if self.position_embedding_type == "rope" and self.head_dim % 2 != 0:
            self._fail("kv_channels", f"rotary embeddings need an even head dim; got {self.head_dim}")

    def _check_router(self) -> None:
        """The router options together (Megatron's TransformerConfig rules, and what group-limited
        top-k needs to choose k experts at all)."""
        if self.moe_router_enable_expert_bias and self.moe_router_score_function != "sigmoid":
            self._fail("moe_router_enable_expert_bias",
                       f"needs model.moe_router_score_function: sigmoid (as in Megatron); got "
                       f"{self.moe_router_score_function}")
        G, Gk, E, K = self.moe_router_num_groups, self.moe_router_group_topk, self.num_experts, self.moe_router_topk
        if Gk is None:
            return
        if G is None:
            self._fail("moe_router_group_topk", "needs model.moe_router_num_groups (group-limited routing)")
        if E % G != 0:
            self._fail("moe_router_num_groups", f"must divide model.num_experts ({E}); got {G}")
        if Gk > G:
            self._fail("moe_router_group_topk", f"must be <= model.moe_router_num_groups ({G}); got {Gk}")
        if K > Gk * (E // G):
            self._fail("moe_router_group_topk",
                       f"{Gk} group(s) of {E // G} experts cannot hold model.moe_router_topk ({K}) experts")

    def check_parallel(self, expert_model_parallel_size: int, world_size: int | None = None) -> None:
        """The checks that need the parallel layout (names the parallelism field when it is at fault)."""
        ep = expert_model_parallel_size
        if isinstance(ep, bool) or not isinstance(ep, int) or ep < 1:
            raise ConfigError("parallelism.expert_model_parallel_size", f"must be a positive integer; got {ep!r}")
        if self.num_experts % ep != 0:
            self._fail(
                "num_experts",
                f"must be divisible by parallelism.expert_model_parallel_size ({ep}); got {self.num_experts}",
            )
        if world_size is not None and world_size % ep != 0:
            raise ConfigError(
                "parallelism.world_size",
                f"must be divisible by parallelism.expert_model_parallel_size ({ep}); got {world_size}",
            )
