"""Running one pass of a plan's ops over its logical streams.

CUDA: one `torch.cuda.Stream` per logical stream, an event per op for cross-stream deps,
no host synchronisation: the host only enqueues. The caller's current stream is joined at
entry (every plan stream waits on it) and at exit (it waits on every plan stream).
Communication streams are created with high priority, so their small kernels (reorders,
the emulated delay) are not queued behind large compute grids. `shared_executor` hands
every block of one device and one stream spec the same executor, so a model's layers use
the same CUDA streams (not one pool stream per layer and logical stream).

CPU: compute ops run on the calling thread, communication ops on one communication thread,
each in plan-list order, waiting on `threading.Event`s for their deps. One thread serves all
comm streams so that collectives are issued in the same order on every rank (several
threads on one process group could interleave them differently per rank). Because deps
always point to earlier ops of the list and both threads walk the list in order, the
schedule cannot deadlock. The communication thread is the executor's, like a CUDA stream:
started at its first pass and parked between passes (starting a thread per pass cost about
0.3 ms before the first op could run, twice a step). A pass that finds it busy (a pass
nested in an op of another, as an activation-checkpoint recompute does; a pass from a second
thread) gets a thread of its own for that pass. If an op raises, the other thread stops at
its next op, the pass waits for it, the communication thread is stopped and joined (no
thread outlives a failed pass; the next pass starts a new one), and the error surfaces as
`OpFailed` naming the op. When the interpreter begins to exit, every communication thread
finishes its pass and stays parked: a thread still running while Python finalizes can abort
the process (see `_quiesce_comm_threads_at_exit`).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import queue
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.utils.checkpoint

from .plan import PlanOp, StreamSpec

COMM_THREAD_NAME = "ampipe-comm"

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


def _run_op(op: PlanOp, run_op: Callable[[PlanOp], None], pass_name: str) -> None:
    """run_op(op), its failure raised as `OpFailed` naming the op (control flow passes)."""
    try:
        run_op(op)
    except _PASS_THROUGH:
        raise
    except Exception as e:
        raise OpFailed(op, pass_name, e) from e


class _Aborted(Exception):
    """Another thread failed; this one stops without running more ops."""


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


class _CommWorker:
    """An executor's communication thread: runs one pass's comm ops at a time, parked on a
    queue between passes. A daemon, so an idle one never holds up interpreter exit; see
    `_quiesce_comm_threads_at_exit` for how it meets an exiting interpreter."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.busy = False  # a pass holds it (set under the executor's lock)
        self.idle = threading.Event()  # no job queued or running
        self.idle.set()
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._jobs: queue.SimpleQueue[tuple[Callable[[], None], threading.Event] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._main, name=COMM_THREAD_NAME, daemon=True)
        self.thread.start()
        _LIVE_WORKERS.add(self)

    def _main(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            job, done = item
            del item
            try:
                job()  # never raises: the pass's walk() records every failure
            finally:
                # Drop the pass before saying it is done: the caller then frees the pass's
                # tensors and graphs itself, and this thread holds none of its torch state.
                del job
                with self._pending_lock:
                    self._pending -= 1
                    if not self._pending:
                        self.idle.set()
                done.set()

    @property
    def usable(self) -> bool:
        return self.pid == os.getpid() and self.thread.is_alive()  # a fork has no such thread

    def submit(self, job: Callable[[], None], done: threading.Event) -> None:
        """Runs `job` on the thread; `done` is set once the thread has let go of it."""
        with self._pending_lock:
            self._pending += 1
            self.idle.clear()
        self._jobs.put((job, done))

    def retire(self) -> None:
        """Let the thread end after the job it is running (if any); not once the interpreter
        is exiting (a thread ending then can abort the process: see below)."""
        if not _EXITING:
            self._jobs.put(None)

    def stop(self) -> None:
        self.retire()
        self.thread.join()


# Every communication thread of this process (a thread keeps its worker alive while it runs).
_LIVE_WORKERS: "weakref.WeakSet[_CommWorker]" = weakref.WeakSet()
_EXITING = False
# How long an exiting interpreter waits for a communication thread to finish its pass.
EXIT_WAIT_S = 5.0


def _quiesce_comm_threads_at_exit() -> None:
    """Before the interpreter finalizes: let every communication thread finish its pass and
    park, and from then on never wake it.

    A daemon thread that runs while Python finalizes is stopped where it stands the moment it
    next takes the GIL, and where that is inside C++ (returning from a torch call, which
    releases the GIL; or the C++ thread-local destructors of a thread that is ending, which
    need it) the process aborts: "terminate called without an active exception", SIGABRT.
    That is how a rank once died at exit under load: the executors' finalizers retired their
    parked threads at exit, and a thread's own ending raced the interpreter's. A thread parked
    on its queue waits in plain C and is simply gone when the process exits. This runs from
    `threading`'s exit hooks, before finalization, while every thread can still finish its op.
    A pass that does not finish in EXIT_WAIT_S (a collective waiting for a peer that is gone)
    would abort the process later, so the process leaves now, without Python's clean-up."""
    global _EXITING
    workers = [w for w in list(_LIVE_WORKERS) if w.usable]
    deadline = time.monotonic() + EXIT_WAIT_S
    stuck = [w for w in workers if not w.idle.wait(max(0.0, deadline - time.monotonic()))]
    _EXITING = True
    if stuck:
        print(f"ampipe: a communication thread was still inside an op {EXIT_WAIT_S:g} s after the program "
              "ended (a collective waiting for a peer that is gone?); exiting without Python's clean-up "
              "(exit 1), which would abort the process", file=sys.stderr)
        for f in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                f.flush()
        os._exit(1)


# threading's exit hooks run before the interpreter finalizes (atexit hooks run later, too late
# for a thread inside torch); `_register_atexit` is what concurrent.futures uses for its workers.
getattr(threading, "_register_atexit", atexit.register)(_quiesce_comm_threads_at_exit)


AutocastState = tuple[tuple[str, bool, torch.dtype], ...]


def autocast_state() -> AutocastState:
    """The calling thread's autocast settings, per device type (CPU and CUDA)."""
    kinds = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    return tuple((k, torch.is_autocast_enabled(k), torch.get_autocast_dtype(k)) for k in kinds)


@contextmanager
def enter_autocast(state: AutocastState) -> Iterator[None]:
    """Enter `state` (from `autocast_state`) on this thread; disabled device types stay off."""
    with contextlib.ExitStack() as stack:
        for kind, enabled, dtype in state:
            if enabled:
                stack.enter_context(torch.autocast(device_type=kind, dtype=dtype))
        yield


def is_total_order(ops: Sequence[PlanOp]) -> bool:
    """Whether every op happens-after every earlier op (deps and stream order): then no two
    ops could ever run at the same time, and a second thread would only add hand-offs."""
    index = {op.id: i for i, op in enumerate(ops)}
    last: dict[str, int] = {}
    hb: list[int] = []
    for i, op in enumerate(ops):
        mask = 0
        preds = [index[d] for d in op.deps if d in index]
        if op.stream in last:
            preds.append(last[op.stream])
        for p in preds:
            mask |= hb[p] | (1 << p)
        if mask != (1 << i) - 1:
            return False
        hb.append(mask)
        last[op.stream] = i
    return True


def stream_priority(kind: str) -> int:
    """CUDA stream priority of a logical stream kind (lower is higher priority)."""
    return -1 if kind == "comm" else 0


class StreamExecutor:
    """Runs a list of plan ops over logical streams on one device (see module docstring)."""

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
        self._worker: _CommWorker | None = None
        self._worker_lock = threading.Lock()
        self._worker_finalizer: weakref.finalize | None = None
        # The caller's stream while a CUDA pass runs: shared buffers are allocated from its
        # pool, whose queue every plan stream has already waited on (the entry event).
        self.caller_stream: torch.cuda.Stream | None = None

    # The stream the op being run is on (the block uses it for record_stream).
    @property
    def current_stream_name(self) -> str | None:
        return getattr(self._local, "stream", None)

    def cuda_stream(self, name: str) -> torch.cuda.Stream:
        return self._cuda_streams[name]

    def run(self, ops: Sequence[PlanOp], run_op: Callable[[PlanOp], None],
            pass_name: str, *, inline: bool = False) -> OpTimes:
        """Run `ops`; on CPU, `inline=True` runs comm ops on the calling thread too (for
        passes where nothing could overlap, or comm ops that move nothing)."""
        if self.device.type == "cuda":
            return self._run_cuda(ops, run_op, pass_name)
        return self._run_cpu(ops, run_op, pass_name, inline or is_total_order(ops))

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
                    _run_op(op, run_op, pass_name)
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

    def _run_cpu(self, ops: Sequence[PlanOp], run_op: Callable[[PlanOp], None],
                 pass_name: str, inline: bool) -> OpTimes:
        times = OpTimes(self.device)
        if inline:
            return self._run_inline(ops, run_op, pass_name, times)
        comm_ops = [op for op in ops if self.streams[op.stream].kind == "comm"]
        compute_ops = [op for op in ops if self.streams[op.stream].kind != "comm"]
        done = {op.id: threading.Event() for op in ops}
        abort = threading.Event()
        failures: list[BaseException] = []
        lock = threading.Lock()
        t0 = time.perf_counter()
        record = self.record_times
        local = self._local

        def fail(err: BaseException) -> None:
            with lock:
                failures.append(err)
            abort.set()
            for ev in done.values():  # wake every waiter; they see `abort`
                ev.set()

        def execute(op: PlanOp) -> None:
            for d in op.deps:
                done[d].wait()
            if abort.is_set():
                raise _Aborted
            start = time.perf_counter()
            prev = getattr(local, "stream", None)
            local.stream = op.stream
            try:
                _run_op(op, run_op, pass_name)
            finally:
                local.stream = prev
            if record:
                end = time.perf_counter()
                times._cpu.append(OpTime(op.id, op.kind, op.chunk, op.stream,
                                         (start - t0) * 1e3, (end - start) * 1e3))
            done[op.id].set()

        def walk(op_list: Sequence[PlanOp]) -> None:
            try:
                for op in op_list:
                    execute(op)
            except _Aborted:
                pass
            except BaseException as e:  # noqa: BLE001 - re-raised on the calling thread
                fail(e)

        worker, kept, finished = None, False, threading.Event()
        if comm_ops:
            # Grad mode and autocast are thread-local: the comm thread runs its ops in the
            # caller's (an all-to-all under bf16 autocast must see bf16 autocast too).
            grad_enabled = torch.is_grad_enabled()
            autocast = autocast_state()

            def comm_pass() -> None:
                with torch.set_grad_enabled(grad_enabled), enter_autocast(autocast):
                    walk(comm_ops)

            worker, kept = self._take_comm_worker()
            worker.submit(comm_pass, finished)
        try:
            walk(compute_ops)
        finally:
            if worker is not None:
                if failures:
                    abort.set()
                finished.wait()
        # (Interrupted while waiting, the worker stays busy: later passes take another.)
        if worker is not None:
            if failures or not kept:
                self._drop_comm_worker(worker)  # nothing outlives a failed pass
            else:
                worker.busy = False
        if failures:
            raise failures[0]
        return times

    @property
    def comm_thread(self) -> threading.Thread | None:
        """The communication thread (parked between passes), if one is running."""
        w = self._worker
        return w.thread if w is not None and w.usable else None

    def _take_comm_worker(self) -> tuple[_CommWorker, bool]:
        """A communication thread for one pass, and whether it is the executor's parked one.
        That one is busy during a pass nested in another pass's op (an activation-checkpoint
        recompute), a pass from a second thread, or after an interrupted pass: such a pass
        gets a thread of its own, stopped when it ends (queuing behind the busy one could
        wait forever on the very op that started it)."""
        with self._worker_lock:
            w = self._worker
            if w is None or not w.usable:
                if self._worker_finalizer is not None:
                    self._worker_finalizer.detach()
                w = self._worker = _CommWorker()
                # An executor that is garbage collected lets its thread go.
                self._worker_finalizer = weakref.finalize(self, w.retire)
            if not w.busy:
                w.busy = True
                return w, True
        own = _CommWorker()
        own.busy = True
        return own, False

    def _drop_comm_worker(self, worker: _CommWorker) -> None:
        """Stop and join `worker`; the next pass starts another."""
        with self._worker_lock:
            if self._worker is worker:
                self._worker = None
                if self._worker_finalizer is not None:
                    self._worker_finalizer.detach()
                    self._worker_finalizer = None
        if worker.usable:
            worker.stop()

    def _run_inline(self, ops: Sequence[PlanOp], run_op: Callable[[PlanOp], None],
                    pass_name: str, times: OpTimes) -> OpTimes:
        """Every op on the calling thread, in list order (which satisfies every dep: deps
        point to earlier ops), without events or hand-offs."""
        record = self.record_times
        local = self._local
        prev = getattr(local, "stream", None)
        clock = time.perf_counter
        t0 = clock()
        try:
            for op in ops:
                start = clock()
                local.stream = op.stream
                _run_op(op, run_op, pass_name)
                if record:
                    end = clock()
                    times._cpu.append(OpTime(op.id, op.kind, op.chunk, op.stream,
                                             (start - t0) * 1e3, (end - start) * 1e3))
        finally:
            local.stream = prev
        return times


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
