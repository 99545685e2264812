"""The ideal bound is a lower bound of every schedule and counts the fill and drain no
schedule avoids (benchmark definitions; no timing is measured here)."""

from __future__ import annotations

import random

import pytest

from ampipe.pipeline.analysis import ideal_bound_ms, simulate_ms
from ampipe.pipeline.plan import load_plan

from pipeline_helpers import PLAN_NAMES, PLANS


def _random_times(plan, seed: int) -> dict[str, dict[str, float]]:
    rng = random.Random(seed)
    return {name: {op.id: rng.uniform(0.1, 5.0) for op in ops}
            for name, ops in (("forward", plan.forward), ("backward", plan.backward))}


@pytest.mark.parametrize("name", PLAN_NAMES)
def test_bound_never_exceeds_the_plans_own_replay(name):
    plan = load_plan(PLANS / f"{name}.json")
    for seed in range(5):
        t = _random_times(plan, seed)
        b = ideal_bound_ms(plan, t)
        sim = simulate_ms(plan, t)
        for p in ("forward", "backward"):
            assert b[f"{p}_bound_ms"] <= sim[f"{p}_ms"] * (1 + 1e-9), (name, seed, p)
            assert b[f"{p}_bound_ms"] >= max(b[f"{p}_compute_ms"], b[f"{p}_comm_ms"],
                                             b[f"{p}_critical_path_ms"])


def test_bound_counts_the_fill_before_the_first_all_to_all():
    # P=2, communication-bound forward: the comm resource cannot start before chunk 0's
    # qkv/attn/proj/route (fill) and the last unpermute follows the last combine (drain).
    plan = load_plan(PLANS / "interleaved-p2.json")
    t = {"forward": {}, "backward": {op.id: 1.0 for op in plan.backward}}
    for op in plan.forward:
        t["forward"][op.id] = 0.0 if op.kind == "counts" else 10.0 if op.is_comm else 1.0
    b = ideal_bound_ms(plan, t)
    front = sum(1.0 for op in plan.forward if op.chunk == 0 and op.kind in ("qkv", "attn", "proj", "route"))
    assert b["forward_comm_ms"] == 40.0
    assert b["forward_comm_bound_ms"] == pytest.approx(front + 40.0 + 1.0)
    assert b["forward_bound_ms"] == pytest.approx(simulate_ms(plan, t)["forward_ms"])
