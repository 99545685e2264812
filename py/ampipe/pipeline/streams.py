"""Running one pass of a plan's ops over its logical streams.

CUDA: one `torch.cuda.Stream` per logical stream, an event per op for cross-stream deps,
no host synchronisation: the host only enqueues. The caller's current stream is joined at
entry (every plan stream waits on it) and at exit (it waits on every plan stream).
Communication streams are created with high priority, so their small kernels (reorders,
the emulated delay) are not queued behind large compute grids. `shared_executor` hands
every block of one device and one stream spec the same executor, so a model's layers use
the same CUDA streams (not one pool stream per layer and logical stream).

CPU: one thread, the caller's, walks the op list in order. A communication op *starts* its
collective as an asynchronous work (gloo runs it on its own threads) and returns a
`CommWork`; the executor finishes it (waits for the collective, then runs the op's local
remainder, e.g. the reorder after a dispatch) only when a later op reads its result (the
plan's data needs, `plan.data_needs`), or at the end of the pass. So collectives of several
chunks are in flight at once while compute goes on, no thread hands work to another (no
GIL traffic, no wake-ups: an earlier version ran comm ops on a communication thread, and on
two cores shared by two ranks its hand-offs and time slices cost more than they hid), and
every rank issues its collectives in the same order (the list's). A comm stream is modelled
in time: its ops occupy it one after another, op k from ``start_k = max(issued_k,
end_{k-1})`` to ``end_k = max(start_k, collective done) + delay_k``, where ``delay_k`` is an
emulated interconnect's modelled delay (`ampipe.pipeline.emulation`; 0 without one): the
thread that needs a result sleeps until ``end_k``, leaving the core to others. If an op
raises, the pass stops there and the error surfaces as `OpFailed` naming the op.
"""


from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils.checkpoint

from .. import spans
from .plan import PlanOp, StreamSpec

# Exceptions that are control flow, not failures: they leave a pass unwrapped. Non-reentrant
# activation checkpointing stops a recompute early by raising this from a saved-tensor hook
# (inside an island) and catches it around the recomputed forward.
_PASS_THROUGH: tuple[type[BaseException], ...] = tuple(
    t for t in (getattr(torch.utils.checkpoint, "_StopRecomputationError", None),) if t is not None)


class OpFailed(RuntimeError):
    """An op raised while a plan pass was running; `op` names it, `__cause__` is the error."""

    def __init__(self, op: PlanOp, pass_name: str, error: BaseException) -> None:
        chunk = "whole sequence" if op.chunk is None else f"chunk {op.chunk}"
        super().__init__(f"{pass_name} op '{op.id}' ({op.kind}, {chunk}, stream '{op.stream}') "
                         f"failed: {type(error).__name__}: {error}")
        self.op = op
        self.pass_name = pass_name


def _run_op(op: PlanOp, run_op: Callable[[PlanOp], Any], pass_name: str) -> Any:
    """run_op(op), its failure raised as `OpFailed` naming the op (control flow passes)."""
    try:
        return run_op(op)
    except _PASS_THROUGH:
        raise
    except Exception as e:
        raise OpFailed(op, pass_name, e) from e


class CommWork:
    """A communication op that started and finishes later: what a comm op's `run_op` returns.

    `work`: the collective in flight (`torch.distributed.Work`, or None when nothing travels);
    `delay_s`: the emulated interconnect's modelled delay of this op (0 without emulation; on
    CUDA the block spins the comm stream instead); `finish()`: the op's local remainder, run
    once the collective's result is there (it sees the received rows, e.g. the dispatch's
    reorder). The executor calls `complete` (see the module docstring for the timing)."""

    __slots__ = ("work", "delay_s", "finish", "op", "pass_name", "issued", "prev", "start", "end", "_done_at")

    def __init__(self, work: Any, delay_s: float, finish: Callable[[], None]) -> None:
        self.work = work
        self.delay_s = delay_s
        self.finish = finish
        self.op: PlanOp | None = None
        self.pass_name = ""
        self.issued = 0.0
        self.prev: CommWork | None = None  # the op before it on its stream, until that completes
        self.start = 0.0
        self.end: float | None = None
        self._done_at: list[float] = []
        if work is not None and (delay_s > 0 or spans.active() is not None) and hasattr(work, "get_future"):
            # When the collective finished (a callback on the backend's thread), not when we asked:
            # the emulated delay starts there, and the trace shows it. Only then: the callback
            # takes the GIL on gloo's thread, which delays the collective's completion while this
            # thread runs Python (a 256x128 all-to-all between two ranks on two cores: median
            # wait after 2.3 ms of compute 0.17 ms without it, 0.37 ms with it). Without a delay,
            # the time the wait returned serves (`complete`).
            work.get_future().add_done_callback(lambda _f: self._done_at.append(time.perf_counter()))

    @property
    def done_at(self) -> float | None:
        """When the collective finished (perf_counter seconds), if the backend said."""
        return self._done_at[0] if self._done_at else None

    def complete(self, on_wait: Callable[["CommWork", float], None] | None = None,
                 on_finish: Callable[["CommWork", float], None] | None = None) -> None:
        """Wait for the collective and the modelled time (this op's stream predecessors
        first), then run `finish`. `on_wait(self, since)` is told when the caller blocked,
        `on_finish(self, since)` when the remainder ran."""
        if self.end is not None:
            return
        if self.prev is not None:
            self.prev.complete(on_wait, on_finish)
            self.start = max(self.issued, self.prev.end)
            self.prev = None
        t0 = time.perf_counter()
        try:
            if self.work is not None:
                self.work.wait()
            done = self._done_at[0] if self._done_at else time.perf_counter()
            end = max(self.start, done if self.work is not None else self.start) + self.delay_s
            _sleep_until(end)
            if on_wait is not None and time.perf_counter() - t0 > 1e-6:
                on_wait(self, t0)
            self.end = end
            t1 = time.perf_counter()
            self.finish()
            if on_finish is not None:
                on_finish(self, t1)
        except _PASS_THROUGH:
            raise
        except Exception as e:  # the collective or the op's remainder: name this op
            if self.op is None or isinstance(e, OpFailed):
                raise
            raise OpFailed(self.op, self.pass_name, e) from e


def _sleep_until(t: float) -> None:
    """Sleep until perf_counter() reaches `t` (time.sleep overshoots by ~50-100 us on Linux:
    sleep most of it, then yield-wait)."""
    left = t - time.perf_counter()
    if left <= 0:
        return
    if left > 2e-4:
        time.sleep(left - 1.5e-4)
    while time.perf_counter() < t:
        time.sleep(0)


@dataclass(frozen=True)
class OpTime:
    id: str
    kind: str
    chunk: int | None
    stream: str
    start_ms: float  # from the start of the pass
    ms: float


class OpTimes:
    """Per-op times of one pass. On CUDA the events are read lazily (the first access
    synchronises on them, after the step, never inside the block)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._cpu: list[OpTime] = []
        self._cuda: list[tuple[PlanOp, torch.cuda.Event, torch.cuda.Event]] = []
        self._cuda_origin: torch.cuda.Event | None = None
        self._resolved: list[OpTime] | None = None

    def records(self) -> list[OpTime]:
        if self._resolved is None:
            if self._cuda:
                origin = self._cuda_origin
                self._cuda[-1][2].synchronize()
                out = []
                for op, s, e in self._cuda:
                    e.synchronize()
                    out.append(OpTime(op.id, op.kind, op.chunk, op.stream,
                                      origin.elapsed_time(s), s.elapsed_time(e)))
                self._resolved = out
            else:
                self._resolved = sorted(self._cpu, key=lambda t: t.start_ms)
        return self._resolved

    @property
    def op_times_ms(self) -> dict[str, float]:
        return {t.id: t.ms for t in self.records()}

    @property
    def makespan_ms(self) -> float:
        recs = self.records()
        return max((t.start_ms + t.ms for t in recs), default=0.0)


def stream_priority(kind: str) -> int:
    """CUDA stream priority of a logical stream kind (lower is higher priority)."""
    return -1 if kind == "comm" else 0


class StreamExecutor:
    """Runs a list of plan ops over logical streams on one device (see module docstring).

    `run_op(op)` runs one op; a comm op may return a `CommWork` (its collective started,
    its remainder to run when the result is needed)."""

    def __init__(self, streams: Sequence[StreamSpec], device: torch.device | str,
                 record_times: bool = True) -> None:
        self.device = torch.device(device)
        self.streams = {s.name: s for s in streams}
        self.record_times = record_times
        self._cuda_streams: dict[str, torch.cuda.Stream] = {}
        if self.device.type == "cuda":
            for s in streams:
                self._cuda_streams[s.name] = torch.cuda.Stream(
                    device=self.device, priority=stream_priority(s.kind))
        self._local = threading.local()
        # The caller's stream while a CUDA pass runs: shared buffers are allocated from its
        # pool, whose queue every plan stream has already waited on (the entry event).
        self.caller_stream: torch.cuda.Stream | None = None

    # The stream the op being run is on (the block uses it for record_stream).
    @property
    def current_stream_name(self) -> str | None:
        return getattr(self._local, "stream", None)

    def cuda_stream(self, name: str) -> torch.cuda.Stream:
        return self._cuda_streams[name]

    @property
    def defers_comm(self) -> bool:
        """Whether comm ops run asynchronously, finished when needed (CPU); on CUDA the host
        only enqueues, so a comm op's work is finished, i.e. enqueued, right away."""
        return self.device.type != "cuda"

    def run(self, ops: Sequence[PlanOp], run_op: Callable[[PlanOp], Any], pass_name: str, *,
            needs: Mapping[str, Sequence[str]] | None = None) -> OpTimes:
        """Run `ops`. `needs`: op id -> the ids of the ops whose results it reads (CPU:
        those comm ops are finished before it runs; default: its deps)."""
        if self.device.type == "cuda":
            return self._run_cuda(ops, run_op, pass_name)
        return self._run_cpu(ops, run_op, pass_name, needs)

    @contextmanager
    def _on_stream(self, name: str) -> Iterator[None]:
        prev = getattr(self._local, "stream", None)
        self._local.stream = name
        try:
            yield
        finally:
            self._local.stream = prev

    # -- CUDA -----------------------------------------------------------------------------

    def _run_cuda(self, ops: Sequence[PlanOp], run_op: Callable[[PlanOp], None],
                  pass_name: str) -> OpTimes:
        times = OpTimes(self.device)
        caller = torch.cuda.current_stream(self.device)
        outer_caller, self.caller_stream = self.caller_stream, caller
        used = list(dict.fromkeys(op.stream for op in ops))
        entry = torch.cuda.Event(enable_timing=self.record_times)
        entry.record(caller)
        times._cuda_origin = entry
        for name in used:
            self._cuda_streams[name].wait_event(entry)
        done: dict[str, tuple[str, torch.cuda.Event]] = {}
        rec = spans.active()
        try:
            for op in ops:
                stream = self._cuda_streams[op.stream]
                for d in op.deps:
                    d_stream, ev = done[d]
                    if d_stream != op.stream:
                        stream.wait_event(ev)
                with torch.cuda.stream(stream), self._on_stream(op.stream):
                    start = None
                    if self.record_times:
                        start = torch.cuda.Event(enable_timing=True)
                        start.record(stream)
                    s0 = spans.now_ns() if rec is not None else 0
                    work = _run_op(op, run_op, pass_name)
                    if work is not None:  # enqueued already: its remainder goes on the same stream
                        work.finish()
                    if rec is not None:  # the host's enqueue time (kernels: torch.profiler's CUDA events)
                        rec.add(op.id, "op", s0, spans.now_ns(), kind=op.kind, chunk=op.chunk, stream=op.stream,
                                enqueue=True, **{"pass": pass_name})
                    end = torch.cuda.Event(enable_timing=self.record_times)
                    end.record(stream)
                done[op.id] = (op.stream, end)
                if start is not None:
                    times._cuda.append((op, start, end))
        finally:
            # Even on failure the caller's stream must not run ahead of enqueued work.
            for name in used:
                caller.wait_stream(self._cuda_streams[name])
            self.caller_stream = outer_caller
        return times

    # -- CPU ------------------------------------------------------------------------------

    def _run_cpu(self, ops: Sequence[PlanOp], run_op: Callable[[PlanOp], Any], pass_name: str,
                 needs: Mapping[str, Sequence[str]] | None) -> OpTimes:
        times = OpTimes(self.device)
        record = self.record_times
        rec = spans.active()
        local = self._local
        prev_stream = getattr(local, "stream", None)
        clock = time.perf_counter
        t0 = clock()
        in_flight: dict[str, CommWork] = {}
        last_on: dict[str, CommWork] = {}  # the latest comm op per stream (its successor's `prev`)
        waited: list[tuple[str, str, float, float]] = []  # (awaited op, by op, from, to)

        def on_wait(w: CommWork, since: float) -> None:
            waited.append((w.op.id, w.op.kind, since, clock()))

        def on_finish(w: CommWork, since: float) -> None:  # a comm op's local remainder, on this thread
            if rec is not None:
                rec.add(f"finish {w.op.id}", "issue", int(since * 1e9), int(clock() * 1e9), kind=w.op.kind,
                        chunk=w.op.chunk, **{"pass": pass_name})

        def finish(op_id: str) -> None:
            w = in_flight.pop(op_id, None)
            if w is None:
                return
            w.complete(on_wait, on_finish)
            if record:
                times._cpu.append(OpTime(w.op.id, w.op.kind, w.op.chunk, w.op.stream,
                                         (w.start - t0) * 1e3, (w.end - w.start) * 1e3))
            if rec is not None:
                rec.add(w.op.id, "op", int(w.start * 1e9), int(w.end * 1e9), kind=w.op.kind, chunk=w.op.chunk,
                        stream=w.op.stream, virtual=True, tid=_virtual_tid(w.op.stream),
                        thread_name=f"{w.op.stream} stream (modelled)", **{"pass": pass_name})
                if w.delay_s:  # the modelled delay: the end of the op's time on its stream
                    rec.add("emulated delay", "delay", int((w.end - w.delay_s) * 1e9), int(w.end * 1e9),
                            modelled_ms=w.delay_s * 1e3, op=w.op.id, tid=_virtual_tid(w.op.stream),
                            thread_name=f"{w.op.stream} stream (modelled)")
                if w.work is not None:  # the collective itself, from its start to its end (the backend's threads)
                    done = w.done_at if w.done_at is not None else w.end
                    rec.add(f"{w.op.kind} (in flight)", "comm", int(w.issued * 1e9), int(done * 1e9), op=w.op.id,
                            kind=w.op.kind, tid=_virtual_tid("collectives"), thread_name="collectives in flight")

        try:
            for op in ops:
                for d in (needs[op.id] if needs is not None else op.deps):
                    if d in in_flight:
                        before = len(waited)
                        finish(d)
                        if rec is not None:
                            for on, kind, a, b in waited[before:]:
                                rec.add(f"wait {on}", "wait", int(a * 1e9), int(b * 1e9), on=on, on_kind=kind,
                                        op=op.id, **{"pass": pass_name})
                start = clock()
                local.stream = op.stream
                work = _run_op(op, run_op, pass_name)
                end = clock()
                if work is not None and not op.is_comm:  # the op table says which kinds communicate
                    raise OpFailed(op, pass_name, TypeError(
                        f"kind {op.kind!r} runs on a compute stream (op_kinds.json) but its op started a communication"))
                if work is not None:
                    work.op, work.pass_name, work.issued = op, pass_name, end
                    work.start = end
                    work.prev = last_on.get(op.stream)
                    last_on[op.stream] = work
                    in_flight[op.id] = work
                    if rec is not None:
                        rec.add(f"start {op.id}", "issue", int(start * 1e9), int(end * 1e9), kind=op.kind,
                                chunk=op.chunk, **{"pass": pass_name})
                    continue
                if rec is not None:
                    rec.add(op.id, "op", int(start * 1e9), int(end * 1e9), kind=op.kind, chunk=op.chunk,
                            stream=op.stream, **{"pass": pass_name})
                if record:
                    times._cpu.append(OpTime(op.id, op.kind, op.chunk, op.stream,
                                             (start - t0) * 1e3, (end - start) * 1e3))
            for op_id in list(in_flight):  # what no later op read: the end of the pass needs it
                before = len(waited)
                finish(op_id)
                if rec is not None:
                    for on, kind, a, b in waited[before:]:
                        rec.add(f"wait {on}", "wait", int(a * 1e9), int(b * 1e9), on=on, on_kind=kind,
                                op="(end of pass)", **{"pass": pass_name})
        finally:
            local.stream = prev_stream
        return times


def _virtual_tid(stream: str) -> int:
    """A trace track id for a modelled stream (not an OS thread)."""
    return 1_000_000_000 + sum(map(ord, stream))


_SHARED: dict[tuple[torch.device, tuple[StreamSpec, ...], bool], StreamExecutor] = {}


def shared_executor(streams: Sequence[StreamSpec], device: torch.device | str,
                    record_times: bool = True) -> StreamExecutor:
    """The executor for one device and one stream spec, created once per process and shared
    by every block using it (the blocks of a model run one after another, never nested)."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    key = (dev, tuple(streams), record_times)
    ex = _SHARED.get(key)
    if ex is None:
        ex = _SHARED[key] = StreamExecutor(streams, dev, record_times)
    return ex
