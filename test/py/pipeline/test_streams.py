"""The stream executor's machinery on toy ops: ordering, overlap, modelled time, failures, delays."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from ampipe.pipeline.emulation import DelayInjector, EmulatedComm
from ampipe.pipeline.plan import PlanOp, StreamSpec
from ampipe.pipeline.streams import CommWork, OpFailed, StreamExecutor

STREAMS = (StreamSpec("compute", "compute"), StreamSpec("comm", "comm"))


def _chain(n: int) -> list[PlanOp]:
    """compute a_i -> comm c_i -> compute b_i, for i < n, interleaved in list order."""
    ops = []
    for i in range(n):
        ops.append(PlanOp(f"a{i}", "route", i, "compute", ()))
        ops.append(PlanOp(f"c{i}", "dispatch", i, "comm", (f"a{i}",)))
    for i in range(n):
        ops.append(PlanOp(f"b{i}", "experts", i, "compute", (f"c{i}",)))
    return ops


class _Work:
    """A stand-in for a collective in flight: done `seconds` after it starts (another thread)."""

    def __init__(self, seconds: float, log: dict[str, float], name: str) -> None:
        self._done = threading.Event()
        self._timer = threading.Timer(seconds, lambda: (log.__setitem__(name, time.perf_counter()), self._done.set()))
        self._timer.start()

    def wait(self) -> None:
        assert self._done.wait(10)


def test_comm_overlaps_compute_on_one_thread_and_deps_hold():
    ops = _chain(4)
    ex = StreamExecutor(STREAMS, "cpu")
    log: dict[str, tuple[str, float, float]] = {}
    done_at: dict[str, float] = {}
    threads_before = set(threading.enumerate())

    def run(op: PlanOp):
        s = time.perf_counter()
        if op.stream == "comm":
            work = _Work(0.02, done_at, op.id)

            def finish() -> None:
                log[op.id] = (threading.current_thread().name, s, time.perf_counter())
            return CommWork(work, 0.0, finish)
        time.sleep(0.004)
        log[op.id] = (threading.current_thread().name, s, time.perf_counter())
        return None

    times = ex.run(ops, run, "forward", needs={op.id: list(op.deps) for op in ops})
    # every op's remainder runs on the caller's thread, after what it reads
    assert {name for name, _, _ in log.values()} == {threading.current_thread().name}
    for op in ops:
        for d in op.deps:
            assert log[d][2] <= log[op.id][1] or op.stream == "comm", (d, op.id)
    for i in range(4):  # b_i ran after its collective was done
        assert done_at[f"c{i}"] <= log[f"b{i}"][1]
    # a1 ran while c0 was in flight: overlap without a thread of the executor's own
    assert log["a1"][1] < done_at["c0"]
    assert set(times.op_times_ms) == {op.id for op in ops}
    time.sleep(0.05)  # the stand-in works' timers end
    assert set(threading.enumerate()) <= threads_before


def test_a_comm_stream_is_modelled_in_time():
    # Two comm ops issued back to back, 30 ms of modelled delay each: the stream serialises
    # them, so the second is done no sooner than 60 ms after the first was issued.
    ops = [PlanOp("a", "route", 0, "compute", ()), PlanOp("c0", "dispatch", 0, "comm", ("a",)),
           PlanOp("c1", "dispatch", 1, "comm", ("a",)), PlanOp("b", "experts", 1, "compute", ("c1",))]
    ex = StreamExecutor(STREAMS, "cpu")
    seen: dict[str, float] = {}

    def run(op: PlanOp):
        seen[op.id] = time.perf_counter()
        if op.stream == "comm":
            return CommWork(None, 0.03, lambda: seen.__setitem__(op.id + ".done", time.perf_counter()))
        return None

    times = ex.run(ops, run, "forward", needs={"a": [], "c0": ["a"], "c1": ["a"], "b": ["c1"]})
    assert seen["c0.done"] <= seen["c1.done"]  # a stream's ops finish in order
    assert seen["b"] - seen["c0"] >= 0.06
    recs = {t.id: t for t in times.records()}
    assert recs["c1"].start_ms >= recs["c0"].start_ms + recs["c0"].ms - 1e-6  # one after the other
    assert recs["c0"].ms >= 30 - 1e-6 and recs["c1"].ms >= 30 - 1e-6  # the modelled delay, at least


@pytest.mark.parametrize("bad", ["c1", "a2", "c2.finish"])
def test_failing_op_is_named_and_dependents_do_not_run(bad):
    ops = _chain(4)
    ex = StreamExecutor(STREAMS, "cpu")
    ran: list[str] = []

    def run(op: PlanOp):
        if op.id == bad:
            raise ValueError("boom")
        if op.stream == "comm":
            def finish() -> None:
                if op.id + ".finish" == bad:
                    raise ValueError("boom in the remainder")
                ran.append(op.id)
            return CommWork(None, 0.0, finish)
        ran.append(op.id)
        return None

    with pytest.raises(OpFailed, match=f"forward op '{bad.split('.')[0]}'") as info:
        ex.run(ops, run, "forward", needs={op.id: list(op.deps) for op in ops})
    assert info.value.op.id == bad.split(".")[0]
    assert isinstance(info.value.__cause__, ValueError)
    failed = bad.split(".")[0]
    assert not any(op.id in ran and failed in op.deps for op in ops)


def test_a_compute_kind_that_starts_a_communication_is_refused_naming_the_op():
    ops = [PlanOp("a", "route", 0, "compute", ()), PlanOp("b", "experts", 0, "compute", ("a",))]
    ex = StreamExecutor(STREAMS, "cpu")
    with pytest.raises(OpFailed, match=r"forward op 'b' \(experts.*compute stream \(op_kinds.json\)"):
        ex.run(ops, lambda op: CommWork(None, 0.0, lambda: None) if op.id == "b" else None, "forward",
               needs={"a": [], "b": ["a"]})


def test_emulated_delay_model_and_cpu_sleep():
    m = EmulatedComm(latency_us=100, bandwidth_gbps=1.0, world_size=4)
    assert m.wire_bytes(4000) == 3000
    assert m.delay_s(4_000_000) == pytest.approx(100e-6 + 3e6 / 1e9)
    inj = DelayInjector(m, torch.device("cpu"))
    s = time.perf_counter()
    inj(4_000_000)
    assert time.perf_counter() - s >= m.delay_s(4_000_000)
    assert "emulated" in m.label
    with pytest.raises(ValueError, match="bandwidth_gbps"):
        EmulatedComm(bandwidth_gbps=0)
    assert EmulatedComm.from_dict({"latency_us": 5, "bandwidth_gbps": 2, "world_size": 2}).world_size == 2


def test_pass_nested_in_an_op_runs_to_the_end():
    # A compute op that runs a pass on the same executor (what an activation-checkpoint
    # recompute inside backward does) runs it to its end, comm ops included.
    ex = StreamExecutor(STREAMS, "cpu")
    ran: list[str] = []

    def inner(op: PlanOp):
        ran.append("inner." + op.id)
        return CommWork(None, 0.001, lambda: ran.append("inner." + op.id + ".done")) if op.stream == "comm" else None

    def outer(op: PlanOp):
        ran.append(op.id)
        if op.id == "a1":
            ex.run(_chain(2), inner, "forward")
        return CommWork(None, 0.001, lambda: None) if op.stream == "comm" else None

    ex.run(_chain(2), outer, "backward")
    assert {f"inner.{op.id}" for op in _chain(2)} | {"inner.c0.done", "inner.c1.done"} <= set(ran)
    # the nested pass finished before the outer one went on
    assert ran.index("inner.c1.done") < ran.index("c1")


def test_passes_from_two_threads_on_one_executor_both_progress():
    # Two threads (stand-ins for two ranks) each run a pass on one executor; their comm ops
    # finish only when both have started theirs (an all-to-all). Neither may wait behind the other.
    ex = StreamExecutor(STREAMS, "cpu")
    barrier = threading.Barrier(2, timeout=20)
    results: dict[int, str] = {}

    class Meet:
        def __init__(self) -> None:
            self.t = threading.Thread(target=barrier.wait, daemon=True)
            self.t.start()

        def wait(self) -> None:
            self.t.join(20)
            assert not self.t.is_alive()

    def run_op(op: PlanOp):
        return CommWork(Meet(), 0.0, lambda: None) if op.stream == "comm" else None

    def rank(r: int) -> None:
        try:
            ex.run(_chain(1), run_op, "forward")
            results[r] = "ok"
        except Exception as e:  # noqa: BLE001 - reported below
            results[r] = f"{type(e).__name__}: {e}"

    threads = [threading.Thread(target=rank, args=(r,), daemon=True) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == {0: "ok", 1: "ok"}


@pytest.mark.parametrize("enabled", [True, False])
def test_comm_remainders_run_in_the_callers_grad_mode_and_autocast(enabled):
    ops = _chain(2)
    ex = StreamExecutor(STREAMS, "cpu")
    seen: dict[str, tuple[bool, bool, torch.dtype]] = {}

    def note(name: str) -> None:
        a = torch.ones(2, 2)
        seen[name] = (torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"), (a @ a).dtype)

    def run(op: PlanOp):
        note(op.id)
        return CommWork(None, 0.0, lambda: note(op.id + ".done")) if op.stream == "comm" else None

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
        ex.run(ops, run, "forward")
    want = (False, enabled, torch.bfloat16 if enabled else torch.float32)
    assert len(seen) == len(ops) + 2 and all(v == want for v in seen.values()), seen


class _FutureWork:
    """A finished collective that counts the completion callbacks asked of it."""

    def __init__(self) -> None:
        self.callbacks = 0
        work = self

        class _Future:
            def add_done_callback(self, fn) -> None:
                work.callbacks += 1
                fn(self)

        self._future = _Future()

    def get_future(self):
        return self._future

    def wait(self) -> None:
        pass


def test_completion_callback_only_with_a_delay_to_model_or_a_profile_recording():
    """The callback (on gloo's thread, under the GIL) is asked for only where its time is used."""
    from ampipe import spans

    plain, delayed, traced = _FutureWork(), _FutureWork(), _FutureWork()
    finished = []
    for work, delay in ((plain, 0.0), (delayed, 1e-4)):
        w = CommWork(work, delay, lambda: finished.append(1))
        w.complete()
    with spans.recording():
        CommWork(traced, 0.0, lambda: finished.append(1)).complete()
    assert (plain.callbacks, delayed.callbacks, traced.callbacks) == (0, 1, 1)
    assert finished == [1, 1, 1]  # each op's remainder ran once either way
