"""The GPT-MoE model: embedding → N blocks → final norm → LM head (tied or untied).

Parameter names are Megatron-Core's (docs/model.md has the mapping). Input tokens are
``[b, s]`` like Megatron's; inside, activations are sequence-major ``[s, b, H]``.

Mixed precision is autocast: parameters stay fp32 and ``cfg.dtype`` (bf16/fp16) is the
autocast dtype of the forward (the router, norms, rope and the loss run in fp32). fp16
training needs a gradient scaler, as always; that is the caller's.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..parallel.groups import ExpertParallel
from .block_pieces import MoELosses
from .config import ModelConfig
from .layers import GroupedMLP, RMSNorm, SharedExpertMLP, TransformerLayer, make_norm

__all__ = ["GPTModel", "GPTOutput", "autocast_context", "init_parameters"]


def autocast_context(cfg: ModelConfig, device: torch.device | str):
    """``torch.autocast`` for ``cfg.dtype`` on ``device`` (a no-op context for fp32)."""
    if cfg.dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=cfg.torch_dtype)


class LanguageModelEmbedding(nn.Module):
    """``word_embeddings`` [V, H] and, for learned positions, ``position_embeddings`` [S, H]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = (
            nn.Embedding(cfg.seq_length, cfg.hidden_size) if cfg.position_embedding_type == "learned_absolute" else None
        )
        self.dropout = cfg.hidden_dropout

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(input_ids)  # [b, s, H]
        if self.position_embeddings is not None:
            pos = torch.arange(input_ids.shape[1], device=input_ids.device)
            x = x + self.position_embeddings(pos)[None]
        x = x.transpose(0, 1).contiguous()  # [s, b, H]
        return F.dropout(x, p=self.dropout, training=self.training)


class TransformerBlock(nn.Module):
    """``layers`` and ``final_layernorm`` (Megatron-Core's `decoder`)."""

    def __init__(self, cfg: ModelConfig, ep: ExpertParallel):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(cfg, i, ep) for i in range(cfg.num_layers))
        self.final_layernorm = make_norm(cfg)


@dataclass
class GPTOutput:
    """``logits`` [b, s, V] (None when only the loss was asked for), ``lm_loss`` (mean token
    cross-entropy, None without labels), ``aux_loss`` and ``z_loss`` (coefficient-scaled, summed
    over MoE layers), and each MoE layer's `MoELosses` for logging."""

    logits: torch.Tensor | None
    lm_loss: torch.Tensor | None
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    layer_losses: list[MoELosses] = field(default_factory=list)

    @property
    def loss(self) -> torch.Tensor:
        """What to call ``backward()`` on: LM loss + auxiliary losses (explicit gradient path)."""
        if self.lm_loss is None:
            raise ValueError("GPTOutput.loss: no labels were given, so there is no LM loss")
        return self.lm_loss + self.aux_loss + self.z_loss


class GPTModel(nn.Module):
    """Megatron-style GPT-MoE. ``ep`` shards every MoE layer's experts (default: one rank).

    The config is checked (including experts divisible by the EP size) before any parameter
    is allocated. The parameters are initialised by `init_parameters` from ``seed`` (default:
    drawn from torch's global generator), which gives the same global weights for any EP size.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        ep: ExpertParallel | None = None,
        seed: int | None = None,
        device: torch.device | str | None = None,
    ):
        ep = ep if ep is not None else ExpertParallel.single()
        cfg.check_parallel(ep.size)
        super().__init__()
        self.cfg = cfg
        self.ep = ep
        self.embedding = LanguageModelEmbedding(cfg)
        self.decoder = TransformerBlock(cfg, ep)
        self.output_layer = (
            nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False) if cfg.untie_embeddings_and_output_weights else None
        )
        if seed is None:  # follow torch.manual_seed; EP ranks must pass equal seeds (or seed equally)
            seed = int(torch.randint(0, 2**62, ()).item())
        init_parameters(self, cfg, seed)
        if device is not None:
            self.to(device)

    def output_weight(self) -> torch.Tensor:
        return self.embedding.word_embeddings.weight if self.output_layer is None else self.output_layer.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        loss_mask: torch.Tensor | None = None,
        return_logits: bool = True,
    ) -> GPTOutput:
        """``input_ids`` [b, s] → `GPTOutput`; with ``labels`` [b, s] the mean cross-entropy too.

        ``loss_mask`` [b, s] (1 = counts) weights the token losses (Megatron's ``loss_mask``);
        labels equal to -100 are ignored.
        """
        b, s = input_ids.shape
        if s > self.cfg.seq_length and self.cfg.position_embedding_type == "learned_absolute":
            raise ValueError(f"input has {s} positions but model.seq_length is {self.cfg.seq_length}")
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels {list(labels.shape)} must match input_ids {list(input_ids.shape)}")
        if loss_mask is not None and (labels is None or loss_mask.shape != labels.shape):
            raise ValueError("loss_mask needs labels of the same [b, s] shape")
        with autocast_context(self.cfg, input_ids.device):
            x = self.embedding(input_ids)
            layer_losses: list[MoELosses] = []
            for layer in self.decoder.layers:
                x, losses = layer(x)
                if losses is not None:
                    layer_losses.append(losses)
            x = self.decoder.final_layernorm(x)
            logits = F.linear(x, self.output_weight())  # [s, b, V]
        lm_loss = None
        if labels is not None:
            flat_logits = logits.float().reshape(s * b, -1)
            if loss_mask is None:
                lm_loss = F.cross_entropy(flat_logits, labels.t().reshape(-1))
            else:
                per_token = F.cross_entropy(flat_logits, labels.t().reshape(-1), reduction="none")
                mask = loss_mask.t().reshape(-1).to(per_token.dtype)
                lm_loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
        zero = torch.zeros((), device=input_ids.device)
        aux = sum((l.aux_loss for l in layer_losses), zero)
        z = sum((l.z_loss for l in layer_losses), zero)
        out_logits = logits.transpose(0, 1) if return_logits else None
        return GPTOutput(out_logits, lm_loss, aux, z, layer_losses)


# ---------------------------------------------------------------------------- initialisation


def _generator(seed: int, *key: object) -> torch.Generator:
    digest = hashlib.sha256(repr((seed,) + key).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _normal(shape: torch.Size | tuple[int, ...], std: float, gen: torch.Generator) -> torch.Tensor:
    return torch.empty(shape).normal_(0.0, std, generator=gen)


@torch.no_grad()
def init_parameters(model: nn.Module, cfg: ModelConfig, seed: int, prefix: str = "") -> None:
    """Megatron's initialisation, drawn from one CPU generator per (parameter, global expert).

    Weights ~ N(0, init_method_std), output projections (``linear_proj``, ``linear_fc2``,
    experts' ``weight2``) ~ N(0, std / sqrt(2 * num_layers)); norms 1, biases 0; the shared
    expert's ``gate_weight`` ~ N(0, std); the expert bias (a buffer) stays 0. Each global
    expert has its own generator, so the global weights do not depend on the EP size or the
    device, and the same seed gives the same model. Works on a `GPTModel` or a lone
    `TransformerLayer`: draws are keyed by ``prefix`` + the module names under ``model``, so
    ``init_parameters(layer, cfg, seed, prefix="decoder.layers.3.")`` gives a lone layer the
    weights of layer 3 of ``GPTModel(cfg, seed=seed)``.
    """
    std = cfg.init_method_std
    out_std = std / math.sqrt(2.0 * cfg.num_layers)
    for name, module in model.named_modules():
        mname = prefix + name
        if isinstance(module, (nn.LayerNorm, RMSNorm)):
            module.weight.fill_(1.0)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, GroupedMLP):
            w1, w2 = module.w1(), module.w2()
            for j in range(module.num_local_experts):
                e = module.first_expert + j
                w1[j].copy_(_normal(w1[j].shape, std, _generator(seed, f"{mname}.weight1", e)))
                w2[j].copy_(_normal(w2[j].shape, out_std, _generator(seed, f"{mname}.weight2", e)))
            for bias in (module.bias1, module.bias2):
                if bias is not None:
                    bias.zero_()
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            is_out = mname.endswith("linear_proj") or mname.endswith("linear_fc2")
            module.weight.copy_(_normal(module.weight.shape, out_std if is_out else std, _generator(seed, mname)))
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, SharedExpertMLP) and module.gate_weight is not None:
            module.gate_weight.copy_(_normal(module.gate_weight.shape, std, _generator(seed, f"{mname}.gate_weight")))
        elif mname.endswith("mlp.router"):
            module.weight.copy_(_normal(module.weight.shape, std, _generator(seed, mname)))
