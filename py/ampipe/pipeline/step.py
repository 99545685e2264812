"""The state of one forward+backward of a pipelined block, and its gradient accumulation.

A `Step` is made per call of the block and freed by its backward. It holds what the ops of
`ops.py` share: the values they hand each other (`dataflow.Values`, by the op-kind table), the
autograd islands they keep for backward, the sequence-long K/V buffers (and in backward one
dK/dV buffer each, which chunks add into in place on prefixes), and the gradients:

- parameter gradients are explicit: each island's `autograd.grad` returns them, and they are
  summed per parameter (in place, in plan order; in fp32 for bf16/fp16 parameters, as
  Megatron sums into an fp32 ``main_grad``) and returned by the block's autograd Function
  (`function.py`), so autograd accumulates them into ``.grad`` like any other op's (hooks, DDP
  buckets, gradient accumulation), or they are added into a Megatron-style ``main_grad``;
- the input gradient dx has two parts per chunk, the residual path's (``proj_bwd``) and the
  norm1 path's (``qkv_bwd``); `InputGrad` adds them once both are in, into one buffer.

On CUDA it also does the stream bookkeeping: `record_stream` for tensors used on a stream they
were not made on, and shared buffers allocated from the caller's stream's pool.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .. import spans
from ..model.block_pieces import MoELosses
from . import ops
from .dataflow import OpIO, Values
from .plan import PlanOp
from .streams import CommWork

if TYPE_CHECKING:
    from .function import BlockEngine

__all__ = ["Step", "InputGrad", "Island"]


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
    argument handling (the caller matched shapes and dtypes): that costs tens of µs a call
    (`python -m ampipe.bench.overhead` measures it), and a block makes about ten calls per
    chunk in each step."""
    if _ENGINE is None:
        return torch.autograd.grad(outputs, inputs, grads, allow_unused=True)
    return _ENGINE.run_backward(tensors=tuple(outputs), grad_tensors=tuple(grads),
                                keep_graph=False, create_graph=False, inputs=tuple(inputs),
                                allow_unreachable=True, accumulate_grad=False)


@dataclasses.dataclass
class Island:
    inputs: list[torch.Tensor | None]  # leaves whose grads the backward op routes on
    outputs: list[torch.Tensor]
    params: list[nn.Parameter]
    layout: Any = None  # a comm op's exchange layout, which its backward exchanges back

    @property
    def identity(self) -> bool:
        """The op returned its inputs unchanged (a comm op with one EP rank)."""
        return (not self.params and len(self.outputs) == len(self.inputs)
                and all(o is i for o, i in zip(self.outputs, self.inputs)))


class InputGrad:
    """dx of the block input: per chunk, the residual path's gradient and the norm1 path's,
    added once both have arrived (addition is commutative, so in either order), into one
    buffer; with one chunk spanning the sequence the sum itself is dx (no buffer)."""

    def __init__(self, step: "Step") -> None:
        self.step = step
        self.dx: torch.Tensor | None = None
        self._first: dict[int, torch.Tensor | None] = {}

    def add(self, c: int | None, g: torch.Tensor | None) -> None:
        """One part for the rows of chunk `c` (None: every chunk; `g` covers the whole sequence)."""
        st = self.step
        plan = st.plan
        lo = 0 if c is None else plan.chunk_rows(c)[0]
        for j in (range(plan.num_chunks) if c is None else (c,)):
            a, b = plan.chunk_rows(j)
            part = None if g is None else g[a - lo:b - lo]
            if j not in self._first:
                self._first[j] = part
                continue
            first = self._first.pop(j)
            st._mark_used(first)
            if plan.num_chunks == 1:
                self.dx = _add_grads(first, part, st.x)
                continue
            if self.dx is None:
                self.dx = st._shared_empty(st.x, st.x.shape)
            _add_grads(first, part, st.x[a:b], out=self.dx[a:b])


class Step:
    """State of one forward+backward of the block: activations kept by the islands, the
    values the ops hand each other, the K/V buffers, the gradients. Created per call; its
    backward frees it."""

    def __init__(self, block: "BlockEngine", x: torch.Tensor, params: Sequence[nn.Parameter],
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
        self.islands: dict[tuple[str, int | None], Island] = {}
        self.values = Values()  # what ops hand each other (by the op-kind table), per pass
        self.losses: MoELosses | None = None
        # backward state
        self.param_grads: list[torch.Tensor | None] = [None] * len(self.params)
        self.grad_acc_dtype = [torch.promote_types(p.dtype, torch.float32) for p in self.params]
        self._param_writer: dict[int, tuple[str, torch.cuda.Event]] = {}
        self.cuda = x.device.type == "cuda"
        self.executor = block._executor
        # capacity_scope sequence: per expert, the slots earlier chunks routed (each route op
        # hands the running count to the next chunk's; chunk 0 starts from zero).
        self.sequence_capacity = self.plan.capacity_scope == "sequence" and not cfg.dropless
        self.zero_counts = (torch.zeros(cfg.num_experts, dtype=torch.int64, device=x.device)
                            if self.sequence_capacity else None)
        # Parameter gradients need cross-stream ordering only with several compute streams.
        self.order_param_grads = self.cuda and block._compute_streams > 1
        # Expert bias: count the kept slots per expert (grad enabled at the call, as Megatron).
        self.count_routed = (cfg.moe_router_enable_expert_bias and torch.is_grad_enabled()
                             and self.layer.routed_counts is not None)
        # The delay the emulation put on each comm op, per pass (`AMPipeBlock.last_delays_ms`).
        self.delays_ms: dict[str, dict[str, float]] = {"forward": {}, "backward": {}}

    # -- running ops -----------------------------------------------------------------------

    def forward_op(self, op: PlanOp) -> CommWork | None:
        return self._op(ops.FORWARD, self.block._flows["forward"], op)

    def backward_op(self, op: PlanOp) -> CommWork | None:
        return self._op(ops.BACKWARD, self.block._flows["backward"], op)

    def _op(self, table: dict, flows: dict, op: PlanOp) -> CommWork | None:
        io = OpIO(flows[op.id], self.values.data)
        work = table[op.kind](self, io)
        io.release()
        return work

    @property
    def dx(self) -> torch.Tensor | None:
        return self.input_grad.dx

    # -- stream bookkeeping (CUDA) -----------------------------------------------------

    def _mark_used(self, *tensors: torch.Tensor | None) -> None:
        """record_stream: a tensor made on one stream, used by the current op's stream."""
        if not self.cuda:
            return
        stream = torch.cuda.current_stream(self.x.device)
        for t in tensors:
            if t is not None and t.device.type == "cuda":
                t.record_stream(stream)

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

    # -- islands -------------------------------------------------------------------------

    def _delay(self, pass_name: str, kind: str, c: int | None, nbytes: int, *, inject: bool) -> float:
        """The emulated delay of moving `nbytes` (seconds; 0 without emulation), recorded per
        op; `inject`: spin the current (CUDA comm) stream for it now."""
        seconds = self.block._delay(nbytes, self.x.device, inject=inject)
        if seconds:
            self.delays_ms[pass_name][self.block._op_ids[(kind, c)]] = seconds * 1e3
        return seconds

    def _run(self, inputs: list[torch.Tensor | None], fn):
        """Run an island's `fn(*inputs)`: under enable_grad when tracking (`_keep` records it).
        While a profile records, the call is an "island" span: the model's own work inside the
        op, apart from the op's bookkeeping around it."""
        self._mark_used(*inputs)
        rec = spans.active()
        t0 = spans.now_ns() if rec is not None else 0
        if torch.is_grad_enabled() == self.track:  # the pass set it already (the usual case)
            out = fn(*inputs)
        else:
            with torch.set_grad_enabled(self.track):
                out = fn(*inputs)
        if rec is not None:
            rec.add("island forward", "island", t0, spans.now_ns())
        return out

    def _keep(self, key: tuple[str, int | None], inputs: list[torch.Tensor | None],
              outputs: Iterable[torch.Tensor], params: list[nn.Parameter], layout: Any = None) -> None:
        if self.track:
            self.islands[key] = Island(inputs, [o for o in outputs], params, layout)

    def _rows(self, c: int | None) -> tuple[int, int]:
        return (0, self.x.shape[0]) if c is None else self.plan.chunk_rows(c)

    # -- backward ------------------------------------------------------------------------

    def begin_backward(self, grad_y: torch.Tensor | None, grad_aux: torch.Tensor | None,
                       grad_z: torch.Tensor | None) -> None:
        self.grad_y = grad_y
        self.grad_losses = (grad_aux, grad_z)
        self.input_grad = InputGrad(self)
        # One sequence-long dK/dV each; chunks add into prefixes of them in place, in fp32
        # at least (P chunks add up: bf16 accumulation would round P times). The first
        # attn_bwd, when it covers the whole sequence (the last chunk, which plans run first),
        # hands over its own gradient as the buffer; otherwise the buffer is zero-filled.
        self.kv_acc = torch.promote_types(self.kbuf.dtype, torch.float32)
        self.dk: torch.Tensor | None = None
        self.dv: torch.Tensor | None = None
        self._mark_all_streams(grad_y, grad_aux, grad_z)

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
        rec = spans.active()
        t0 = spans.now_ns() if rec is not None else 0
        got = _island_grad(outs, gouts, wrt_inputs + params)
        if rec is not None:  # the autograd engine's work on the island (see `_run`)
            rec.add("island backward", "island", t0, spans.now_ns())
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

    def end_backward(self) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
        """dx and the parameter gradients (`finish_param_grads`), handed over: the step keeps no
        reference to them or to its buffers. The engine's AccumulateGrad adopts a gradient
        nobody else holds as ``p.grad`` and copies one that is still referenced (a full copy of
        every parameter's gradient per call). Dropping `input_grad` also breaks the cycle
        between the step and its `InputGrad`, which kept the step (and what it held) alive
        until the garbage collector ran."""
        dx, self.input_grad = self.input_grad.dx, None
        grads = self.finish_param_grads()
        self.param_grads = []
        self.kbuf = self.vbuf = self.dk = self.dv = self.grad_y = None
        return dx, grads

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
