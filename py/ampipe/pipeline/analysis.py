"""The schedule analysis of a measured run: from a plan and its ops' measured times, the ideal
bound no schedule of this chunking beats (`ideal_bound_ms`), the schedule replayed with those
times and no executor overhead (`replay`, `simulate_ms`), and the emulated delays against the
measured comm ops (`emulated_delay_report`). The one owner of this analysis: `run_block` returns
it and `ampipe run`, the bench sweep and `python -m ampipe.bench.pipeline` report it (the
planner's own simulator, src/plan/simulate.ts, predicts; test/ts/plan/replay-agreement.test.ts
holds the two replays to the same makespans)."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

from .emulation import delay_report
from .plan import Plan, data_needs

__all__ = ["ideal_bound_ms", "replay", "simulate_ms", "emulated_delay_report"]


def _resource_bound(work: Sequence[tuple[float, float, float]]) -> float:
    """Least makespan of one sequential resource running ops given as (head, ms, tail):
    an op cannot start before `head` (the longest chain of data needs before it) nor end
    later than `tail` before the pass does. For every pair of thresholds (h, q), the ops with
    head >= h and tail >= q run one after another, after h, and the last of them is followed
    by at least q: makespan >= h + sum(ms) + q. The largest such figure is a lower bound for
    any schedule (it is the fill + busy time + drain of the resource)."""
    best = 0.0
    heads = sorted({h for h, _, _ in work})
    tails = sorted({q for _, _, q in work})
    for h in heads:
        for q in tails:
            busy = sum(ms for hh, ms, qq in work if hh >= h and qq >= q)
            if busy > 0:
                best = max(best, h + busy + q)
    return best


def ideal_bound_ms(plan: Plan, times: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The ideal bound of a pipelined step from per-op times (`{"forward": {id: ms}, ...}`).

    Per pass, the largest of: the longest chain of data dependencies (`plan.data_needs`), and
    for each resource — the compute ops (one compute stream's worth of work) and the
    communication ops — its fill + total busy time + drain, where fill and drain are the
    data-dependency chains before and after its ops that no schedule of this chunking avoids
    (`_resource_bound`; e.g. the first dispatch waits for the front of a chunk, the last
    unpermute for the last combine). Every schedule of these ops with these times on one
    compute and one communication resource takes at least this long. The step's bound is
    the sum of the two passes' bounds.
    """
    out: dict[str, float] = {}
    for name, ops in (("forward", plan.forward), ("backward", plan.backward)):
        t = times.get(name, {})
        needs = data_needs(plan, forward=name == "forward")
        ms = {op.id: t.get(op.id, 0.0) for op in ops}
        head: dict[str, float] = {}
        for op in ops:  # list order is a topological order (deps point to earlier ops)
            head[op.id] = max((head[d] + ms[d] for d in needs[op.id]), default=0.0)
        tail = {op.id: 0.0 for op in ops}
        for op in reversed(ops):
            for d in needs[op.id]:
                tail[d] = max(tail[d], ms[op.id] + tail[op.id])
        path_ms = max((head[i] + ms[i] + tail[i] for i in ms), default=0.0)
        compute = [(head[op.id], ms[op.id], tail[op.id]) for op in ops if not op.is_comm]
        comm = [(head[op.id], ms[op.id], tail[op.id]) for op in ops if op.is_comm]
        out[f"{name}_compute_ms"] = sum(w for _, w, _ in compute)
        out[f"{name}_comm_ms"] = sum(w for _, w, _ in comm)
        out[f"{name}_critical_path_ms"] = path_ms
        out[f"{name}_compute_bound_ms"] = _resource_bound(compute)
        out[f"{name}_comm_bound_ms"] = _resource_bound(comm)
        out[f"{name}_bound_ms"] = max(path_ms, out[f"{name}_compute_bound_ms"],
                                      out[f"{name}_comm_bound_ms"])
    out["bound_ms"] = out["forward_bound_ms"] + out["backward_bound_ms"]
    return out


def replay(plan: Plan, times: Mapping[str, Mapping[str, float]], *,
           per_stream: bool = False) -> dict[str, dict[str, tuple[float, float]]]:
    """The schedule this plan would run if every op took its measured time and the executor
    added nothing: per pass, each op's ``(start_ms, end_ms)``, ops starting when their deps,
    their stream and their resource are free. CPU (`per_stream=False`): one resource per stream
    kind (the calling thread runs every compute op, one thread every comm op); CUDA: one per
    stream. `ampipe run` draws its measured trace from it (the one replay of a measured run)."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    kind = {s.name: s.kind for s in plan.streams}
    for name, ops in (("forward", plan.forward), ("backward", plan.backward)):
        t = times.get(name, {})
        free: dict[str, float] = {}
        last: dict[str, float] = {}
        span: dict[str, tuple[float, float]] = {}
        for op in ops:
            res = op.stream if per_stream else kind[op.stream]
            start = max([free.get(res, 0.0), last.get(op.stream, 0.0), *(span[d][1] for d in op.deps)])
            span[op.id] = (start, start + t.get(op.id, 0.0))
            free[res] = last[op.stream] = span[op.id][1]
        out[name] = span
    return out


def simulate_ms(plan: Plan, times: Mapping[str, Mapping[str, float]], *,
                per_stream: bool = False) -> dict[str, float]:
    """The step time of the `replay`: per pass and in total. Comparing it with the measured
    time separates the executor's overhead from the schedule's stalls."""
    spans = replay(plan, times, per_stream=per_stream)
    out = {f"{name}_ms": max((end for _, end in spans[name].values()), default=0.0)
           for name in ("forward", "backward")}
    out["total_ms"] = out["forward_ms"] + out["backward_ms"]
    return out


def emulated_delay_report(plan: Plan, op_times: Mapping[str, Mapping[str, float]],
                          delays: Sequence[Mapping[str, Mapping[str, float]]]
                          ) -> dict[str, dict[str, float]]:
    """Per comm kind (`dispatch`, `combine`, `*_bwd`): measured op time vs the delay the
    emulation modelled for it (`delay_report`), from median per-op times and the blocks'
    `last_delays_ms` of each sample (medians per op)."""
    modelled: dict[str, list[float]] = {}
    for sample in delays:
        for per_op in sample.values():
            for k, v in per_op.items():
                modelled.setdefault(k, []).append(v)
    med = {k: statistics.median(v) for k, v in modelled.items()}
    measured = {k: v for name in ("forward", "backward") for k, v in op_times.get(name, {}).items()}
    return delay_report((*plan.forward, *plan.backward), measured, med)
