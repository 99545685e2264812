"""The pipelined block's ops: one forward and one backward function per op kind.

Each function runs one plan op of a step (`step.Step`): it takes the values its kind reads and
puts the values its kind writes through the op's `OpIO` (`dataflow.py`), which holds it to the
op-kind table (op_kinds.json), so what an op may read is exactly what the validator ordered
before it. A forward op runs the model's own step function (`ampipe.model.block_pieces`) as an
autograd *island* on detached inputs and keeps it (`Step._keep`); its backward op differentiates
that island (`Step._run_island_backward`). A comm op starts its all-to-all and returns a
`CommWork` whose remainder (what it does with the received rows) the executor runs when a
later op needs it (`streams.py`).

`FORWARD` and `BACKWARD` map each kind to its function; test/py/pipeline/test_op_kinds.py checks
that they cover the table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from ..model import block_pieces as pieces
from ..model.block_pieces import Dispatched, MoELosses, Permuted, Routing, RoutingStats
from ..parallel import expert_comm as ep_comm
from .dataflow import OpIO
from .streams import CommWork

if TYPE_CHECKING:
    from .step import Step

__all__ = ["FORWARD", "BACKWARD", "HostCounts"]

OpFn = Callable[["Step", OpIO], "CommWork | None"]
FORWARD: dict[str, OpFn] = {}
BACKWARD: dict[str, OpFn] = {}


def _forward(kind: str) -> Callable[[OpFn], OpFn]:
    def register(fn: OpFn) -> OpFn:
        FORWARD[kind] = fn
        return fn
    return register


def _backward(kind: str) -> Callable[[OpFn], OpFn]:
    def register(fn: OpFn) -> OpFn:
        BACKWARD[kind] = fn
        return fn
    return register


# -- tensors ------------------------------------------------------------------------------

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


def _leaf(t: torch.Tensor, requires_grad: bool) -> torch.Tensor:
    return t.detach().requires_grad_(requires_grad and t.is_floating_point())


def _sum(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """a + b, where a missing gradient (None) is zero."""
    return b if a is None else a if b is None else a + b


class HostCounts:
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


def _exchange(st: Step, pass_name: str, kind: str, c: int | None, x: torch.Tensor,
              out_splits: Sequence[int], in_splits: Sequence[int], then: Callable[[torch.Tensor], None]) -> CommWork:
    """Start the all-to-all of a comm op's rows `x`; `then(received)` is the op's remainder.
    On CPU the collective runs asynchronously and the executor finishes the op when a later
    op reads its result; on CUDA everything is enqueued on the comm stream now. The emulated
    delay is modelled on the bytes this rank receives (as many as it sends with one rank)."""
    defer = st.executor.defers_comm
    st._mark_used(x)
    recv, work = ep_comm.start_all_to_all(x, out_splits, in_splits, st.layer.ep, async_op=defer)
    nbytes = sum(out_splits) * (x.numel() // max(1, x.shape[0])) * x.element_size()
    seconds = st._delay(pass_name, kind, c, nbytes, inject=not defer)
    return CommWork(work, seconds if defer else 0.0, lambda: then(recv))


# -- forward ops ----------------------------------------------------------------------------

@_forward("qkv")
def f_qkv(st: Step, io: OpIO) -> None:
    c = io.chunk
    lo, hi = st._rows(c)
    xin = _leaf(st.x[lo:hi], st.x_grad)
    t = st._run([xin], lambda x: pieces.qkv(st.layer, x, lo, st.rope))
    if st.plan.chunk_qkv and (lo, hi) == (0, st.x.shape[0]):
        # One chunk: K/V are the sequence buffers. A view into the fused QKV output
        # (V; K without rope) is copied out so that the fused output can be freed.
        kv = []
        for out in (t.k, t.v):
            if not _owns_storage(out):
                out.data = out.detach().clone(memory_format=torch.contiguous_format)
            kv.append(out.detach())
        st.kbuf, st.vbuf = kv
        st._mark_all_streams(st.kbuf, st.vbuf)
    elif st.plan.chunk_qkv:
        if st.kbuf is None:
            st.kbuf = st._shared_empty(t.k, st.kv_shape)
            st.vbuf = st._shared_empty(t.v, st.kv_shape)
        # Keep K/V once, in the sequence buffers: copy and rebind the island's outputs to
        # the buffer rows (their autograd graph is unchanged; only the storage moves).
        st.kbuf[lo:hi].copy_(t.k.detach())
        st.vbuf[lo:hi].copy_(t.v.detach())
        t.k.data = st.kbuf[lo:hi]
        t.v.data = st.vbuf[lo:hi]
    else:
        st.kbuf, st.vbuf = t.k.detach(), t.v.detach()
    io.put("q", t.q)
    st._keep(("qkv", c), [xin], [t.q, t.k, t.v], st.block._kind_params["qkv"])


@_forward("attn")
def f_attn(st: Step, io: OpIO) -> None:
    c = io.chunk
    lo, hi = st._rows(c)  # c None: the whole sequence (chunk_attention false)
    q = io.take("q")  # a whole-sequence qkv's q covers every chunk: this chunk's rows of it
    if c is not None and not st.plan.chunk_qkv:
        q = _alias_rows(q.detach(), lo, hi)
    qin = _leaf(q, st.track)
    kin = _prefix(st.kbuf, hi).requires_grad_(st.track)
    vin = _prefix(st.vbuf, hi).requires_grad_(st.track)
    ctx = st._run([qin, kin, vin], lambda q, k, v: pieces.attention(st.layer, q, k, v))
    io.put("context", ctx)
    st._keep(("attn", c), [qin, kin, vin], [ctx], [])


@_forward("proj")
def f_proj(st: Step, io: OpIO) -> None:
    c = io.chunk
    lo, hi = st.plan.chunk_rows(c)
    ctx = io.take("context")
    if not st.plan.chunk_attention:  # every chunk reads its rows of the one context
        ctx = ctx[lo:hi]
    cin = _leaf(ctx, st.track)
    rin = _leaf(st.x[lo:hi], st.x_grad)
    h, normed = st._run([cin, rin], lambda a, r: pieces.proj(st.layer, a, r))
    io.put("h", h)
    io.put("normed", normed)
    st._keep(("proj", c), [cin, rin], [h, normed], st.block._kind_params["proj"])


@_forward("route")
def f_route(st: Step, io: OpIO) -> None:
    c = io.chunk
    nin = _leaf(io.take("normed"), st.track)

    # capacity_scope sequence: the whole sequence's capacity, chunk by chunk (`position`
    # policy): chunk c keeps what is left after the slots chunks 0..c-1 routed.
    before = None
    if st.sequence_capacity:
        before = io.take("routed_before", c - 1) if c > 0 else st.zero_counts
    seq = dict(sequence_tokens=st.x.shape[0] * st.x.shape[1], routed_before=before) \
        if before is not None else {}
    st._mark_used(before)

    def fn(n: torch.Tensor) -> tuple[Routing, Permuted]:
        routing = pieces.route(st.layer, n)
        return routing, pieces.permute(st.layer, n, routing, **seq)

    routing, permuted = st._run([nin], fn)
    if before is not None:  # scatter_add, not bincount: on CUDA bincount reads its max on the host
        flat = routing.indices.reshape(-1)
        io.put("routed_before", before.scatter_add(0, flat, torch.ones_like(flat)))
    io.put("routing", routing)
    io.put("permuted", permuted)
    if st.count_routed:
        io.put("kept", permuted.tokens_per_expert)
    st._keep(("route", c), [nin], [permuted.buffer, routing.gates,
                                    routing.stats.probs_sum, routing.stats.z_sum],
             st.block._kind_params["route"])


@_forward("counts")
def f_counts(st: Step, io: OpIO) -> CommWork | None:
    permuted: Permuted = io.take("permuted")
    if permuted.capacity is not None:  # a static layout: nothing to exchange
        io.put("counts", None)
        return None
    st._mark_used(permuted.tokens_per_expert)
    both, work = ep_comm.exchange_counts(permuted.tokens_per_expert, st.layer.ep,
                                         async_op=st.executor.defers_comm)

    def then() -> None:  # start the counts' trip to the host
        io.put("counts", HostCounts(both))
    return CommWork(work, 0.0, then)


@_forward("dispatch")
def f_dispatch(st: Step, io: OpIO) -> CommWork:
    c = io.chunk
    permuted: Permuted = io.take("permuted")
    bin_ = _leaf(permuted.buffer, st.track)
    counts: HostCounts | None = io.take("counts")  # None: a static layout
    cfg = st.layer.cfg
    if counts is not None:  # the host waits here, for this chunk's counts only
        send, recv = counts.get()
        layout = ep_comm.layout_from_counts(send, recv, st.layer.ep.size, cfg.num_experts)
    else:
        layout = ep_comm.static_layout(st.layer.ep.size, cfg.num_experts, permuted.capacity)
    rows = st._run([bin_], lambda b: pieces.dispatch_rows(dataclasses.replace(permuted, buffer=b), layout))
    st._keep(("dispatch_send", c), [bin_], [rows], [], layout=layout)

    def then(received: torch.Tensor) -> None:
        rin = _leaf(received, st.track)
        d = st._run([rin], lambda r: pieces.dispatched_rows(r, layout))
        io.put("dispatched", d)
        st._keep(("dispatch", c), [rin], [d.tokens], [])
    return _exchange(st, "forward", "dispatch", c, rows, layout.recv_splits, layout.send_splits, then)


@_forward("experts")
def f_experts(st: Step, io: OpIO) -> None:
    c = io.chunk
    d: Dispatched = io.take("dispatched")
    tin = _leaf(d.tokens, st.track)
    out = st._run([tin], lambda t: pieces.experts(st.layer, dataclasses.replace(d, tokens=t)))
    io.put("expert_out", Dispatched(out, d.layout))  # the outputs, in the rows' dispatched layout
    st._keep(("experts", c), [tin], [out], st.block._kind_params["experts"])


@_forward("combine")
def f_combine(st: Step, io: OpIO) -> CommWork:
    c = io.chunk
    e: Dispatched = io.take("expert_out")
    ein = _leaf(e.tokens, st.track)
    rows = st._run([ein], lambda t: pieces.combine_rows(t, e))
    st._keep(("combine", c), [ein], [rows], [], layout=e.layout)

    def then(received: torch.Tensor) -> None:
        io.put("combined", received)
    return _exchange(st, "forward", "combine", c, rows, e.layout.send_splits, e.layout.recv_splits, then)


@_forward("shared")
def f_shared(st: Step, io: OpIO) -> None:
    """The shared expert of chunk c: compute-stream work with no communication, which the
    generators place where it hides an all-to-all of the routed experts."""
    c = io.chunk
    nin = _leaf(io.take("normed"), st.track)
    out = st._run([nin], lambda n: pieces.shared_expert(st.layer, n))
    io.put("shared_out", out)
    st._keep(("shared", c), [nin], [out], st.block._kind_params["shared"])


@_forward("unpermute")
def f_unpermute(st: Step, io: OpIO) -> None:
    c = io.chunk
    lo, hi = st.plan.chunk_rows(c)
    routing: Routing = io.take("routing")
    permuted: Permuted = io.take("permuted")
    comb = _leaf(io.take("combined"), st.track)
    gin = _leaf(routing.gates, st.track)
    hin = _leaf(io.take("h"), st.track)
    inputs = [comb, gin, hin]
    if st.plan.shared_expert:
        inputs.append(_leaf(io.take("shared_out"), st.track))
    y = st._run(inputs, lambda a, g, h, *shared: pieces.unpermute(
        st.layer, a, permuted, dataclasses.replace(routing, gates=g), h, *shared))
    if (lo, hi) == (0, st.x.shape[0]):
        st.y = y.detach()  # one chunk: its output is the block output
    else:
        if st.y is None:
            st.y = st._shared_empty(y, st.x.shape)
        st.y[lo:hi].copy_(y.detach())
        if st.track:
            y.data = st.y[lo:hi]  # keep y once, in the block output
    st._keep(("unpermute", c), inputs, [y], [])


@_forward("aux_loss")
def f_aux_loss(st: Step, io: OpIO) -> None:
    P = st.plan.num_chunks
    stats: list[RoutingStats] = [io.take("routing", j).stats for j in range(P)]
    leaves = [(_leaf(s.probs_sum, st.track), _leaf(s.z_sum, st.track)) for s in stats]

    def fn(*flat: torch.Tensor) -> MoELosses:
        chunks = [RoutingStats(s.tokens_per_expert, flat[2 * i], flat[2 * i + 1], s.num_tokens)
                  for i, s in enumerate(stats)]
        return pieces.moe_losses(st.layer.cfg, pieces.sum_stats(*chunks))

    flat = [t for pair in leaves for t in pair]
    st.losses = st._run(flat, fn)
    st._keep(("aux_loss", None), flat, [st.losses.aux_loss, st.losses.z_loss], [])
    if st.count_routed:  # the expert bias's counts: the step's kept slots, summed over chunks, once
        kept = [io.take("kept", j) for j in range(P)]
        st._mark_used(*kept)
        pieces.count_routed(st.layer, torch.stack(kept).sum(dim=0))


# -- backward ops ---------------------------------------------------------------------------

@_backward("aux_loss_bwd")
def b_aux_loss(st: Step, io: OpIO) -> None:
    grads = st._run_island_backward(("aux_loss", None), list(st.grad_losses))
    io.put("grad_probs_sum", grads[0::2])  # per chunk
    io.put("grad_z_sum", grads[1::2])


@_backward("unpermute_bwd")
def b_unpermute(st: Step, io: OpIO) -> None:
    c = io.chunk
    lo, hi = st.plan.chunk_rows(c)
    gy = None if st.grad_y is None else st.grad_y[lo:hi]
    g_comb, g_gates, g_h, *g_shared = st._run_island_backward(("unpermute", c), [gy])
    io.put("grad_combined", g_comb)
    io.put("grad_gates", g_gates)
    io.put("grad_h", g_h)
    if g_shared:
        io.put("grad_shared_out", g_shared[0])


@_backward("shared_bwd")
def b_shared(st: Step, io: OpIO) -> None:
    (g_n,) = st._run_island_backward(("shared", io.chunk), [io.take("grad_shared_out")])
    io.put("grad_normed_shared", g_n)


@_backward("combine_bwd")
def b_combine(st: Step, io: OpIO) -> CommWork:
    c = io.chunk
    layout = st.islands[("combine", c)].layout
    g = io.take("grad_combined")
    if g is None:  # every rank takes part in the exchange
        g = st.x.new_zeros((layout.num_send_rows, st.x.shape[-1]))

    def then(g_rows: torch.Tensor) -> None:
        (g_e,) = st._run_island_backward(("combine", c), [g_rows])
        io.put("grad_expert_out", g_e)
    return _exchange(st, "backward", "combine_bwd", c, g, layout.recv_splits, layout.send_splits, then)


@_backward("experts_bwd")
def b_experts(st: Step, io: OpIO) -> None:
    (g_t,) = st._run_island_backward(("experts", io.chunk), [io.take("grad_expert_out")])
    io.put("grad_dispatched", g_t)


@_backward("dispatch_bwd")
def b_dispatch(st: Step, io: OpIO) -> CommWork:
    c = io.chunk
    layout = st.islands[("dispatch_send", c)].layout
    (g_recv,) = st._run_island_backward(("dispatch", c), [io.take("grad_dispatched")])
    if g_recv is None:  # every rank takes part in the exchange
        g_recv = st.x.new_zeros((layout.num_recv_rows, st.x.shape[-1]))

    def then(g_rows: torch.Tensor) -> None:
        (g_b,) = st._run_island_backward(("dispatch_send", c), [g_rows])
        io.put("grad_permuted", g_b)
    return _exchange(st, "backward", "dispatch_bwd", c, g_recv, layout.send_splits, layout.recv_splits, then)


@_backward("route_bwd")
def b_route(st: Step, io: OpIO) -> None:
    c = io.chunk
    grads = [io.take("grad_permuted"), io.take("grad_gates"),
             io.take("grad_probs_sum")[c], io.take("grad_z_sum")[c]]
    (g_n,) = st._run_island_backward(("route", c), grads)
    io.put("grad_normed", g_n)


@_backward("proj_bwd")
def b_proj(st: Step, io: OpIO) -> None:
    c = io.chunk
    g_route = io.take("grad_normed")
    g_shared = io.take("grad_normed_shared") if st.plan.shared_expert else None
    st._mark_used(g_route, g_shared)  # made on their ops' streams, summed on this one
    g_ctx, g_res = st._run_island_backward(("proj", c), [io.take("grad_h"), _sum(g_route, g_shared)])
    io.put("grad_context", g_ctx)
    if st.x_grad:
        st.input_grad.add(c, g_res)  # the residual path's part of dx


@_backward("attn_bwd")
def b_attn(st: Step, io: OpIO) -> None:
    c = io.chunk
    lo, hi = st._rows(c)
    if c is not None:
        g_ctx = io.take("grad_context")
    else:  # a whole-sequence attention: every chunk's proj_bwd rows
        parts = [io.take("grad_context", j) for j in range(st.plan.num_chunks)]
        g_ctx = _cat_rows(st, parts)
    g_q, g_k, g_v = st._run_island_backward(("attn", c), [g_ctx])
    # dK/dV of the prefix, added in place: never a sequence-long tensor per chunk.
    if st.dk is None:
        S = st.x.shape[0]
        adopt = hi == S and all(g is not None and g.dtype == st.kv_acc and g.shape == st.kv_shape
                                for g in (g_k, g_v))
        if adopt:
            st.dk, st.dv, g_k, g_v = g_k, g_v, None, None
        else:
            st.dk = st._shared_empty(st.x, st.kv_shape, st.kv_acc).zero_()
            st.dv = st._shared_empty(st.x, st.kv_shape, st.kv_acc).zero_()
        st._mark_all_streams(st.dk, st.dv)
    if g_k is not None:
        st.dk[:hi].add_(g_k)
    if g_v is not None:
        st.dv[:hi].add_(g_v)
    io.put("grad_q", g_q)


@_backward("qkv_bwd")
def b_qkv(st: Step, io: OpIO) -> None:
    c = io.chunk
    lo, hi = st._rows(c)
    if c is not None or not st.plan.chunk_attention:
        dq = io.take("grad_q")
    else:  # a whole-sequence qkv after chunked attention: every chunk's dQ rows
        dq = _cat_rows(st, [io.take("grad_q", j) for j in range(st.plan.num_chunks)])
    (g_x,) = st._run_island_backward(("qkv", c), [dq, st.dk[lo:hi], st.dv[lo:hi]])
    if st.x_grad:
        st.input_grad.add(c, g_x)  # the norm1 path's part of dx


def _cat_rows(st: Step, parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    """One sequence-long gradient from every chunk's rows (a missing one is zero)."""
    like = next((g for g in parts if g is not None), None)
    if like is None:
        return None
    st._mark_used(*parts)
    rows = [b - a for a, b in map(st.plan.chunk_rows, range(st.plan.num_chunks))]
    return torch.cat([g if g is not None else like.new_zeros((n, *like.shape[1:])) for g, n in zip(parts, rows)])

