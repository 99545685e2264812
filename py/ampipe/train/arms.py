"""Training steps of several blocks ("arms") on one throwaway trainer, for timing and profiles.

`ampipe train` with `pipeline.degree: auto` times the baseline block and the planner's best
candidate plans in real training steps on the run's own model, data and ranks before training
(`time_arms`), as Tutel's adaptive pipelining degree does; `ampipe train --profile` traces a
few steps of the baseline and the chosen block (`ampipe.train.profile`). Both switch one
trainer's MoE layers between blocks in place (`Trainer.set_block`), so no second model is
built, and the trainer is discarded afterwards: the run itself starts from its own
initialisation (or checkpoint), untouched by these steps.

Arms run in ABBA order over rounds (round r runs the arms in list order when r is even,
reversed when odd), so a drift of the machine's speed hits every arm alike; the first
`warmup` rounds are not kept. Every rank runs the same arms in the same order (each step's
collectives must match), so every rank calls with the same arguments.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .. import spans

__all__ = ["abba_order", "time_arms"]


def abba_order(names: Sequence[str], rounds: int) -> list[tuple[int, str]]:
    """(round, arm) in ABBA order: forward on even rounds, reversed on odd ones."""
    out = []
    for r in range(rounds):
        for name in (names if r % 2 == 0 else list(reversed(names))):
            out.append((r, name))
    return out


def _test_step_ms() -> dict[str, float]:
    """``AMPIPE_TEST_STEP_MS="baseline=100,grouped=70"``: a test hook that reports these step times
    for the arms whose names start with each key (the steps still run), so the tests of the
    decision's plumbing do not depend on a machine's timing. Never set outside tests."""
    spec = os.environ.get("AMPIPE_TEST_STEP_MS")
    if not spec:
        return {}
    return {k.strip(): float(v) for k, v in (item.split("=", 1) for item in spec.split(",") if item.strip())}


def time_arms(trainer: Any, arms: Mapping[str, Any], *, steps: int, warmup: int = 1,
              should_stop: Callable[[], bool] | None = None,
              on_step: Callable[[str, int, float], None] | None = None) -> dict[str, list[float]]:
    """Step times (ms) of each arm (`name -> plan or None` for the baseline) over `steps`
    measured rounds after `warmup` rounds, in ABBA order. Leaves the trainer on the last arm."""
    names = list(arms)
    times: dict[str, list[float]] = {n: [] for n in names}
    fake = _test_step_ms()
    for r, name in abba_order(names, warmup + steps):
        if should_stop is not None and should_stop():
            break
        trainer.set_block(arms[name])
        rec, t0 = spans.active(), spans.now_ns()
        m = trainer.train_step()
        if rec is not None:  # what `ampipe.train.profile.arm_summaries` groups the step's spans by
            rec.add(f"arm {name}", "arm", t0, spans.now_ns(), arm=name, round=r, measured=r >= warmup)
        if r >= warmup:
            ms = next((v for k, v in fake.items() if name.startswith(k)), m.step_ms)
            times[name].append(ms)
        if on_step is not None:
            on_step(name, r, m.step_ms)
    return times
