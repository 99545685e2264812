"""Megatron-Core's `TransformerLayer` (local spec, `get_gpt_layer_local_spec`) as a `LayerAdapter`.

Nothing from Megatron is imported at module load (nor at all, unless the layer's router
module does not carry `MoEAuxLossAutoScaler`): the adapter duck-types on the layer's
attribute paths and its `config` (a `TransformerConfig`), and refuses a layer it does not
recognise or cannot run exactly, naming the attribute or config field.

What it reads (megatron-core 0.20):

- ``input_layernorm``, ``pre_mlp_layernorm`` (RMSNorm or LayerNorm), called as they are;
- ``self_attention.linear_qkv`` (weight ``[(heads + 2·groups)·d, H]``, per-query-group rows:
  ampipe's layout) and ``self_attention.linear_proj``; both return ``(output, bias)``, the
  bias (when returned apart) is added; ``self_attention.core_attention`` must be causal
  (``attn_mask_type``); ampipe's chunked attention replaces it;
- ``mlp.router.weight [E, H]``; ``mlp.experts`` as ``GroupedMLP`` (``weight1 [H, E·F1]``,
  ``weight2 [E·F, H]``, ampipe's layout, viewed) or ``SequentialMLP``
  (``local_experts.i.linear_fc1.weight [F1, H]``, ``linear_fc2.weight [H, F]``, stacked
  and transposed at each experts op: a temporary copy per chunk, differentiable, so the
  gradients reach the experts' own parameters);
  ``mlp.token_dispatcher`` is not used (ampipe permutes and exchanges the tokens itself);
- with the config saying so: ``self_attention.q_layernorm``/``k_layernorm`` (QK layernorm,
  before rope), ``mlp.shared_experts`` (called as it is; gated when
  ``moe_shared_expert_gate``), ``mlp.router.expert_bias`` (chooses experts, sigmoid scores)
  and ``mlp.router.local_tokens_per_expert`` (each call's kept slots are added, as
  Megatron's router does, so its ``finalize_model_grads`` updates the bias); the router's
  score function, scaling factor, group-limited top-k and capacity come from the config;
- the call ``layer(hidden_states [s, b, H], attention_mask=None, rotary_pos_emb=freqs [s, 1, 1, d], ...)``
  returning ``(output, context)``; rope is applied non-interleaved (`rotate_half`) from the
  caller's angles;
- the aux and z-losses go where Megatron's router puts them: through
  ``MoEAuxLossAutoScaler.apply`` onto the activations (the layer output here) when
  training, and into the aux-loss tracker (``save_to_aux_losses_tracker``) as
  ``load_balancing_loss`` and ``z_loss`` divided by their coefficients. Both are found in
  the router's own module (where Megatron's router imports them).
"""

from __future__ import annotations

import importlib
import math
import sys
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..model.adapter import ExpertWeights, NotSwappable
from ..model.config import ConfigError, ModelConfig
from ..parallel.groups import ExpertParallel

__all__ = ["MegatronLayerAdapter", "model_config_from_megatron"]

_MOE_UTILS = "megatron.core.transformer.moe.moe_utils"


def _path(root: Any, dotted: str) -> Any:
    obj = root
    for i, part in enumerate(dotted.split(".")):
        if not hasattr(obj, part):
            raise NotSwappable(f"no attribute '{'.'.join(dotted.split('.')[:i + 1])}' "
                               f"(not a Megatron-Core local-spec TransformerLayer)")
        obj = getattr(obj, part)
    return obj


def _opt(cfg: Any, name: str, default: Any = None) -> Any:
    return getattr(cfg, name, default)


def _activation_kind(cfg: Any) -> str:
    fn = _opt(cfg, "activation_func", F.gelu)
    name = getattr(fn, "__name__", type(fn).__name__)
    glu = bool(_opt(cfg, "gated_linear_unit", False))
    if glu and (fn is F.silu or name == "silu"):
        return "swiglu"
    if not glu and (fn is F.gelu or name == "gelu"):
        return "gelu"
    raise NotSwappable(f"config.activation_func={name} with config.gated_linear_unit={glu}: "
                       f"ampipe's experts run SwiGLU (silu, gated) or GeLU (not gated) only")


def model_config_from_megatron(cfg: Any) -> ModelConfig:
    """A `TransformerConfig` read into ampipe's `ModelConfig` (what the block pieces read).

    Raises `NotSwappable` naming the ``config.<field>`` that ampipe's block cannot run
    exactly (a different function, or a parallel layout it does not handle)."""
    for name in ("hidden_size", "num_attention_heads", "num_moe_experts", "moe_router_topk"):
        if _opt(cfg, name) is None:
            raise NotSwappable(f"config.{name} is missing or None (not an MoE TransformerConfig)")
    refuse_if = [
        ("tensor_model_parallel_size", lambda v: (v or 1) > 1, "tensor parallelism is not supported"),
        ("context_parallel_size", lambda v: (v or 1) > 1, "context parallelism is not supported"),
        ("sequence_parallel", bool, "sequence parallelism is not supported"),
        ("expert_tensor_parallel_size", lambda v: (v or 1) > 1, "expert tensor parallelism is not supported"),
        ("moe_router_score_function", lambda v: (v or "softmax") not in ("softmax", "sigmoid"),
         "only softmax and sigmoid scores are implemented"),
        ("moe_router_dtype", lambda v: v not in (None, "fp32"),
         "ampipe computes the router in fp32 (moe_router_dtype None or fp32)"),
        ("moe_pad_expert_input_to_capacity", bool, "padding to capacity is not implemented"),
        ("moe_router_load_balancing_type", lambda v: (v or "aux_loss") not in ("aux_loss", "none"),
         "only the switch load-balancing loss ('aux_loss') is implemented"),
        ("moe_input_jitter_eps", lambda v: v is not None, "input jitter is not implemented"),
        ("moe_router_force_load_balancing", bool, "random (benchmark) routing is not implemented"),
        ("moe_router_force_biased", lambda v: v is not None, "random (benchmark) routing is not implemented"),
        ("moe_enable_routing_replay", bool, "routing replay is not implemented"),
        ("use_grouped_gemm_for_shared_expert", bool,
         "the fused shared expert (FusedSharedExpertMLP) is not implemented"),
        ("rotary_interleaved", bool, "interleaved rope is not implemented (Megatron's default rotate_half is)"),
        ("qk_l2_norm", bool, "L2 QK normalisation is not implemented (qk_layernorm is)"),
        ("attention_output_gate", bool, "a gated attention output is not implemented"),
        ("multi_latent_attention", bool, "multi-latent attention is not implemented"),
        ("fp8", lambda v: bool(v), "fp8 is not supported"),
        ("moe_latent_size", lambda v: bool(v), "latent MoE projections are not implemented"),
        ("moe_apply_probs_on_input", bool, "applying the gates to the expert input is not implemented"),
    ]
    for name, bad, why in refuse_if:
        v = _opt(cfg, name)
        if bad(v):
            raise NotSwappable(f"config.{name}={v!r}: {why}")
    heads = int(cfg.num_attention_heads)
    d = int(_opt(cfg, "kv_channels") or cfg.hidden_size // heads)
    scale = _opt(cfg, "softmax_scale")
    if scale is not None and not math.isclose(scale, d ** -0.5, rel_tol=1e-6):
        raise NotSwappable(f"config.softmax_scale={scale}: ampipe's attention scales by 1/sqrt(kv_channels)")
    aux = _opt(cfg, "moe_aux_loss_coeff", 0.0) or 0.0
    if isinstance(aux, (list, tuple)):
        if len(aux) != 1:
            raise NotSwappable(f"config.moe_aux_loss_coeff={aux!r}: one coefficient expected")
        aux = aux[0]
    if (_opt(cfg, "moe_router_load_balancing_type") or "aux_loss") == "none":
        aux = 0.0
    bf16, fp16 = bool(_opt(cfg, "bf16", False)), bool(_opt(cfg, "fp16", False))
    norm = _opt(cfg, "normalization", "LayerNorm")
    try:
        return ModelConfig(
            num_layers=int(_opt(cfg, "num_layers", 1) or 1),
            hidden_size=int(cfg.hidden_size),
            num_attention_heads=heads,
            num_query_groups=int(_opt(cfg, "num_query_groups") or heads),
            kv_channels=d,
            ffn_hidden_size=int(_opt(cfg, "ffn_hidden_size") or 4 * cfg.hidden_size),
            normalization=norm,
            norm_epsilon=float(_opt(cfg, "layernorm_epsilon", 1e-5)),
            # The layer applies no rope of its own: the angles come with each call
            # (`rotary_pos_emb`), and are used when given.
            position_embedding_type="learned_absolute",
            attention_dropout=float(_opt(cfg, "attention_dropout", 0.0)),
            hidden_dropout=float(_opt(cfg, "hidden_dropout", 0.0)),
            add_bias_linear=bool(_opt(cfg, "add_bias_linear", True)),
            num_experts=int(cfg.num_moe_experts),
            moe_router_topk=int(cfg.moe_router_topk),
            # pre_softmax False: top-k on the logits, then softmax over the k (Megatron's default).
            moe_router_score_order="softmax_then_topk" if _opt(cfg, "moe_router_pre_softmax", False)
            else "topk_then_softmax",
            moe_router_topk_renormalize=False,
            moe_router_score_function=_opt(cfg, "moe_router_score_function") or "softmax",
            moe_router_enable_expert_bias=bool(_opt(cfg, "moe_router_enable_expert_bias", False)),
            moe_router_bias_update_rate=float(_opt(cfg, "moe_router_bias_update_rate", 1e-3)),
            moe_router_topk_scaling_factor=_opt(cfg, "moe_router_topk_scaling_factor"),
            # Megatron groups only when group_topk is set (num_groups alone does nothing).
            moe_router_num_groups=_opt(cfg, "moe_router_num_groups") if _opt(cfg, "moe_router_group_topk") else None,
            moe_router_group_topk=_opt(cfg, "moe_router_group_topk") or None,
            # A capacity is sized over each call's tokens, dropping by Megatron's policy (the
            # pipelined block: per chunk, or exactly with capacity_scope sequence + position).
            moe_expert_capacity_factor=_capacity_factor(cfg),
            moe_token_drop_policy=_opt(cfg, "moe_token_drop_policy") or "probs",
            moe_shared_expert_intermediate_size=_opt(cfg, "moe_shared_expert_intermediate_size"),
            moe_shared_expert_gate=bool(_opt(cfg, "moe_shared_expert_gate", False))
            and _opt(cfg, "moe_shared_expert_intermediate_size") is not None,
            qk_layernorm=bool(_opt(cfg, "qk_layernorm", False)),
            moe_aux_loss_coeff=float(aux),
            moe_z_loss_coeff=float(_opt(cfg, "moe_z_loss_coeff") or 0.0),
            moe_ffn_hidden_size=int(_opt(cfg, "moe_ffn_hidden_size") or _opt(cfg, "ffn_hidden_size")),
            moe_expert_activation=_activation_kind(cfg),
            dtype="bf16" if bf16 else "fp16" if fp16 else "fp32",
            _prefix="config",
        )
    except ConfigError as e:
        raise NotSwappable(f"{e} (read from the layer's TransformerConfig)") from None


def _capacity_factor(cfg: Any) -> float | None:
    """Megatron treats a negative capacity factor as none (TransformerConfig.__post_init__)."""
    cf = _opt(cfg, "moe_expert_capacity_factor")
    return None if cf is None or cf < 0 else float(cf)


def _moe_utils(router: nn.Module) -> tuple[Any, Callable[..., Any] | None]:
    """`MoEAuxLossAutoScaler` and `save_to_aux_losses_tracker` as the router sees them: from
    the router's own module (Megatron's router.py imports both), else from Megatron."""
    mod = sys.modules.get(type(router).__module__)
    scaler = getattr(mod, "MoEAuxLossAutoScaler", None)
    tracker = getattr(mod, "save_to_aux_losses_tracker", None)
    if scaler is None:
        try:
            utils = importlib.import_module(_MOE_UTILS)
        except ImportError:
            raise NotSwappable(f"mlp.router: {type(router).__module__} has no MoEAuxLossAutoScaler "
                               f"and {_MOE_UTILS} cannot be imported (the aux losses would have "
                               f"no gradient path)") from None
        scaler = utils.MoEAuxLossAutoScaler
        tracker = getattr(utils, "save_to_aux_losses_tracker", None)
    return scaler, tracker


def _unbias(out: Any) -> torch.Tensor:
    """A Megatron linear's ``(output, bias)`` as one tensor (bias added when returned apart)."""
    if isinstance(out, tuple):
        y, bias = out[0], out[1] if len(out) > 1 else None
        return y if bias is None else y + bias
    return out


def _is_causal(mask_type: Any) -> bool:
    return getattr(mask_type, "name", str(mask_type)).split(".")[-1] == "causal"


class MegatronLayerAdapter:
    """A Megatron-Core MoE `TransformerLayer` read for the block pieces (see the module doc)."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        for p in ("input_layernorm", "self_attention.linear_qkv", "self_attention.linear_proj",
                  "self_attention.core_attention", "pre_mlp_layernorm", "mlp.router",
                  "mlp.experts", "mlp.token_dispatcher"):
            _path(layer, p)
        mcfg = _path(layer, "config")
        self.cfg = model_config_from_megatron(mcfg)
        self.attention_backend = "auto"
        self._ep = self._expert_parallel(layer, mcfg)
        # Megatron's router scales the aux losses by the local token count under per-token loss.
        self._per_token_loss = bool(_opt(mcfg, "calculate_per_token_loss", False))
        self._tracked_layers = self.cfg.num_layers + int(_opt(mcfg, "mtp_num_layers") or 0)
        cfg = self.cfg
        H, heads, g, d = cfg.hidden_size, cfg.num_attention_heads, cfg.query_groups, cfg.head_dim
        attn = layer.self_attention
        self._check_shape("self_attention.linear_qkv.weight", _path(attn, "linear_qkv.weight"),
                          ((heads + 2 * g) * d, H))
        self._check_shape("self_attention.linear_proj.weight", _path(attn, "linear_proj.weight"),
                          (H, heads * d))
        mask_type = getattr(attn, "attn_mask_type", getattr(attn.core_attention, "attn_mask_type", None))
        if mask_type is None or not _is_causal(mask_type):
            raise NotSwappable(f"self_attention.attn_mask_type={mask_type}: the pipelined block is causal")
        self._check_qk_norms(attn, cfg)
        self._check_shared_experts(layer.mlp, cfg)
        self._check_shape("mlp.router.weight", _path(layer, "mlp.router.weight"), (cfg.num_experts, H))
        if getattr(layer.mlp.router, "bias", None) is not None:
            raise NotSwappable("mlp.router.bias: a router bias is not implemented")
        if cfg.moe_router_enable_expert_bias:
            for name in ("expert_bias", "local_tokens_per_expert"):
                t = getattr(layer.mlp.router, name, None)
                if not isinstance(t, torch.Tensor):
                    raise NotSwappable(f"config.moe_router_enable_expert_bias=True but mlp.router.{name} "
                                       f"is not a tensor")
                self._check_shape(f"mlp.router.{name}", t, (cfg.num_experts,))
        experts = layer.mlp.experts
        F1 = cfg.moe_ffn_hidden_size * (2 if cfg.moe_expert_activation == "swiglu" else 1)
        F_ = cfg.moe_ffn_hidden_size
        E = cfg.num_experts // self._ep.size  # this rank's experts
        if hasattr(experts, "weight1") and hasattr(experts, "weight2"):
            self.experts_kind = "GroupedMLP"
            self._check_shape("mlp.experts.weight1", experts.weight1, (H, E * F1))
            self._check_shape("mlp.experts.weight2", experts.weight2, (E * F_, H))
        elif hasattr(experts, "local_experts"):
            self.experts_kind = "SequentialMLP"
            if len(experts.local_experts) != E:
                raise NotSwappable(f"mlp.experts.local_experts: {len(experts.local_experts)} experts; "
                                   f"config.num_moe_experts={cfg.num_experts} over {self._ep.size} "
                                   f"expert-parallel rank(s) means {E}")
            for i, e in enumerate(experts.local_experts):
                self._check_shape(f"mlp.experts.local_experts.{i}.linear_fc1.weight",
                                  _path(e, "linear_fc1.weight"), (F1, H))
                self._check_shape(f"mlp.experts.local_experts.{i}.linear_fc2.weight",
                                  _path(e, "linear_fc2.weight"), (H, F_))
        else:
            raise NotSwappable("mlp.experts: neither a GroupedMLP (weight1, weight2) nor a "
                               "SequentialMLP (local_experts)")
        self._scaler, self._tracker = _moe_utils(layer.mlp.router)

    @staticmethod
    def _expert_parallel(layer: nn.Module, mcfg: Any) -> ExpertParallel:
        """The experts' expert-parallel group: Megatron's MoE layer keeps it as ``mlp.ep_group``
        and its experts as ``mlp.local_expert_indices`` (rank r holds ``[r·E/R, (r+1)·E/R)``,
        ampipe's layout)."""
        size = int(_opt(mcfg, "expert_model_parallel_size") or 1)
        group = getattr(layer.mlp, "ep_group", None)
        if size == 1:
            return ExpertParallel.single()
        if group is None:
            raise NotSwappable(f"config.expert_model_parallel_size={size} but the layer has no "
                               f"mlp.ep_group (the expert-parallel process group)")
        import torch.distributed as dist

        got, rank = dist.get_world_size(group), dist.get_rank(group)
        if got != size:
            raise NotSwappable(f"mlp.ep_group has {got} ranks, config.expert_model_parallel_size={size}")
        El = mcfg.num_moe_experts // size
        want = list(range(rank * El, (rank + 1) * El))
        have = getattr(layer.mlp, "local_expert_indices", want)
        if list(have) != want:
            raise NotSwappable(f"mlp.local_expert_indices={list(have)}: expected {want} on "
                               f"expert-parallel rank {rank}")
        return ExpertParallel(group=group, size=size, rank=rank)

    @classmethod
    def _check_qk_norms(cls, attn: nn.Module, cfg: ModelConfig) -> None:
        """``q_layernorm``/``k_layernorm`` present (per head: weight [d]) exactly when the
        config says qk_layernorm."""
        for name in ("q_layernorm", "k_layernorm"):
            norm = getattr(attn, name, None)
            if not cfg.qk_layernorm:
                if norm is not None and type(norm).__name__ != "IdentityOp":
                    raise NotSwappable(f"self_attention.{name} is set but config.qk_layernorm is False")
                continue
            if norm is None or not isinstance(getattr(norm, "weight", None), torch.Tensor):
                raise NotSwappable(f"config.qk_layernorm=True but self_attention.{name} is not a norm "
                                   f"with a weight")
            cls._check_shape(f"self_attention.{name}.weight", norm.weight, (cfg.head_dim,))

    @classmethod
    def _check_shared_experts(cls, mlp: nn.Module, cfg: ModelConfig) -> None:
        shared = getattr(mlp, "shared_experts", None)
        if not cfg.has_shared_expert:
            if shared is not None:
                raise NotSwappable("mlp.shared_experts is set but config.moe_shared_expert_intermediate_size is None")
            return
        if shared is None:
            raise NotSwappable("config.moe_shared_expert_intermediate_size is set but mlp.shared_experts is None")
        Fs = cfg.moe_shared_expert_intermediate_size
        F1 = Fs * (2 if cfg.moe_expert_activation == "swiglu" else 1)
        H = cfg.hidden_size
        cls._check_shape("mlp.shared_experts.linear_fc1.weight", _path(shared, "linear_fc1.weight"), (F1, H))
        cls._check_shape("mlp.shared_experts.linear_fc2.weight", _path(shared, "linear_fc2.weight"), (H, Fs))
        for name in ("linear_fc1", "linear_fc2"):
            if getattr(getattr(shared, name), "bias", None) is not None:
                raise NotSwappable(f"mlp.shared_experts.{name}.bias: shared experts have no biases")
        gate = getattr(shared, "gate_weight", None)
        if cfg.moe_shared_expert_gate:
            if not isinstance(gate, torch.Tensor):
                raise NotSwappable("config.moe_shared_expert_gate=True but mlp.shared_experts.gate_weight is None")
            cls._check_shape("mlp.shared_experts.gate_weight", gate, (1, H))
        elif gate is not None:
            raise NotSwappable("mlp.shared_experts.gate_weight is set but config.moe_shared_expert_gate is False")

    @staticmethod
    def _check_shape(name: str, t: torch.Tensor, want: tuple[int, ...]) -> None:
        if tuple(t.shape) != want:
            raise NotSwappable(f"{name} has shape {list(t.shape)}, the config implies {list(want)}")

    # -- LayerAdapter ------------------------------------------------------------------

    @property
    def adapted(self) -> nn.Module:
        return self.layer

    @property
    def training(self) -> bool:
        return self.layer.training

    @property
    def ep(self) -> ExpertParallel:
        return self._ep

    @property
    def op_modules(self) -> dict[str, list[nn.Module]]:
        L = self.layer
        attn = L.self_attention
        qk_norms = [attn.q_layernorm, attn.k_layernorm] if self.cfg.qk_layernorm else []
        return {"qkv": [L.input_layernorm, attn.linear_qkv, *qk_norms],
                "proj": [attn.linear_proj, L.pre_mlp_layernorm],
                "route": [L.mlp.router], "experts": [L.mlp.experts],
                "shared": [L.mlp.shared_experts] if self.cfg.has_shared_expert else []}

    def q_norm(self, q: torch.Tensor) -> torch.Tensor:
        return self.layer.self_attention.q_layernorm(q)

    def k_norm(self, k: torch.Tensor) -> torch.Tensor:
        return self.layer.self_attention.k_layernorm(k)

    def shared_expert(self, x: torch.Tensor) -> torch.Tensor:
        return _unbias(self.layer.mlp.shared_experts(x))

    @property
    def expert_bias(self) -> torch.Tensor | None:
        return getattr(self.layer.mlp.router, "expert_bias", None)

    @property
    def routed_counts(self) -> torch.Tensor | None:
        return getattr(self.layer.mlp.router, "local_tokens_per_expert", None)

    def norm1(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer.input_layernorm(x)

    def qkv_proj(self, x: torch.Tensor) -> torch.Tensor:
        return _unbias(self.layer.self_attention.linear_qkv(x))

    def out_proj(self, context: torch.Tensor) -> torch.Tensor:
        return _unbias(self.layer.self_attention.linear_proj(context))

    def norm2(self, h: torch.Tensor) -> torch.Tensor:
        return self.layer.pre_mlp_layernorm(h)

    def router_weight(self) -> torch.Tensor:
        return self.layer.mlp.router.weight

    def expert_weights(self) -> ExpertWeights:
        ex = self.layer.mlp.experts
        H = self.cfg.hidden_size
        if self.experts_kind == "GroupedMLP":
            E = self.cfg.num_experts // self._ep.size
            return ExpertWeights(ex.weight1.view(E, H, -1), ex.weight2.view(E, -1, H))
        fc1 = [e.linear_fc1 for e in ex.local_experts]
        fc2 = [e.linear_fc2 for e in ex.local_experts]

        def biases(mods: list[nn.Module]) -> torch.Tensor | None:
            bs = [getattr(m, "bias", None) for m in mods]
            return torch.stack(bs) if all(b is not None for b in bs) else None

        return ExpertWeights(torch.stack([m.weight.t() for m in fc1]),
                             torch.stack([m.weight.t() for m in fc2]), biases(fc1), biases(fc2))

    def pipelined_forward(self, run: Callable[..., Any], hidden_states: torch.Tensor,
                          attention_mask: torch.Tensor | None = None, context: Any = None,
                          context_mask: Any = None, rotary_pos_emb: Any = None,
                          rotary_pos_cos: Any = None, rotary_pos_sin: Any = None,
                          attention_bias: Any = None, inference_context: Any = None,
                          packed_seq_params: Any = None, sequence_len_offset: Any = None,
                          *, inference_params: Any = None, **unknown: Any) -> tuple[torch.Tensor, Any]:
        """`TransformerLayer.forward`'s call: ``(output, context)``. Arguments this version of
        the signature does not name are accepted when None (Megatron passes every argument
        by keyword, and versions add some)."""
        for name, v in (*unknown.items(), ("context", context), ("context_mask", context_mask),
                        ("rotary_pos_cos", rotary_pos_cos), ("rotary_pos_sin", rotary_pos_sin),
                        ("attention_bias", attention_bias), ("inference_context", inference_context),
                        ("inference_params", inference_params), ("packed_seq_params", packed_seq_params),
                        ("sequence_len_offset", sequence_len_offset)):
            if v is not None:
                raise NotImplementedError(f"AMPipeBlock (Megatron layer): argument {name} is not "
                                          f"supported by the pipelined block (pass None)")
        S = hidden_states.shape[0]
        if attention_mask is not None:
            causal = torch.ones(S, S, dtype=torch.bool, device=attention_mask.device).triu(1)
            if attention_mask.shape[-2:] != (S, S) or not bool((attention_mask.bool() == causal).all()):
                raise NotImplementedError("AMPipeBlock (Megatron layer): attention_mask must be None "
                                          "or the causal mask (True above the diagonal); the "
                                          "pipelined block is causal")
        y, losses = run(hidden_states, rope=self._rope(rotary_pos_emb, S))
        if self.layer.training and torch.is_grad_enabled():
            number = getattr(self.layer.mlp.router, "layer_number", None) or getattr(self.layer, "layer_number", 1)
            tokens = hidden_states.shape[0] * hidden_states.shape[1]
            for name, loss, coeff in (("load_balancing_loss", losses.aux_loss, self.cfg.moe_aux_loss_coeff),
                                      ("z_loss", losses.z_loss, self.cfg.moe_z_loss_coeff)):
                if coeff > 0:
                    y = self._scaler.apply(y, loss * tokens if self._per_token_loss else loss)
                    if self._tracker is not None:
                        self._tracker(name, loss.detach() / coeff, number, self._tracked_layers)
        return y, context

    def _rope(self, rotary_pos_emb: Any, S: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(cos, sin)`` of the first S positions of Megatron's ``rotary_pos_emb`` angles."""
        if rotary_pos_emb is None:
            return None
        if isinstance(rotary_pos_emb, tuple):
            q_emb, k_emb = rotary_pos_emb
            if q_emb is not k_emb and not torch.equal(q_emb, k_emb):
                raise NotImplementedError("AMPipeBlock (Megatron layer): separate query and key "
                                          "rotary embeddings are not supported")
            rotary_pos_emb = q_emb
        d = self.cfg.head_dim
        if rotary_pos_emb.shape[0] < S or rotary_pos_emb.shape[-1] != d:
            raise ValueError(f"AMPipeBlock (Megatron layer): rotary_pos_emb has shape "
                             f"{list(rotary_pos_emb.shape)}; expected [>= {S}, 1, 1, {d}] "
                             f"(rotary_percent < 1 is not supported)")
        freqs = rotary_pos_emb[:S].float()
        return freqs.cos(), freqs.sin()
