"""The stream executor's machinery on toy ops: ordering, overlap, failures, delays."""

from __future__ import annotations

import gc
import threading
import time

import pytest
import torch

from ampipe.pipeline.emulation import DelayInjector, EmulatedComm
from ampipe.pipeline.plan import PlanOp, StreamSpec
from ampipe.pipeline.streams import COMM_THREAD_NAME, OpFailed, StreamExecutor

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




def test_deps_and_stream_order_are_respected_and_comm_overlaps():
    ops = _chain(4)
    ex = StreamExecutor(STREAMS, "cpu")
    log: list[tuple[str, str, float, float]] = []
    lock = threading.Lock()

    def run(op: PlanOp) -> None:
        s = time.perf_counter()
        time.sleep(0.01 if op.stream == "comm" else 0.004)
        with lock:
            log.append((op.id, threading.current_thread().name, s, time.perf_counter()))

    times = ex.run(ops, run, "forward")
    by_id = {r[0]: r for r in log}
    for op in ops:
        for d in op.deps:
            assert by_id[d][3] <= by_id[op.id][2], (d, op.id)
        # comm on the communication thread, compute on the caller's
        assert (by_id[op.id][1] == COMM_THREAD_NAME) == (op.stream == "comm")
    # a1 must run while c0 is in flight: the comm thread really overlaps
    assert by_id["a1"][2] < by_id["c0"][3]
    assert set(times.op_times_ms) == {op.id for op in ops}
    # the executor keeps its communication thread, parked, for the next pass
    comm = ex.comm_thread
    assert comm is not None and comm.is_alive() and comm.name == COMM_THREAD_NAME
    ex.run(ops, run, "backward")
    assert ex.comm_thread is comm


@pytest.mark.parametrize("bad", ["c1", "a2"])
def test_failing_op_is_named_and_no_thread_is_left(bad):
    ops = _chain(4)
    ex = StreamExecutor(STREAMS, "cpu")
    ran: list[str] = []
    ex.run(ops, lambda op: None, "forward")  # starts the communication thread
    comm = ex.comm_thread
    assert comm is not None and comm.is_alive()

    def run(op: PlanOp) -> None:
        if op.id == bad:
            raise ValueError("boom")
        ran.append(op.id)

    with pytest.raises(OpFailed, match=f"forward op '{bad}'") as info:
        ex.run(ops, run, "forward")
    assert info.value.op.id == bad
    assert isinstance(info.value.__cause__, ValueError)
    assert not comm.is_alive() and ex.comm_thread is None  # stopped and joined
    # nothing that depends on the failed op ran
    assert not any(op.id in ran and bad in op.deps for op in ops)


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


def test_collected_executor_lets_its_comm_thread_go():
    ex = StreamExecutor(STREAMS, "cpu")
    ex.run(_chain(2), lambda op: None, "forward")
    comm = ex.comm_thread
    assert comm is not None and comm.is_alive()
    del ex
    gc.collect()
    comm.join(timeout=10)
    assert not comm.is_alive()


def test_pass_nested_in_an_op_gets_its_own_comm_thread():
    # A compute op that runs a pass on the same executor (what an activation-checkpoint
    # recompute inside backward does) must not queue behind the pass it is part of.
    ex = StreamExecutor(STREAMS, "cpu")
    ran: list[str] = []
    inner_comm: list[threading.Thread] = []
    outer_comm: list[threading.Thread] = []

    def inner(op: PlanOp) -> None:
        ran.append("inner." + op.id)
        if op.stream == "comm":
            inner_comm.append(threading.current_thread())

    def outer(op: PlanOp) -> None:
        ran.append(op.id)
        if op.stream == "comm":
            outer_comm.append(threading.current_thread())
        if op.id == "a1":
            ex.run(_chain(2), inner, "forward")

    done = threading.Event()
    runner = threading.Thread(target=lambda: (ex.run(_chain(2), outer, "backward"), done.set()),
                              daemon=True)
    runner.start()
    assert done.wait(30), "a nested pass deadlocked"
    assert {f"inner.{op.id}" for op in _chain(2)} <= set(ran)
    # the parked thread served the outer pass and is kept; the nested pass had its own,
    # stopped and joined when that pass ended
    (nested,) = set(inner_comm)
    assert nested.name == COMM_THREAD_NAME and nested is not outer_comm[0]
    assert not nested.is_alive() and ex.comm_thread is outer_comm[0]


def test_passes_from_two_threads_on_one_executor_both_progress():
    # Two threads (stand-ins for two ranks) each run a pass on one executor; their comm ops
    # meet at a barrier (an all-to-all). Neither may wait behind the other's pass.
    ex = StreamExecutor(STREAMS, "cpu")
    ex.run(_chain(1), lambda op: None, "warm-up")
    barrier = threading.Barrier(2, timeout=20)
    results: dict[int, str] = {}

    def run_op(op: PlanOp) -> None:
        if op.stream == "comm":
            barrier.wait()

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
def test_comm_thread_runs_in_the_callers_grad_mode_and_autocast(enabled):
    ops = _chain(2)
    ex = StreamExecutor(STREAMS, "cpu")
    seen: dict[str, tuple[bool, bool, torch.dtype]] = {}

    def run(op: PlanOp) -> None:
        a = torch.ones(2, 2)
        seen[op.id] = (torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"), (a @ a).dtype)

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
        ex.run(ops, run, "forward")
    want = (False, enabled, torch.bfloat16 if enabled else torch.float32)
    assert all(seen[op.id] == want for op in ops), seen
    # and the parked thread keeps none of it for the next pass
    ex.run(ops, run, "forward")
    assert all(seen[op.id] == (True, False, torch.float32) for op in ops), seen
