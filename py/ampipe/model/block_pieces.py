"""The block's small per-step functions: what the baseline block and the pipelined executor share.

Each step is a plain function of explicit tensors and one layer *adapter*
(`ampipe.model.adapter.LayerAdapter`: where the layer's norms, QKV, out-projection, router
and expert weights are, and its config read into ampipe's fields). ampipe's own
`TransformerLayer` is its own adapter; `ampipe.adapters.megatron` adapts Megatron-Core's
layer. No step keeps state
between calls, so the executor can call them per sequence chunk, on any stream or thread,
and autograd records ordinary graphs. `block_forward` — the baseline block — is literally
their composition over one chunk that spans the whole sequence.

Tensors are sequence-major: a chunk is rows ``[o, o + s_c)`` of the block input ``[s, b, H]``,
and its ``T = s_c * b`` tokens are those rows flattened (token ``t = row * b + batch``).

Step            function                                         plan op
--------------  -----------------------------------------------  ---------
norm1+QKV+rope  ``qkv(layer, x_c, offset) -> QKV``                 qkv
attention       ``attention(layer, q_c, k[:end], v[:end])``        attn
out-proj        ``proj(layer, ctx_c, x_c) -> (h_c, normed_c)``     proj
router          ``route(layer, normed_c) -> Routing``              route
permute         ``permute(layer, normed_c, routing) -> Permuted``  route
count exchange  ``ep_comm.exchange_counts(kept, ep)``              counts
EP dispatch     ``dispatch(layer, permuted, layout) -> Dispatched``  dispatch
experts         ``experts(layer, dispatched)``                     experts
EP combine      ``combine(layer, expert_out, dispatched)``         combine
shared expert   ``shared_expert(layer, normed_c) -> out_c``          shared
unpermute       ``unpermute(layer, combined, permuted, routing, h_c, shared_c) -> y_c``  unpermute
aux losses      ``moe_losses(layer.cfg, sum_stats(stats...))``     aux_loss
dense MLP       ``dense_mlp(layer, normed_c, h_c) -> y_c``         (dense layers)

Dropout (attention and hidden) is applied when ``layer.training``; chunked and full
computations agree only without it (different random masks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..parallel import expert_comm as ep_comm
from ..parallel.expert_comm import DispatchLayout
from .attention import attention_chunk
from .adapter import LayerAdapter
from .config import ModelConfig
from .rope import apply_rope, rope_cos_sin

__all__ = [
    "QKV", "Routing", "RoutingStats", "Permuted", "Dispatched", "MoELosses",
    "qkv", "attention", "proj", "route", "permute", "dispatch", "dispatch_rows", "dispatched_rows",
    "experts_ffn", "experts", "combine", "combine_rows", "unpermute", "dense_mlp", "moe_losses", "sum_stats",
    "block_forward", "chunked_block_forward", "wire_dtype", "capacity_row_map", "running_capacity_row_map",
    "shared_expert", "count_routed",
]


# ============================================================================ attention half


@dataclass
class QKV:
    """Queries ``[s_c, b, heads, d]``, keys and values ``[s_c, b, groups, d]`` (rope applied)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


def qkv(layer: LayerAdapter, x: torch.Tensor, position_offset: int = 0,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> QKV:
    """norm1 → linear_qkv → split by query group → rope at absolute positions ``offset + i``.

    ``rope``: the whole sequence's ``(cos, sin)`` tables ``[S, 1, 1, d]`` when the caller
    supplies the angles (Megatron passes ``rotary_pos_emb`` to each layer); rows
    ``[offset, offset + s)`` are used. Without it, angles come from ``layer.cfg``."""
    cfg = layer.cfg
    s, b, _ = x.shape
    g, d = cfg.query_groups, cfg.head_dim
    hpg = cfg.num_attention_heads // g
    mixed = layer.qkv_proj(layer.norm1(x)).view(s, b, g, (hpg + 2) * d)
    q, k, v = torch.split(mixed, [hpg * d, d, d], dim=-1)
    q = q.reshape(s, b, g * hpg, d)  # query head i belongs to group i // hpg
    if cfg.qk_layernorm:  # per head, before rope (Megatron's get_query_key_value_tensors)
        q, k = layer.q_norm(q), layer.k_norm(k)
    if rope is not None:
        cos, sin = (t[position_offset:position_offset + s] for t in rope)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    elif cfg.position_embedding_type == "rope":
        cos, sin = rope_cos_sin(d, cfg.rotary_base, position_offset, s, device=x.device)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return QKV(q, k, v)


def attention(layer: LayerAdapter, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``attn(q_c, k[:end_c], v[:end_c])``, lower-right causal → context ``[s_c, b, heads*d]``."""
    p = layer.cfg.attention_dropout if layer.training else 0.0
    return attention_chunk(q, k, v, dropout_p=p, backend=layer.attention_backend)


def proj(layer: LayerAdapter, context: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """linear_proj → hidden dropout → + residual = ``h``; ``normed = pre_mlp_layernorm(h)``."""
    out = layer.out_proj(context)
    h = residual + F.dropout(out, p=layer.cfg.hidden_dropout, training=layer.training)
    return h, layer.norm2(h)


# ============================================================================ routing


@dataclass
class RoutingStats:
    """What the auxiliary losses need, as sums over tokens, so chunks add up exactly.

    ``tokens_per_expert`` [E] fp32: slots routed to each expert by the plain top-k of the
    scores below (before any capacity drop, without expert bias or groups; no gradient).
    ``probs_sum`` [E] fp32: sum over tokens of the scores over *all* experts (the softmax; with
    sigmoid scores, the sigmoids normalised to sum 1 per token), as Megatron's
    `compute_routing_scores_for_aux_loss`. ``z_sum``: sum over tokens of
    ``logsumexp(logits)^2``. The last two carry the gradient of the losses back to the router.
    """

    tokens_per_expert: torch.Tensor
    probs_sum: torch.Tensor
    z_sum: torch.Tensor
    num_tokens: int

    def __add__(self, other: "RoutingStats") -> "RoutingStats":
        return RoutingStats(
            self.tokens_per_expert + other.tokens_per_expert,
            self.probs_sum + other.probs_sum,
            self.z_sum + other.z_sum,
            self.num_tokens + other.num_tokens,
        )


def sum_stats(*stats: RoutingStats) -> RoutingStats:
    """Statistics of the whole microbatch from those of its chunks."""
    if not stats:
        raise ValueError("sum_stats: needs at least one RoutingStats")
    total = stats[0]
    for s in stats[1:]:
        total = total + s
    return total


@dataclass
class Routing:
    """Top-k choices of a chunk's ``T`` tokens: ``indices`` [T, K] int64 (column k = k-th best),
    ``gates`` [T, K] fp32, ``logits`` [T, E] fp32, and the chunk's `RoutingStats`."""

    indices: torch.Tensor
    gates: torch.Tensor
    logits: torch.Tensor
    stats: RoutingStats


def _topk(scores: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k over experts, or Megatron's group-limited top-k (`group_limited_topk`): the experts
    form ``moe_router_num_groups`` groups; each token keeps the ``moe_router_group_topk`` groups
    with the largest sum of their top-(k / group_topk) scores and takes its k experts there."""
    K, Gk = cfg.moe_router_topk, cfg.moe_router_group_topk
    if not Gk:
        return torch.topk(scores, K, dim=-1)
    T, E = scores.shape
    G = cfg.moe_router_num_groups
    group_scores = scores.view(T, G, E // G).topk(K // Gk, dim=-1).values.sum(dim=-1)
    groups = torch.topk(group_scores, Gk, dim=-1, sorted=False).indices
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter(1, groups, True)
    masked = scores.masked_fill(~keep.repeat_interleave(E // G, dim=1), float("-inf"))
    return torch.topk(masked, K, dim=-1)


def route(layer: LayerAdapter, normed: torch.Tensor) -> Routing:
    """Router logits (fp32) → scores → top-k → gates, plus the chunk's routing statistics
    (Megatron's `topk_routing_with_score_function`).

    softmax scores: ``softmax_then_topk``: gates are the top-k of the softmax over all experts
    (renormalised to sum to 1 when ``moe_router_topk_renormalize``); ``topk_then_softmax``:
    gates are the softmax over the k largest logits. sigmoid scores: experts are chosen by
    ``sigmoid(logits) + expert_bias`` (the bias only chooses), the gates are the chosen
    sigmoids, normalised to sum to 1 when k > 1. Either way the choice can be group-limited
    (`_topk`) and the gates are then multiplied by ``moe_router_topk_scaling_factor``.
    """
    cfg = layer.cfg
    x = normed.reshape(-1, normed.shape[-1])
    with torch.autocast(device_type=x.device.type, enabled=False):
        logits = F.linear(x.float(), layer.router_weight().float())
    K = cfg.moe_router_topk
    plain = not cfg.moe_router_group_topk  # the choice is the plain top-k of the aux scores
    if cfg.moe_router_score_function == "sigmoid":
        scores = torch.sigmoid(logits)
        bias = layer.expert_bias if cfg.moe_router_enable_expert_bias else None
        if bias is not None:
            plain = False
            indices = _topk(scores + bias.float(), cfg)[1]
            gates = scores.gather(1, indices)
        else:
            gates, indices = _topk(scores, cfg)
        if K > 1:
            gates = gates / (gates.sum(dim=-1, keepdim=True) + 1e-20)
        aux_scores = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
    else:
        aux_scores = torch.softmax(logits, dim=-1)
        if cfg.moe_router_score_order == "softmax_then_topk":
            gates, indices = _topk(aux_scores, cfg)
            if cfg.moe_router_topk_renormalize:
                gates = gates / gates.sum(dim=-1, keepdim=True)
        else:
            top_logits, indices = _topk(logits, cfg)
            gates = torch.softmax(top_logits, dim=-1)
    if cfg.moe_router_topk_scaling_factor:
        gates = gates * cfg.moe_router_topk_scaling_factor
    # The load-balancing loss counts the plain top-k of its scores (no bias, no groups).
    aux_indices = indices if plain else torch.topk(aux_scores.detach(), K, dim=-1).indices
    counts = torch.zeros(cfg.num_experts, dtype=torch.float32, device=x.device)
    counts.scatter_add_(0, aux_indices.reshape(-1),
                        torch.ones(aux_indices.numel(), dtype=torch.float32, device=x.device))
    stats = RoutingStats(
        tokens_per_expert=counts,
        probs_sum=aux_scores.sum(dim=0),
        z_sum=torch.logsumexp(logits, dim=-1).square().sum(),
        num_tokens=x.shape[0],
    )
    return Routing(indices=indices, gates=gates, logits=logits, stats=stats)


def count_routed(layer: LayerAdapter, kept_per_expert: torch.Tensor) -> None:
    """Add a forward's kept slots per expert [E] into the layer's ``routed_counts`` (the
    expert-bias update's input, Megatron's ``local_tokens_per_expert``), when the layer has
    an expert bias and grad is enabled (as Megatron's router: not in evaluation)."""
    counts = layer.routed_counts if layer.cfg.moe_router_enable_expert_bias else None
    if counts is not None:
        with torch.no_grad():
            counts.add_(kept_per_expert.to(counts.dtype))


@dataclass
class MoELosses:
    """Coefficient-scaled losses of one MoE layer; add them to the LM loss (they carry the gradient)."""

    aux_loss: torch.Tensor
    z_loss: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        return self.aux_loss + self.z_loss


def moe_losses(cfg: ModelConfig, stats: RoutingStats) -> MoELosses:
    """Megatron-Core's losses from (summed) statistics over ``T`` tokens, ``E`` experts, top-``K``:

    - load balancing (Switch/GShard): ``coeff * E * sum_e f_e * P_e`` with ``f_e = count_e / (T*K)``
      (fraction of routed slots) and ``P_e = probs_sum_e / T`` (mean router probability);
      Megatron's ``switch_load_balancing_loss_func``. Equals ``coeff`` for perfect balance.
    - z-loss: ``z_coeff * mean_t(logsumexp(logits_t)^2)`` (Megatron's ``z_loss_func``).
    """
    T, E, K = stats.num_tokens, cfg.num_experts, cfg.moe_router_topk
    f = stats.tokens_per_expert.detach() / (T * K)
    P = stats.probs_sum / T
    aux = cfg.moe_aux_loss_coeff * E * torch.sum(f * P)
    z = cfg.moe_z_loss_coeff * stats.z_sum / T
    return MoELosses(aux_loss=aux, z_loss=z)


# ============================================================================ token movement


@dataclass
class Permuted:
    """A chunk's token slots in global expert order: ``buffer`` [rows, H], ``row_map`` [T, K]
    (-1 = dropped), kept ``tokens_per_expert`` [E] int64, and the ``capacity``: C rows per
    expert (a static layout), or None for a variable layout (dropless, or a capacity over the
    whole sequence applied per chunk), whose buffer holds the kept rows first (T*K rows)."""

    buffer: torch.Tensor
    row_map: torch.Tensor
    tokens_per_expert: torch.Tensor
    capacity: int | None


def capacity_row_map(routing: Routing, num_experts: int, capacity: int,
                     policy: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Which slots a full expert keeps, Megatron's ``moe_token_drop_policy`` over these tokens:
    ``probs``: per expert the ``capacity`` slots with the highest gates (ties: earlier first);
    ``position``: per expert the earliest tokens. Returns ``make_row_map``'s static layout."""
    T, K = routing.indices.shape
    flat = routing.indices.reshape(-1, 1)  # slot t*K + k: token order (an expert once per token)
    if policy == "position":
        row_map, kept = ops.make_row_map(flat, num_experts, capacity)
    elif policy == "probs":
        order = torch.sort(routing.gates.detach().reshape(-1), descending=True, stable=True).indices
        ranked, kept = ops.make_row_map(flat[order], num_experts, capacity)
        row_map = torch.empty_like(ranked)
        row_map[order] = ranked
    else:
        raise ValueError(f"model.moe_token_drop_policy: must be one of probs, position; got {policy!r}")
    return row_map.view(T, K), kept


def running_capacity_row_map(indices: torch.Tensor, num_experts: int, capacity: int,
                             routed_before: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``position`` policy with a capacity over the whole sequence, for one chunk of it:
    ``routed_before`` [E] int64 counts the slots earlier chunks routed to each expert, so a
    slot of rank r (in token order) within expert e is kept iff ``routed_before[e] + r <
    capacity``: what the whole sequence at once keeps. Computed on the device (no host
    read); a variable layout: kept rows expert-contiguous from row 0, dropped slots -1."""
    T, K = indices.shape
    flat = indices.reshape(-1)
    dense, routed = ops.make_row_map(flat[:, None], num_experts, None)  # token order per expert
    rank = dense.view(-1) - (torch.cumsum(routed, 0) - routed)[flat]
    room = (capacity - routed_before).clamp(min=0)
    kept = torch.minimum(routed, room)
    start = torch.cumsum(kept, 0) - kept
    rows = torch.where(rank < room[flat], start[flat] + rank, torch.full_like(rank, -1))
    return rows.view(T, K), kept


def permute(layer: LayerAdapter, normed: torch.Tensor, routing: Routing, *,
            sequence_tokens: int | None = None, routed_before: torch.Tensor | None = None) -> Permuted:
    """Local permute into expert order.

    Dropless: every slot, a variable layout. With a capacity factor: capacity
    ``ceil(cf * T * K / E)`` of these ``T`` tokens and the config's drop policy (the baseline,
    whole sequence; or the pipelined block's ``chunk`` scope); or, given ``routed_before``
    (``capacity_scope: sequence``, ``position`` policy), the capacity of ``sequence_tokens``
    tokens applied to this chunk after the earlier ones (`running_capacity_row_map`)."""
    cfg = layer.cfg
    x = normed.reshape(-1, normed.shape[-1])
    T, K, E = x.shape[0], cfg.moe_router_topk, cfg.num_experts
    if cfg.dropless:
        row_map, kept = ops.make_row_map(routing.indices, E, None)
        return Permuted(ops.permute(x, row_map, T * K), row_map, kept, None)
    if routed_before is None:
        capacity = cfg.expert_capacity(T)
        row_map, kept = capacity_row_map(routing, E, capacity, cfg.moe_token_drop_policy)
        return Permuted(ops.permute(x, row_map, E * capacity), row_map, kept, capacity)
    if cfg.moe_token_drop_policy != "position":
        raise ValueError("permute: a capacity over the whole sequence, chunk by chunk, needs "
                         f"model.moe_token_drop_policy: position; got {cfg.moe_token_drop_policy}")
    capacity = cfg.expert_capacity(sequence_tokens)
    row_map, kept = running_capacity_row_map(routing.indices, E, capacity, routed_before)
    return Permuted(ops.permute(x, row_map, T * K), row_map, kept, None)


@dataclass
class Dispatched:
    """This rank's local experts' rows, expert-contiguous (``layout.expert_counts`` rows each)."""

    tokens: torch.Tensor
    layout: DispatchLayout


def wire_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype tokens travel in: the autocast dtype when autocast is on (the expert matmul
    would cast them to it anyway, so casting before the all-to-all changes no value and
    halves the bytes moved), else the tensor's own."""
    kind = t.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else t.dtype


def dispatch(layer: LayerAdapter, permuted: Permuted, layout: DispatchLayout | None = None) -> Dispatched:
    """All-to-all the kept rows to the experts' ranks: `dispatch_rows`, the exchange,
    `dispatched_rows` (the pipelined block runs the three as its dispatch op's parts).

    ``layout``: the split sizes, when the caller has them (the pipelined block exchanges the
    counts in an op of its own); else they are made here (`dispatch_layout`: static with a
    capacity, else a count exchange and a host read)."""
    if layout is None:
        layout = ep_comm.dispatch_layout(permuted.tokens_per_expert, layer.ep, layer.cfg.num_experts,
                                         permuted.capacity)
    return Dispatched(ep_comm.dispatch(dispatch_rows(permuted, layout), layout, layer.ep), layout)


def dispatch_rows(permuted: Permuted, layout: DispatchLayout) -> torch.Tensor:
    """The rows that travel: the kept rows (a variable layout's unused tail cut off), in the
    wire dtype."""
    buffer = permuted.buffer
    if buffer.shape[0] != layout.num_send_rows:  # a variable layout's unused tail
        buffer = buffer[:layout.num_send_rows]
    return buffer.to(wire_dtype(buffer))


def dispatched_rows(received: torch.Tensor, layout: DispatchLayout) -> Dispatched:
    """Rows received by the dispatch's exchange, expert-contiguous for the FFNs."""
    return Dispatched(ep_comm.to_expert_major(received, layout), layout)


def experts_ffn(layer: LayerAdapter, tokens: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Expert FFNs on an expert-contiguous ``[N, H]`` buffer, ``counts[j]`` rows for local expert j.

    Equal counts (capacity mode) run as one batched matmul; otherwise one matmul per expert.
    """
    ex = layer.expert_weights()
    act = layer.cfg.moe_expert_activation
    w1, w2 = ex.w1, ex.w2
    El = w1.shape[0]
    if len(counts) != El or sum(counts) != tokens.shape[0]:
        raise ValueError(f"experts: counts {counts} do not cover {tokens.shape[0]} rows of {El} local experts")
    if len(set(counts)) == 1:
        xs = tokens.view(El, counts[0], tokens.shape[-1])
        h = torch.bmm(xs, w1)
        if ex.bias1 is not None:
            h = h + ex.bias1.unsqueeze(1)
        out = torch.bmm(activation(h, act), w2)
        if ex.bias2 is not None:
            out = out + ex.bias2.unsqueeze(1)
        return out.reshape(tokens.shape[0], out.shape[-1])
    # unbind, not w1[j]: the backward of each index (select) allocates a zero gradient of the
    # whole grouped weight and adds into it, E full-size passes per call; unbind's backward
    # stacks the E expert gradients once.
    w1s, w2s = w1.unbind(0), w2.unbind(0)
    b1s = ex.bias1.unbind(0) if ex.bias1 is not None else None
    b2s = ex.bias2.unbind(0) if ex.bias2 is not None else None
    outs = []
    for j, xj in enumerate(torch.split(tokens, counts)):
        h = xj @ w1s[j]
        if b1s is not None:
            h = h + b1s[j]
        o = activation(h, act) @ w2s[j]
        if b2s is not None:
            o = o + b2s[j]
        outs.append(o)
    return torch.cat(outs)


def activation(h: torch.Tensor, kind: str) -> torch.Tensor:
    """SwiGLU (``silu(first half) * second half``, Megatron's order) or exact GeLU."""
    if kind == "swiglu":
        a, b = h.chunk(2, dim=-1)
        return F.silu(a) * b
    return F.gelu(h)


def experts(layer: LayerAdapter, dispatched: Dispatched) -> torch.Tensor:
    """The expert FFNs on the dispatched rows."""
    return experts_ffn(layer, dispatched.tokens, dispatched.layout.expert_counts)


def combine(layer: LayerAdapter, expert_output: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
    """All-to-all the expert outputs back; rows in this rank's global expert order
    (`combine_rows`, then the exchange)."""
    return ep_comm.combine(expert_output, dispatched.layout, layer.ep)


def combine_rows(expert_output: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
    """The rows the combine's exchange sends back: expert outputs in the order they arrived."""
    return ep_comm.to_source_major(expert_output, dispatched.layout)


def shared_expert(layer: LayerAdapter, normed: torch.Tensor) -> torch.Tensor:
    """The shared expert (gated, when the layer's is) on a chunk's normed tokens ``[s_c, b, H]``."""
    return layer.shared_expert(normed)


def unpermute(
    layer: LayerAdapter, combined: torch.Tensor, permuted: Permuted, routing: Routing, residual: torch.Tensor,
    shared: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gate-weighted unpermute (dropped slots add 0) (+ the shared expert's output) → hidden
    dropout → + residual → ``y_c``."""
    gates = routing.gates.to(combined.dtype)
    out = ops.unpermute(combined, permuted.row_map, gates).view(residual.shape)
    if shared is not None:
        out = out + shared
    return residual + F.dropout(out, p=layer.cfg.hidden_dropout, training=layer.training)


def dense_mlp(layer: nn.Module, normed: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """Dense layers: linear_fc1 → activation → linear_fc2 → hidden dropout → + residual."""
    mlp = layer.mlp
    out = mlp.linear_fc2(activation(mlp.linear_fc1(normed), mlp.activation))
    return residual + F.dropout(out, p=layer.cfg.hidden_dropout, training=layer.training)


# ============================================================================ the baseline block


def block_forward(layer: LayerAdapter, x: torch.Tensor) -> tuple[torch.Tensor, MoELosses | None]:
    """The baseline block: every step above, once, over the whole sequence ``x [s, b, H]``.

    Returns ``(y [s, b, H], MoELosses)`` for an MoE layer, ``(y, None)`` for a dense layer.
    """
    t = qkv(layer, x, position_offset=0)
    context = attention(layer, t.q, t.k, t.v)
    h, normed = proj(layer, context, x)
    if not layer.is_moe:
        return dense_mlp(layer, normed, h), None
    routing = route(layer, normed)
    permuted = permute(layer, normed, routing)
    if torch.is_grad_enabled():
        count_routed(layer, permuted.tokens_per_expert)
    dispatched = dispatch(layer, permuted)
    expert_output = experts(layer, dispatched)
    combined = combine(layer, expert_output, dispatched)
    shared = shared_expert(layer, normed) if layer.cfg.has_shared_expert else None
    y = unpermute(layer, combined, permuted, routing, h, shared)
    return y, moe_losses(layer.cfg, routing.stats)


def chunked_block_forward(layer: LayerAdapter, x: torch.Tensor,
                          boundaries: Sequence[int]) -> tuple[torch.Tensor, MoELosses | None]:
    """The block computed chunk by chunk, written out by hand in one autograd graph: every chunk's
    Q/K/V at its own positions, then chunk ``c`` (rows ``[boundaries[c], boundaries[c+1])``)
    attends to the keys and values of rows ``[0, boundaries[c+1])`` (the earlier chunks' and its
    own) and routes, moves and unpermutes its own tokens; the losses are those of the summed
    routing statistics.

    What the pipelined block computes, without its executor, islands or streams: the second
    path it is tested against, and what chunking alone costs in ``python -m
    ampipe.bench.pipeline`` (its "chunked reference" arm). With a capacity factor the capacity
    is per chunk (the paper's ``capacity_scope: chunk``); dropless it equals `block_forward`
    up to rounding."""
    bounds = list(boundaries)
    rising = all(a < b for a, b in zip(bounds, bounds[1:]))
    if not bounds or bounds[0] != 0 or bounds[-1] != x.shape[0] or not rising:
        raise ValueError(f"chunked_block_forward: boundaries {bounds} must rise from 0 to the "
                         f"sequence length {x.shape[0]}")
    chunks = list(zip(bounds, bounds[1:]))
    # Every chunk's K/V once, in one sequence-long tensor that each chunk's attention reads a
    # prefix of (as the executor's K/V buffers; concatenating the prefix per chunk would copy
    # O(P^2) rows and charge that to the chunking).
    parts = [qkv(layer, x[lo:hi], position_offset=lo) for lo, hi in chunks]
    k = torch.cat([t.k for t in parts])
    v = torch.cat([t.v for t in parts])
    ys: list[torch.Tensor] = []
    stats: list[RoutingStats] = []
    kept: list[torch.Tensor] = []
    for t, (lo, hi) in zip(parts, chunks):
        xc = x[lo:hi]
        context = attention(layer, t.q, k[:hi], v[:hi])
        h, normed = proj(layer, context, xc)
        if not layer.is_moe:
            ys.append(dense_mlp(layer, normed, h))
            continue
        routing = route(layer, normed)
        permuted = permute(layer, normed, routing)
        kept.append(permuted.tokens_per_expert)
        dispatched = dispatch(layer, permuted)
        combined = combine(layer, experts(layer, dispatched), dispatched)
        shared = shared_expert(layer, normed) if layer.cfg.has_shared_expert else None
        ys.append(unpermute(layer, combined, permuted, routing, h, shared))
        stats.append(routing.stats)
    if not layer.is_moe:
        return torch.cat(ys), None
    if torch.is_grad_enabled():
        count_routed(layer, torch.stack(kept).sum(dim=0))
    return torch.cat(ys), moe_losses(layer.cfg, sum_stats(*stats))
