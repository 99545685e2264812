"""The pipelined block's autograd Function and the engine that runs it for one layer.

One `torch.autograd.Function` covers the whole block: (x, *params) -> (y, aux, z). Its
forward walks the plan's forward op list, its backward the backward op list, with the same
stream discipline (`streams.py`), each op run by `ops.py` on the step's state (`step.py`).
Parameter gradients and the aux/z-loss gradients are explicit: the Function returns the
parameters' summed gradients, and the losses are outputs whose gradients enter its backward
(`aux_loss_bwd`) like any other output gradient.

`BlockEngine` is a pipelined layer's state: its adapter, plan, emulation, the op flows of the
plan (`dataflow.py`), the parameters each op kind differentiates, and the latest step's times.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .. import spans
from ..model.adapter import LayerAdapter, NotSwappable
from ..model.block_pieces import MoELosses
from ..model.config import check_capacity_scope
from .dataflow import pass_flows
from .dims import block_dims
from .emulation import DelayInjector, EmulatedComm
from .plan import PARAM_KINDS, Plan, PlanError, check_cuda_streams, check_dims, compute_stream_count
from .step import Step
from .streams import OpTimes, StreamExecutor, shared_executor

__all__ = ["BlockEngine", "PipelinedBlockFn", "hand_to_caller"]


def hand_to_caller(tensors: Iterable[torch.Tensor | None]) -> None:
    """Results made on plan streams and returned to the caller: on CUDA, record_stream for
    the caller's current stream, so their memory is not reused while it still reads them."""
    for t in tensors:
        if t is not None and t.device.type == "cuda":
            t.record_stream(torch.cuda.current_stream(t.device))


class PipelinedBlockFn(torch.autograd.Function):
    """The whole pipelined block as one autograd node: (x, *params) -> (y, aux, z)."""

    @staticmethod
    def forward(ctx, step: Step, x: torch.Tensor, *params: torch.Tensor):
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
        hand_to_caller((y, aux, z))  # made on plan streams, used by the caller's
        return y, aux, z

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, grad_aux, grad_z):
        step: Step | None = ctx.step
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
        hand_to_caller((step.dx, *step.param_grads))  # made on plan streams
        dx, param_grads = step.end_backward()
        return (None, dx, *param_grads)


class BlockEngine:
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
        # What each op reads and writes (op_kinds.json); the CPU executor finishes the comm
        # ops an op needs before running it.
        self._flows = {"forward": pass_flows(plan, True), "backward": pass_flows(plan, False)}
        self._needs = {p: {i: f.needs for i, f in flows.items()} for p, flows in self._flows.items()}
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
            self._kind_params = {k: [p for m in mods.get(k, ()) for p in m.parameters()] for k in PARAM_KINDS}
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
        step = Step(self, x.detach(), params, track, rope)
        if track:
            step.x_grad = x.requires_grad
            y, aux, z = PipelinedBlockFn.apply(step, x, *params)
        else:
            self.last_times = {"forward": step.executor.run(
                self.plan.forward, step.forward_op, "forward", needs=self._needs["forward"])}
            self.last_delays_ms = step.delays_ms
            step.values.clear()
            y, aux, z = step.y, step.losses.aux_loss, step.losses.z_loss
            hand_to_caller((y, aux, z))  # as the grad path does
        return y, MoELosses(aux_loss=aux, z_loss=z)
