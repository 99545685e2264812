"""`AMPipeBlock`: the baseline MoE block, run by a plan over separate streams.

`apply_ampipe(layer, plan)` makes an MoE layer pipelined in place, the way FSDP2's
`fully_shard` makes a module sharded: the module object stays where it is (same
parameters, same state_dict names, its hooks kept) and its class becomes a subclass of
both `AMPipeBlock` and its own class, whose `forward` runs the plan; `unapply_ampipe`
restores the class. The executor reads the layer through its adapter
(`ampipe.model.adapter`), so any layer an adapter recognises can be pipelined.

One `torch.autograd.Function` covers the whole block. Its forward walks the plan's forward
op list; its backward walks the backward op list, with the same stream discipline (see
`streams.py`). Every op is a small autograd *island*: the model's own step function
(`ampipe.model.block_pieces`) runs under `enable_grad` on detached inputs, and the island
keeps its outputs. The matching backward op calls `torch.autograd.grad` on those outputs
with the incoming gradients, for the island's inputs and parameters. So no derivative is
written by hand, the plan decides order and streams, and:

- parameter gradients are explicit: `autograd.grad` returns them, they are summed per
  parameter (in place, in plan order; in fp32 for bf16/fp16 parameters) and returned by the
  Function's backward, so autograd accumulates them into `.grad` like any other op (hooks,
  DDP buckets, grad accumulation), or added into a Megatron-style `main_grad`;
- with a variable expert layout (dropless, or a whole-sequence capacity) each chunk's
  `counts` op exchanges the counts and starts their copy to the host; its `dispatch` is the
  one place the host waits (`_HostCounts`);
- the auxiliary and z-losses are outputs of the Function, computed once from statistics
  summed over every chunk; their gradient enters through the Function's backward
  (`aux_loss_bwd`) like any other output gradient;
- K and V live in one sequence-long buffer per pass; chunk c's attention reads the prefix
  `[:end_c]` as a view (no concatenation), and in backward dK/dV are accumulated in place
  into the prefix `dK[:end_c] += ...` of one zero-initialised buffer; `qkv_bwd[j]` reads its
  rows once every later chunk has added to them.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import spans
from ..model import block_pieces as pieces
from ..model.adapter import LayerAdapter, NotSwappable
from ..model.block_pieces import MoELosses, Permuted, Routing, RoutingStats
from ..model.config import check_capacity_scope
from ..parallel import expert_comm as ep_comm
from .emulation import DelayInjector, EmulatedComm
from .plan import (PARAM_KINDS, Plan, PlanError, PlanOp, check_cuda_streams, check_dims,
                   compute_stream_count, data_needs, load_plan)
from .streams import CommWork, OpTimes, StreamExecutor, shared_executor

__all__ = ["AMPipeBlock", "apply_ampipe", "unapply_ampipe", "block_dims"]

# The op kinds whose islands differentiate parameters (`LayerAdapter.op_modules`; op_kinds.json).
_PARAM_KINDS = PARAM_KINDS


def block_dims(layer: LayerAdapter, seq_length: int | None = None,
               micro_batch_size: int | None = None) -> dict[str, Any]:
    """The plan `dims` a layer (its adapter) implies (sequence and batch sizes only when given)."""
    cfg = layer.cfg
    dims: dict[str, Any] = {
        "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_query_groups": cfg.query_groups,
        "kv_channels": cfg.head_dim,
        "num_experts": cfg.num_experts,
        "moe_router_topk": cfg.moe_router_topk,
        "moe_ffn_hidden_size": cfg.moe_ffn_hidden_size,
        "moe_shared_expert_intermediate_size": cfg.moe_shared_expert_intermediate_size,
        "expert_model_parallel_size": layer.ep.size,
        "dtype": cfg.dtype,
    }
    if seq_length is not None:
        dims["seq_length"] = seq_length
    if micro_batch_size is not None:
        dims["micro_batch_size"] = micro_batch_size
    return dims


def _alias_rows(buf: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Rows [start, end) of `buf` as a tensor sharing its storage but with its own version
    counter, so writes to *other* rows of the buffer (later chunks' K/V) do not invalidate
    what an island saved for backward."""
    alias = buf.new_empty(0)
    alias.set_(buf.untyped_storage(), buf.storage_offset() + start * buf.stride(0),
               (end - start, *buf.shape[1:]), buf.stride())
    return alias


def _prefix(buf: torch.Tensor, end: int) -> torch.Tensor:
    """Rows [0, end) of a K/V buffer as an attention input. Later chunks' qkv ops write the
    rows past `end`, hence an alias with its own version counter; the whole buffer has no
    later writer (every chunk's K/V precede the attention that reads them all)."""
    return buf.detach() if end == buf.shape[0] else _alias_rows(buf, 0, end)


def _owns_storage(t: torch.Tensor) -> bool:
    """Whether `t` is a contiguous tensor spanning its whole storage (not a view into a larger one)."""
    return (t.is_contiguous() and t.storage_offset() == 0
            and t.untyped_storage().nbytes() == t.numel() * t.element_size())


def _add_grads(a: torch.Tensor | None, b: torch.Tensor | None, like: torch.Tensor,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """a + b where either may be None (no gradient: zero), into `out` when given, else a
    new tensor (never one of the inputs: an incoming gradient may alias the caller's)."""
    if a is not None and b is not None:
        return torch.add(a, b, out=out) if out is not None else a + b
    g = a if a is not None else b
    if out is None:
        return g.clone() if g is not None else torch.zeros_like(like)
    return out.copy_(g) if g is not None else out.zero_()


_ENGINE = getattr(torch.autograd.Variable, "_execution_engine", None)


def _island_grad(outputs: list[torch.Tensor], grads: list[torch.Tensor],
                 inputs: list[torch.Tensor]) -> tuple[torch.Tensor | None, ...]:
    """`torch.autograd.grad(outputs, inputs, grads, allow_unused=True)` without its Python
    argument handling (the caller matched shapes and dtypes): that costs about 25 µs a call,
    and a block makes about ten calls per chunk in each step."""
    if _ENGINE is None:
        return torch.autograd.grad(outputs, inputs, grads, allow_unused=True)
    return _ENGINE.run_backward(tensors=tuple(outputs), grad_tensors=tuple(grads),
                                keep_graph=False, create_graph=False, inputs=tuple(inputs),
                                allow_unreachable=True, accumulate_grad=False)


def _hand_to_caller(tensors: Iterable[torch.Tensor | None]) -> None:
    """Results made on plan streams and returned to the caller: on CUDA, record_stream for
    the caller's current stream, so their memory is not reused while it still reads them."""
    for t in tensors:
        if t is not None and t.device.type == "cuda":
            t.record_stream(torch.cuda.current_stream(t.device))


def _leaf(t: torch.Tensor, requires_grad: bool) -> torch.Tensor:
    return t.detach().requires_grad_(requires_grad and t.is_floating_point())


class _HostCounts:
    """A variable layout's exchanged counts (`ep_comm.exchange_counts`, ``[2, E]``: sent,
    received), on their way to the host, where `all_to_all_single` needs them as split sizes.

    Made by the chunk's `counts` op, read by its `dispatch` op: the one place the host
    waits. On CUDA the copy goes into pinned memory on the counts op's (comm) stream right
    after the exchange, and `get()` waits only for that copy's event, not for everything
    queued before it; the plan lists the counts op right after its route and the dispatch
    after the next compute op, so the host waits with that op's kernels already queued.
    On CPU the values are read when asked."""

    def __init__(self, counts: torch.Tensor) -> None:
        counts = counts.detach()
        self._event: torch.cuda.Event | None = None
        if counts.device.type == "cuda":
            host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
            host.copy_(counts, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
            counts = host
        self._counts = counts
        self._values: list[list[int]] | None = None

    def get(self) -> list[list[int]]:
        if self._values is None:
            if self._event is not None:
                self._event.synchronize()
            self._values = self._counts.tolist()
        return self._values


@dataclasses.dataclass
class _Island:
    inputs: list[torch.Tensor | None]  # leaves whose grads the backward op routes on
    outputs: list[torch.Tensor]
    params: list[nn.Parameter]

    @property
    def identity(self) -> bool:
        """The op returned its inputs unchanged (a comm op with one EP rank)."""
        return (not self.params and len(self.outputs) == len(self.inputs)
                and all(o is i for o, i in zip(self.outputs, self.inputs)))


class _Step:
    """State of one forward+backward of the block: activations kept by the islands, the
    K/V buffers, gradient slots. Created per call; its backward frees it."""

    def __init__(self, block: "_Engine", x: torch.Tensor, params: Sequence[nn.Parameter],
                 track: bool, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self.block = block
        self.layer = block.adapter
        self.rope = rope  # caller-supplied rotary tables (Megatron's rotary_pos_emb), or None
        self.plan = block.plan
        self.x = x
        self.track = track  # build islands (grad needed) or run plain forward
        self.x_grad = track and x.requires_grad
        self.params = list(params)
        self.param_index = {id(p): i for i, p in enumerate(self.params)}
        S, B = x.shape[0], x.shape[1]
        cfg = self.layer.cfg
        self.kv_shape = (S, B, cfg.query_groups, cfg.head_dim)
        # Allocated at the first op that fills them, in the dtype it produces (autocast).
        self.kbuf: torch.Tensor | None = None
        self.vbuf: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.q: dict[int | None, torch.Tensor] = {}
        self.islands: dict[tuple[str, int | None], _Island] = {}
        self.values: dict[tuple[str, int | None], Any] = {}
        self.losses: MoELosses | None = None
        self.layouts: dict[int, ep_comm.DispatchLayout] = {}  # per chunk, from dispatch to its backward
        # backward state
        self.slots: dict[tuple[str, int | None], torch.Tensor] = {}
        self.param_grads: list[torch.Tensor | None] = [None] * len(self.params)
        self.grad_acc_dtype = [torch.promote_types(p.dtype, torch.float32) for p in self.params]
        self._param_writer: dict[int, tuple[str, torch.cuda.Event]] = {}
        self.cuda = x.device.type == "cuda"
        self.executor = block._executor
        # capacity_scope sequence: per expert, the slots earlier chunks routed (route ops
        # run in chunk order; each adds its own).
        self.sequence_capacity = self.plan.capacity_scope == "sequence" and not cfg.dropless
        self.routed_before = (torch.zeros(cfg.num_experts, dtype=torch.int64, device=x.device)
                              if self.sequence_capacity else None)
        # Parameter gradients need cross-stream ordering only with several compute streams.
        self.order_param_grads = self.cuda and block._compute_streams > 1
        # Expert bias: count the kept slots per expert (grad enabled at the call, as Megatron).
        self.count_routed = (cfg.moe_router_enable_expert_bias and torch.is_grad_enabled()
                             and self.layer.routed_counts is not None)
        # The delay the emulation put on each comm op, per pass (`AMPipeBlock.last_delays_ms`).
        self.delays_ms: dict[str, dict[str, float]] = {"forward": {}, "backward": {}}

    # -- stream bookkeeping (CUDA) -----------------------------------------------------

    def _mark_used(self, *tensors: torch.Tensor | None) -> None:
        """record_stream: a tensor made on one stream, used by the current op's stream."""
        if not self.cuda:
            return
        stream = torch.cuda.current_stream(self.x.device)
        for t in tensors:
            if t is not None and t.device.type == "cuda":
                t.record_stream(stream)

    def _shared_empty(self, like: torch.Tensor, shape: Sequence[int],
                      dtype: torch.dtype | None = None) -> torch.Tensor:
        """A buffer several plan streams write (K/V, y, dK/dV). On CUDA it is allocated from
        the caller's stream's pool, whose queue every plan stream has waited on at the
        pass's entry: allocated on the stream of whichever op runs first, its memory could
        still be in use by that stream's earlier kernels when an op on another stream
        writes it (record_stream protects the free, not the first use)."""
        if not self.cuda or self.executor.caller_stream is None:
            return like.new_empty(shape, dtype=dtype)
        with torch.cuda.stream(self.executor.caller_stream):
            buf = like.new_empty(shape, dtype=dtype)
        self._mark_all_streams(buf)
        return buf

    def _delay(self, pass_name: str, kind: str, c: int | None, nbytes: int, *, inject: bool) -> float:
        """The emulated delay of moving `nbytes` (seconds; 0 without emulation), recorded per
        op; `inject`: spin the current (CUDA comm) stream for it now."""
        seconds = self.block._delay(nbytes, self.x.device, inject=inject)
        if seconds:
            self.delays_ms[pass_name][self.block._op_ids[(kind, c)]] = seconds * 1e3
        return seconds

    def _run(self, inputs: list[torch.Tensor | None], fn):
        """Run an island's `fn(*inputs)`: under enable_grad when tracking (`_keep` records it)."""
        self._mark_used(*inputs)
        if torch.is_grad_enabled() == self.track:  # the pass set it already (the usual case)
            return fn(*inputs)
        with torch.set_grad_enabled(self.track):
            return fn(*inputs)

    def _keep(self, key: tuple[str, int | None], inputs: list[torch.Tensor | None],
              outputs: Iterable[torch.Tensor], params: list[nn.Parameter]) -> None:
        if self.track:
            self.islands[key] = _Island(inputs, [o for o in outputs], params)

    def _rows(self, c: int | None) -> tuple[int, int]:
        return (0, self.x.shape[0]) if c is None else self.plan.chunk_rows(c)

    # -- forward ops -------------------------------------------------------------------

    def forward_op(self, op: PlanOp) -> CommWork | None:
        return getattr(self, f"_f_{op.kind}")(op.chunk)

    def _f_qkv(self, c: int | None) -> None:
        lo, hi = self._rows(c)
        xin = _leaf(self.x[lo:hi], self.x_grad)
        params = self.block._kind_params["qkv"]
        t = self._run([xin], lambda x: pieces.qkv(self.layer, x, lo, self.rope))
        if self.plan.chunk_qkv and (lo, hi) == (0, self.x.shape[0]):
            # One chunk: K/V are the sequence buffers. A view into the fused QKV output
            # (V; K without rope) is copied out so that the fused output can be freed.
            kv = []
            for out in (t.k, t.v):
                if not _owns_storage(out):
                    out.data = out.detach().clone(memory_format=torch.contiguous_format)
                kv.append(out.detach())
            self.kbuf, self.vbuf = kv
            self._mark_all_streams(self.kbuf, self.vbuf)
        elif self.plan.chunk_qkv:
            if self.kbuf is None:
                self.kbuf = self._shared_empty(t.k, self.kv_shape)
                self.vbuf = self._shared_empty(t.v, self.kv_shape)
            # Keep K/V once, in the sequence buffers: copy and rebind the island's outputs to
            # the buffer rows (their autograd graph is unchanged; only the storage moves).
            self.kbuf[lo:hi].copy_(t.k.detach())
            self.vbuf[lo:hi].copy_(t.v.detach())
            t.k.data = self.kbuf[lo:hi]
            t.v.data = self.vbuf[lo:hi]
        else:
            self.kbuf, self.vbuf = t.k.detach(), t.v.detach()
        self.q[c] = t.q
        self._keep(("qkv", c), [xin], [t.q, t.k, t.v], params)

    def _f_attn(self, c: int | None) -> None:
        lo, hi = self._rows(c)  # c None: the whole sequence (chunk_attention false)
        if c is None:
            q = self.q[None]
        else:
            q = self.q[c] if self.plan.chunk_qkv else _alias_rows(self.q[None].detach(), lo, hi)
        qin = _leaf(q, self.track)
        kin = _prefix(self.kbuf, hi).requires_grad_(self.track)
        vin = _prefix(self.vbuf, hi).requires_grad_(self.track)
        ctx = self._run([qin, kin, vin], lambda q, k, v: pieces.attention(self.layer, q, k, v))
        self.values[("ctx", c)] = ctx
        self._keep(("attn", c), [qin, kin, vin], [ctx], [])

    def _f_proj(self, c: int) -> None:
        lo, hi = self.plan.chunk_rows(c)
        # After a whole-sequence attention every chunk reads its rows of the one context.
        ctx = (self.values.pop(("ctx", c)) if self.plan.chunk_attention
               else self.values[("ctx", None)][lo:hi])
        cin = _leaf(ctx, self.track)
        rin = _leaf(self.x[lo:hi], self.x_grad)
        params = self.block._kind_params["proj"]
        h, normed = self._run([cin, rin], lambda a, r: pieces.proj(self.layer, a, r))
        self.values[("h", c)] = h
        self.values[("normed", c)] = normed
        self._keep(("proj", c), [cin, rin], [h, normed], params)

    def _f_route(self, c: int) -> None:
        # A shared expert reads the normed tokens too (unpermute drops them).
        normed = self.values[("normed", c)] if self.plan.shared_expert else self.values.pop(("normed", c))
        nin = _leaf(normed, self.track)
        params = self.block._kind_params["route"]

        # capacity_scope sequence: the whole sequence's capacity, chunk by chunk (`position`
        # policy): chunk c keeps what is left after the slots chunks 0..c-1 routed.
        before = self.routed_before
        seq = dict(sequence_tokens=self.x.shape[0] * self.x.shape[1], routed_before=before) \
            if before is not None else {}
        self._mark_used(before)

        def fn(n: torch.Tensor) -> tuple[Routing, Permuted]:
            routing = pieces.route(self.layer, n)
            return routing, pieces.permute(self.layer, n, routing, **seq)

        routing, permuted = self._run([nin], fn)
        if before is not None:  # scatter_add, not bincount: on CUDA bincount reads its max on the host
            flat = routing.indices.reshape(-1)
            self.routed_before = before.scatter_add(0, flat, torch.ones_like(flat))
        self.values[("routing", c)] = routing
        self.values[("permuted", c)] = permuted
        if self.count_routed:
            self.values[("kept", c)] = permuted.tokens_per_expert
        self._keep(("route", c), [nin], [permuted.buffer, routing.gates,
                                         routing.stats.probs_sum, routing.stats.z_sum], params)

    def _exchange(self, pass_name: str, kind: str, c: int | None, x: torch.Tensor,
                  out_splits: Sequence[int], in_splits: Sequence[int], then) -> CommWork:
        """Start the all-to-all of a comm op's rows `x`; `then(received)` is the op's remainder.
        On CPU the collective runs asynchronously and the executor finishes the op when a later
        op reads its result; on CUDA everything is enqueued on the comm stream now. The emulated
        delay is modelled on the bytes this rank receives (as many as it sends with one rank)."""
        defer = self.executor.defers_comm
        self._mark_used(x)
        recv, work = ep_comm.start_all_to_all(x, out_splits, in_splits, self.layer.ep, async_op=defer)
        nbytes = sum(out_splits) * (x.numel() // max(1, x.shape[0])) * x.element_size()
        seconds = self._delay(pass_name, kind, c, nbytes, inject=not defer)
        return CommWork(work, seconds if defer else 0.0, lambda: then(recv))

    def _f_counts(self, c: int) -> CommWork | None:
        permuted: Permuted = self.values[("permuted", c)]
        if permuted.capacity is not None:  # a static layout: nothing to exchange
            return None
        self._mark_used(permuted.tokens_per_expert)
        both, work = ep_comm.exchange_counts(permuted.tokens_per_expert, self.layer.ep,
                                             async_op=self.executor.defers_comm)

        def then() -> None:  # start the counts' trip to the host
            self.values[("counts", c)] = _HostCounts(both)
        return CommWork(work, 0.0, then)

    def _f_dispatch(self, c: int) -> CommWork:
        permuted: Permuted = self.values[("permuted", c)]
        bin_ = _leaf(permuted.buffer, self.track)
        counts = self.values.pop(("counts", c), None)
        cfg = self.layer.cfg
        if counts is not None:  # the host waits here, for this chunk's counts only
            send, recv = counts.get()
            layout = ep_comm.layout_from_counts(send, recv, self.layer.ep.size, cfg.num_experts)
        else:
            layout = ep_comm.static_layout(self.layer.ep.size, cfg.num_experts, permuted.capacity)
        self.layouts[c] = layout
        rows = self._run([bin_], lambda b: pieces.dispatch_rows(dataclasses.replace(permuted, buffer=b), layout))
        self._keep(("dispatch_send", c), [bin_], [rows], [])

        def then(received: torch.Tensor) -> None:
            rin = _leaf(received, self.track)
            d = self._run([rin], lambda r: pieces.dispatched_rows(r, layout))
            self.values[("dispatched", c)] = d
            self._keep(("dispatch", c), [rin], [d.tokens], [])
        return self._exchange("forward", "dispatch", c, rows, layout.recv_splits, layout.send_splits, then)

    def _f_experts(self, c: int) -> None:
        d = self.values[("dispatched", c)]
        tin = _leaf(d.tokens, self.track)
        params = self.block._kind_params["experts"]
        out = self._run([tin], lambda t: pieces.experts(
            self.layer, dataclasses.replace(d, tokens=t)))
        self.values[("expert_out", c)] = out
        self._keep(("experts", c), [tin], [out], params)

    def _f_combine(self, c: int) -> CommWork:
        d = self.values.pop(("dispatched", c))
        ein = _leaf(self.values.pop(("expert_out", c)), self.track)
        rows = self._run([ein], lambda e: pieces.combine_rows(e, d))
        self._keep(("combine", c), [ein], [rows], [])

        def then(received: torch.Tensor) -> None:
            self.values[("combined", c)] = received
        return self._exchange("forward", "combine", c, rows, d.layout.send_splits, d.layout.recv_splits, then)

    def _f_shared(self, c: int) -> None:
        """The shared expert of chunk c: compute-stream work with no communication, which the
        generators place where it hides an all-to-all of the routed experts."""
        nin = _leaf(self.values[("normed", c)], self.track)
        params = self.block._kind_params["shared"]
        out = self._run([nin], lambda n: pieces.shared_expert(self.layer, n))
        self.values[("shared", c)] = out
        self._keep(("shared", c), [nin], [out], params)

    def _f_unpermute(self, c: int) -> None:
        lo, hi = self.plan.chunk_rows(c)
        routing: Routing = self.values[("routing", c)]
        permuted: Permuted = self.values[("permuted", c)]
        comb = _leaf(self.values.pop(("combined", c)), self.track)
        gin = _leaf(routing.gates, self.track)
        hin = _leaf(self.values.pop(("h", c)), self.track)
        inputs = [comb, gin, hin]
        if self.plan.shared_expert:
            self.values.pop(("normed", c), None)
            inputs.append(_leaf(self.values.pop(("shared", c)), self.track))
        y = self._run(inputs, lambda a, g, h, *shared: pieces.unpermute(
            self.layer, a, permuted, dataclasses.replace(routing, gates=g), h, *shared))
        if (lo, hi) == (0, self.x.shape[0]):
            self.y = y.detach()  # one chunk: its output is the block output
        else:
            if self.y is None:
                self.y = self._shared_empty(y, self.x.shape)
            self.y[lo:hi].copy_(y.detach())
            if self.track:
                y.data = self.y[lo:hi]  # keep y once, in the block output
        self._keep(("unpermute", c), inputs, [y], [])

    def _f_aux_loss(self, c: None) -> None:
        stats: list[RoutingStats] = [self.values[("routing", j)].stats
                                     for j in range(self.plan.num_chunks)]
        leaves = [(_leaf(s.probs_sum, self.track), _leaf(s.z_sum, self.track)) for s in stats]

        def fn(*flat: torch.Tensor) -> MoELosses:
            chunks = [RoutingStats(s.tokens_per_expert, flat[2 * i], flat[2 * i + 1], s.num_tokens)
                      for i, s in enumerate(stats)]
            return pieces.moe_losses(self.layer.cfg, pieces.sum_stats(*chunks))

        flat = [t for pair in leaves for t in pair]
        self.losses = self._run(flat, fn)
        self._keep(("aux_loss", None), flat, [self.losses.aux_loss, self.losses.z_loss], [])
        if self.count_routed:  # the expert bias's counts: the step's kept slots, summed over chunks, once
            kept = [self.values.pop(("kept", j)) for j in range(self.plan.num_chunks)]
            self._mark_used(*kept)
            pieces.count_routed(self.layer, torch.stack(kept).sum(dim=0))

    # -- backward ops ------------------------------------------------------------------

    def begin_backward(self, grad_y: torch.Tensor | None, grad_aux: torch.Tensor | None,
                       grad_z: torch.Tensor | None) -> None:
        x = self.x
        S = x.shape[0]
        cfg = self.layer.cfg
        self.grad_y = grad_y
        self.grad_losses = (grad_aux, grad_z)
        # dx rows: proj_bwd[c] leaves the residual's gradient in a slot, qkv_bwd (which
        # follows it in every valid plan) writes residual + norm1 path in one add. One chunk
        # spanning the sequence returns that sum as dx; otherwise rows go into one buffer.
        self.dx: torch.Tensor | None = None
        # One sequence-long dK/dV each; chunks add into prefixes of them in place, in fp32
        # at least (P chunks add up: bf16 accumulation would round P times). The first
        # attn_bwd, when it covers the whole sequence (the last chunk, which plans run first),
        # hands over its own gradient as the buffer; otherwise the buffer is zero-filled.
        self.kv_acc = torch.promote_types(self.kbuf.dtype, torch.float32)
        self.dk: torch.Tensor | None = None
        self.dv: torch.Tensor | None = None
        # dQ: per chunk (qkv_bwd[c] reads its own); one sequence-long buffer for a whole-sequence qkv.
        self.dq: torch.Tensor | None = None
        if not self.plan.chunk_qkv:
            q = self.q[None]
            self.dq = x.new_empty((S, x.shape[1], cfg.num_attention_heads, cfg.head_dim),
                                  dtype=q.dtype)
        self._mark_all_streams(self.dq, grad_y, grad_aux, grad_z)

    def _mark_all_streams(self, *tensors: torch.Tensor | None) -> None:
        """Tensors made on the caller's stream and used by the plan's streams."""
        if not self.cuda:
            return
        ex = self.executor
        for name in ex.streams:
            s = ex.cuda_stream(name)
            for t in tensors:
                if t is not None:
                    t.record_stream(s)

    def backward_op(self, op: PlanOp) -> CommWork | None:
        return getattr(self, f"_b_{op.kind[:-4]}")(op.chunk)

    def _run_island_backward(self, key: tuple[str, int | None],
                             grads: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """autograd.grad of one island; returns its inputs' grads and accumulates its
        parameters' grads. Frees the island."""
        island = self.islands.pop(key)
        # The incoming gradients were made by other ops, maybe on other streams: they are the
        # tensors that cross onto this op's stream (a dtype conversion below is made here).
        self._mark_used(*grads)
        if island.identity:  # the engine would hand each gradient straight back
            return [None if g is None or i is None or not i.requires_grad
                    else g if g.dtype == i.dtype else g.to(i.dtype)
                    for i, g in zip(island.inputs, grads)]
        outs, gouts = [], []
        for o, g in zip(island.outputs, grads):
            if g is not None and o.requires_grad:
                if g.shape != o.shape:  # the engine would broadcast-reduce it silently
                    raise RuntimeError(f"AMPipeBlock: gradient of shape {tuple(g.shape)} for an "
                                       f"output of shape {tuple(o.shape)} ({key[0]} op)")
                outs.append(o)
                gouts.append(g if g.dtype == o.dtype else g.to(o.dtype))
        wrt_inputs = [i for i in island.inputs if i is not None and i.requires_grad]
        params = [p for p in island.params if p.requires_grad]
        if not outs or not (wrt_inputs or params):
            return [None] * len(island.inputs)
        got = _island_grad(outs, gouts, wrt_inputs + params)
        # The engine allocates these on the island's forward stream; `check_cuda_streams`
        # makes that the current one, record_stream keeps it right if it ever differs.
        self._mark_used(*got)
        by_input = dict(zip(map(id, wrt_inputs), got[:len(wrt_inputs)]))
        for p, g in zip(params, got[len(wrt_inputs):]):
            if g is not None:
                self._accumulate_param(p, g)
        return [by_input.get(id(i)) if i is not None else None for i in island.inputs]

    def _accumulate_param(self, p: nn.Parameter, g: torch.Tensor) -> None:
        i = self.param_index[id(p)]
        cur = self.param_grads[i]
        if cur is None and self.plan.num_chunks > 1 and g.dtype != self.grad_acc_dtype[i]:
            # Chunks add up: a bf16/fp16 parameter's gradient is summed in fp32 (each
            # low-precision add would round), as Megatron sums into an fp32 main_grad.
            g = g.to(self.grad_acc_dtype[i])
        if self.order_param_grads:
            # Ops on different compute streams may add into one parameter's gradient: order them.
            here = self.executor.current_stream_name
            prev = self._param_writer.get(i)
            if prev is not None and prev[0] != here:
                torch.cuda.current_stream(self.x.device).wait_event(prev[1])
                self._mark_used(cur)
        if cur is None:
            self.param_grads[i] = g
        else:
            cur.add_(g)
        if self.order_param_grads:
            ev = torch.cuda.Event()
            ev.record()
            self._param_writer[i] = (self.executor.current_stream_name, ev)

    def finish_param_grads(self) -> list[torch.Tensor | None]:
        """The Function's parameter gradients (on the caller's stream, after the pass).

        A parameter with a ``main_grad`` (Megatron's fp32 gradient buffer) gets its sum added
        there; when it also has ``grad_added_to_main_grad``, Megatron's DDP hooks expect a
        placeholder gradient and the flag set (as its fused weight-gradient linears do),
        else nothing is returned for it. Otherwise the sum is returned in the parameter's dtype."""
        out: list[torch.Tensor | None] = []
        for p, g in zip(self.params, self.param_grads):
            if g is None:
                out.append(None)
            elif getattr(p, "main_grad", None) is not None:
                p.main_grad.add_(g)
                if hasattr(p, "grad_added_to_main_grad"):
                    p.grad_added_to_main_grad = True
                    out.append(torch.zeros_like(p))
                else:
                    out.append(None)
            else:
                out.append(g if g.dtype == p.dtype else g.to(p.dtype))
        return out

    def _slot(self, key: tuple[str, int | None]) -> torch.Tensor | None:
        return self.slots.pop(key, None)

    def _put(self, key: tuple[str, int | None], g: torch.Tensor | None) -> None:
        if g is None:
            return
        prev = self.slots.get(key)
        self.slots[key] = g if prev is None else prev + g

    def _b_aux_loss(self, c: None) -> None:
        grads = self._run_island_backward(("aux_loss", None), list(self.grad_losses))
        for j in range(self.plan.num_chunks):
            self._put(("probs_sum", j), grads[2 * j])
            self._put(("z_sum", j), grads[2 * j + 1])

    def _b_unpermute(self, c: int) -> None:
        lo, hi = self.plan.chunk_rows(c)
        gy = None if self.grad_y is None else self.grad_y[lo:hi]
        g_comb, g_gates, g_h, *g_shared = self._run_island_backward(("unpermute", c), [gy])
        self._put(("combined", c), g_comb)
        self._put(("gates", c), g_gates)
        self._put(("h", c), g_h)
        if g_shared:
            self._put(("shared", c), g_shared[0])

    def _b_shared(self, c: int) -> None:
        (g_n,) = self._run_island_backward(("shared", c), [self._slot(("shared", c))])
        self._put(("normed", c), g_n)

    def _b_combine(self, c: int) -> CommWork:
        layout = self.layouts[c]
        g = self._slot(("combined", c))
        if g is None:  # every rank takes part in the exchange
            g = self.x.new_zeros((layout.num_send_rows, self.x.shape[-1]))

        def then(g_rows: torch.Tensor) -> None:
            (g_e,) = self._run_island_backward(("combine", c), [g_rows])
            self._put(("expert_out", c), g_e)
        return self._exchange("backward", "combine_bwd", c, g, layout.recv_splits, layout.send_splits, then)

    def _b_experts(self, c: int) -> None:
        (g_t,) = self._run_island_backward(("experts", c), [self._slot(("expert_out", c))])
        self._put(("tokens", c), g_t)

    def _b_dispatch(self, c: int) -> CommWork:
        layout = self.layouts.pop(c)
        g = self._slot(("tokens", c))
        (g_recv,) = self._run_island_backward(("dispatch", c), [g])
        if g_recv is None:  # every rank takes part in the exchange
            g_recv = self.x.new_zeros((layout.num_recv_rows, self.x.shape[-1]))

        def then(g_rows: torch.Tensor) -> None:
            (g_b,) = self._run_island_backward(("dispatch_send", c), [g_rows])
            self._put(("buffer", c), g_b)
        return self._exchange("backward", "dispatch_bwd", c, g_recv, layout.send_splits, layout.recv_splits, then)

    def _b_route(self, c: int) -> None:
        grads = [self._slot(("buffer", c)), self._slot(("gates", c)),
                 self._slot(("probs_sum", c)), self._slot(("z_sum", c))]
        (g_n,) = self._run_island_backward(("route", c), grads)
        self._put(("normed", c), g_n)

    def _b_proj(self, c: int) -> None:
        g_ctx, g_res = self._run_island_backward(
            ("proj", c), [self._slot(("h", c)), self._slot(("normed", c))])
        self._put(("ctx", c), g_ctx)
        if self.x_grad:
            self.slots[("res", c)] = g_res

    def _b_attn(self, c: int | None) -> None:
        lo, hi = self._rows(c)
        g_ctx = self._slot(("ctx", c)) if c is not None else self._whole_ctx_grad()
        g_q, g_k, g_v = self._run_island_backward(("attn", c), [g_ctx])
        # dK/dV of the prefix, added in place: never a sequence-long tensor per chunk.
        if self.dk is None:
            S = self.x.shape[0]
            adopt = hi == S and all(g is not None and g.dtype == self.kv_acc and g.shape == self.kv_shape
                                    for g in (g_k, g_v))
            if adopt:
                self.dk, self.dv, g_k, g_v = g_k, g_v, None, None
            else:
                self.dk = self._shared_empty(self.x, self.kv_shape, self.kv_acc).zero_()
                self.dv = self._shared_empty(self.x, self.kv_shape, self.kv_acc).zero_()
            self._mark_all_streams(self.dk, self.dv)
        if g_k is not None:
            self.dk[:hi].add_(g_k)
        if g_v is not None:
            self.dv[:hi].add_(g_v)
        if g_q is not None:
            if self.dq is not None:
                self.dq[lo:hi].copy_(g_q)
            else:
                self.slots[("q", c)] = g_q

    def _whole_ctx_grad(self) -> torch.Tensor | None:
        """The context gradient of a whole-sequence attention: every chunk's proj_bwd rows."""
        parts = [self._slot(("ctx", j)) for j in range(self.plan.num_chunks)]
        like = next((g for g in parts if g is not None), None)
        if like is None:
            return None
        self._mark_used(*parts)
        return torch.cat([g if g is not None else like.new_zeros((b - a, *like.shape[1:]))
                          for g, (a, b) in zip(parts, map(self.plan.chunk_rows,
                                                          range(self.plan.num_chunks)))])

    def _b_qkv(self, c: int | None) -> None:
        lo, hi = self._rows(c)
        dq = self.dq[lo:hi] if self.dq is not None else self._slot(("q", c))
        (g_x,) = self._run_island_backward(("qkv", c), [dq, self.dk[lo:hi], self.dv[lo:hi]])
        if not self.x_grad:
            return
        if self.plan.num_chunks == 1:  # dx is this sum, no buffer
            res = self._slot(("res", 0))
            self._mark_used(res)
            self.dx = _add_grads(res, g_x, self.x)
            return
        chunks = [c] if c is not None else range(self.plan.num_chunks)
        if self.dx is None:
            self.dx = self._shared_empty(self.x, self.x.shape)
        for j in chunks:
            a, b = self.plan.chunk_rows(j)
            gx = None if g_x is None else g_x[a - lo:b - lo]
            res = self._slot(("res", j))
            self._mark_used(res)
            _add_grads(res, gx, self.x[a:b], out=self.dx[a:b])


class _PipelinedBlockFn(torch.autograd.Function):
    """The whole pipelined block as one autograd node: (x, *params) -> (y, aux, z)."""

    @staticmethod
    def forward(ctx, step: _Step, x: torch.Tensor, *params: torch.Tensor):
        block = step.block
        with torch.enable_grad(), spans.span("pipelined pass", "block", **{"pass": "forward"}):
            # enable_grad: islands record graphs (`_Step._run` then need not switch)
            block.last_times = {"forward": step.executor.run(
                block.plan.forward, step.forward_op, "forward", needs=block._needs["forward"])}
        block.last_delays_ms = step.delays_ms
        step.values.clear()
        ctx.step = step
        losses = step.losses
        # The step must not reference the Function's output: y -> grad_fn -> ctx -> step -> y
        # would be a cycle through autograd that only the garbage collector could break.
        y, step.y = step.y, None
        aux, z = losses.aux_loss.detach(), losses.z_loss.detach()
        _hand_to_caller((y, aux, z))  # made on plan streams, used by the caller's
        return y, aux, z

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, grad_aux, grad_z):
        step: _Step | None = ctx.step
        if step is None:
            raise RuntimeError("AMPipeBlock: backward through the block a second time; its "
                               "activations are freed after the first (retain_graph is not "
                               "supported)")
        ctx.step = None  # free the activations once backward is done
        block = step.block
        with spans.span("pipelined pass", "block", **{"pass": "backward"}):
            step.begin_backward(grad_y, grad_aux, grad_z)
            times = step.executor.run(block.plan.backward, step.backward_op, "backward",
                                      needs=block._needs["backward"])
        block.last_times = {**(block.last_times or {}), "backward": times}
        block.last_delays_ms = step.delays_ms
        _hand_to_caller((step.dx, *step.param_grads))  # made on plan streams
        return (None, step.dx, *step.finish_param_grads())


class _Engine:
    """A pipelined layer's state: its adapter, plan, emulation and the latest step's times.

    Parameters are read from the layer at every call (not cached), so parameter objects
    replaced under it (``load_state_dict(assign=True)``, ``to_empty``, FSDP-style swaps) are
    the ones trained; the per-op lists are rebuilt only when the parameters changed."""

    def __init__(self, adapter: LayerAdapter, plan: Plan, emulated_comm: EmulatedComm | None,
                 record_times: bool, original_class: type) -> None:
        check_dims(plan, block_dims(adapter))
        check_capacity_scope(plan.capacity_scope, adapter.cfg.moe_token_drop_policy)
        self.adapter = adapter
        self.plan = plan
        self.emulated_comm = emulated_comm
        self.record_times = record_times
        self.original_class = original_class
        self.last_times: dict[str, OpTimes] | None = None
        self.last_delays_ms: dict[str, dict[str, float]] | None = None
        self._op_ids = {(op.kind, op.chunk): op.id for op in (*plan.forward, *plan.backward)}
        # What each op reads (the CPU executor finishes those comm ops before running it).
        self._needs = {"forward": data_needs(plan, True), "backward": data_needs(plan, False)}
        # What a user should know about running this layer with this plan (`SwapReport.notes`).
        self.notes: list[str] = []
        if adapter.cfg.moe_expert_capacity_factor is not None and plan.capacity_scope == "chunk" \
                and plan.num_chunks > 1:
            self.notes.append(
                "capacity sized per chunk (capacity_scope chunk, the paper's): a different function from "
                "the layer's whole-sequence capacity wherever a chunk fills an expert (exact: a plan with "
                "capacity_scope sequence and moe_token_drop_policy position)")
        self._compute_streams = compute_stream_count(plan)
        self._param_key: tuple[int, ...] | None = None
        self._kind_params: dict[str, list[nn.Parameter]] = {}
        self._delay_cache: dict[torch.device, DelayInjector] = {}
        self._device: torch.device | None = None
        try:  # refuse a layer with parameters no op differentiates now, not at the first step
            self._params()
        except PlanError as e:
            raise NotSwappable(str(e).removeprefix("AMPipeBlock: ")) from None

    def _params(self) -> list[nn.Parameter]:
        """The layer's parameters (the Function's inputs); each op kind's are rebuilt when
        the parameter objects changed."""
        params = list(self.adapter.adapted.parameters())
        key = tuple(map(id, params))
        if key != self._param_key:
            mods = self.adapter.op_modules
            self._kind_params = {k: [p for m in mods.get(k, ()) for p in m.parameters()] for k in _PARAM_KINDS}
            covered = {id(p) for ps in self._kind_params.values() for p in ps}
            missing = [n for n, p in self.adapter.adapted.named_parameters() if id(p) not in covered]
            if missing:
                raise PlanError(f"AMPipeBlock: no plan op differentiates parameter(s) {missing}")
            self._param_key = key
        return params

    @property
    def _executor(self) -> StreamExecutor:
        return self._executor_for(self._device)

    def _executor_for(self, device: torch.device) -> StreamExecutor:
        """The process-wide executor for this device and stream spec (shared by blocks);
        on CUDA the plan must first pass `check_cuda_streams`."""
        if device.type == "cuda":
            check_cuda_streams(self.plan)
        return shared_executor(self.plan.streams, device, self.record_times)

    def _injector(self, device: torch.device) -> DelayInjector:
        inj = self._delay_cache.get(device)
        if inj is None:  # on CUDA this calibrates (and synchronises) once per device
            inj = self._delay_cache[device] = DelayInjector(self.emulated_comm, device)
        return inj

    def _delay(self, nbytes: int, device: torch.device, *, inject: bool) -> float:
        """The modelled seconds of moving `nbytes`; `inject`: apply them now (CUDA: spin the
        current stream; CPU: sleep); otherwise the executor models them in time."""
        if self.emulated_comm is None:
            return 0.0
        if inject:
            return self._injector(device)(nbytes)
        return self.emulated_comm.delay_s(nbytes)

    def run(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
            ) -> tuple[torch.Tensor, MoELosses]:
        """The block on ``x [s, b, H]``: ``(y, MoELosses)``. ``rope``: the whole sequence's
        ``(cos, sin)`` tables when the caller supplies the rotary angles."""
        S, B = x.shape[0], x.shape[1]
        if S != self.plan.boundaries[-1] or S != self.plan.dims.get("seq_length", S):
            raise PlanError(f"AMPipeBlock: input has {S} rows but the plan's seq_length is "
                            f"{self.plan.boundaries[-1]} (make a plan with ampipe plan ... "
                            f"--set model.seq_length={S})")
        mbs = self.plan.dims.get("micro_batch_size")
        if mbs is not None and mbs != B:
            raise PlanError(f"AMPipeBlock: input micro-batch size {B} != plan "
                            f"dims.micro_batch_size {mbs} (make a plan with ampipe plan ... "
                            f"--set model.micro_batch_size={B})")
        self._device = x.device
        if self.emulated_comm is not None:
            self._injector(x.device)  # before the block's ops: calibration synchronises
        params = self._params()
        track = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
        step = _Step(self, x.detach(), params, track, rope)
        if track:
            step.x_grad = x.requires_grad
            y, aux, z = _PipelinedBlockFn.apply(step, x, *params)
        else:
            self.last_times = {"forward": step.executor.run(
                self.plan.forward, step.forward_op, "forward", needs=self._needs["forward"])}
            self.last_delays_ms = step.delays_ms
            step.values.clear()
            y, aux, z = step.y, step.losses.aux_loss, step.losses.z_loss
            _hand_to_caller((y, aux, z))  # as the grad path does
        return y, MoELosses(aux_loss=aux, z_loss=z)


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

    _ampipe: _Engine

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
                   record_times: bool = True) -> _Engine:
    """Every check of `apply_ampipe`, changing nothing: the engine it would install.
    Raises `NotSwappable` (the layer) or `PlanError` (the plan does not fit it)."""
    from ..adapters import adapter_for, plan_fit_error

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
    return _Engine(adapter, plan, emulated_comm, record_times, type(layer))


def _install(layer: nn.Module, engine: _Engine) -> AMPipeBlock:
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
