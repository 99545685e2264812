"""Whole training steps, baseline block vs pipelined block, side by side on one run config.

    python -m ampipe.bench.train_one_process runs/train               # the run directory of `ampipe train`
    python -m ampipe.bench.train_one_process runs/train --steps 30 --json bench.json

Reads the run directory's resolved ``config.json`` and ``plan.json`` and builds two trainers of
the same model from the same seed: one with baseline MoE layers, one with every MoE layer an
`AMPipeBlock` running the plan. Both train on the same data; their steps alternate in ABBA order
(baseline, pipelined, pipelined, baseline, ...) so the machine's drift hits both alike. A step
is everything `ampipe train` does in one: forward and backward of every micro-batch, gradient
sync, clipping, the AdamW update.

It runs in ONE process (expert-parallel size 1; the config's ranks become gradient
accumulation, same global batch): the all-to-all is the config's emulated interconnect
(``pipeline.emulated_comm``, required), so every figure is labelled EMULATED. Printed: median
tokens/s of each arm with quartiles, and the speed-up as the median of per-repetition ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..parallel.groups import ParallelGroups
from .timing import quantile


def _one_process(config: dict[str, Any]) -> dict[str, Any]:
    cfg = json.loads(json.dumps(config))
    cfg["parallelism"] = {**cfg.get("parallelism", {}), "world_size": 1, "expert_model_parallel_size": 1}
    return cfg


def run(run_dir: Path, steps: int, warmup: int, threads: int | None) -> dict[str, Any]:
    from ..pipeline.emulation import EmulatedComm
    from ..train.worker_commands import build_trainer

    config = json.loads((run_dir / "config.json").read_text())
    plan_path = run_dir / "plan.json"
    if not plan_path.is_file():
        raise SystemExit(f"{plan_path}: missing (the run trained the baseline block; train the pipelined one first)")
    emu = (config.get("pipeline") or {}).get("emulated_comm")
    if not emu:
        raise SystemExit(f"{run_dir}/config.json: pipeline.emulated_comm is null; one process has no all-to-all "
                         "to overlap, so this benchmark needs the emulated interconnect")
    if threads:
        torch.set_num_threads(threads)
    plan = json.loads(plan_path.read_text())
    plan["dims"]["expert_model_parallel_size"] = 1  # the same block on one process
    cfg = _one_process(config)
    cfg["train"] = {**cfg["train"], "steps": max(cfg["train"]["steps"], warmup + steps + 1),
                    "checkpoint_interval": 10**9, "eval_interval": 10**9}
    with tempfile.TemporaryDirectory() as tmp:
        arms = {name: build_trainer(cfg, p, str(Path(tmp) / name), groups=ParallelGroups.single(), device="cpu",
                                    say=lambda s: None, tensorboard=False)
                for name, p in (("baseline", None), ("pipelined", plan))}
        ms = abba_steps(lambda name: arms[name].train_step().step_ms, steps, warmup)
    tokens = cfg["train"]["global_batch_size"] * cfg["model"]["seq_length"]
    return {"emulated": EmulatedComm.from_dict(emu).label, "run_dir": str(run_dir), "steps": steps, "warmup": warmup,
            "plan": {"variant": plan["variant"], "boundaries": plan["boundaries"]}, "threads": torch.get_num_threads(),
            **side_by_side(ms, tokens)}


def abba_steps(step_ms, steps: int, warmup: int) -> dict[str, list[float]]:
    """`step_ms(arm)` for the baseline and the pipelined arm in ABBA order (baseline, pipelined,
    pipelined, baseline, ...), `warmup` rounds first: the measured ms per arm."""
    ms: dict[str, list[float]] = {"baseline": [], "pipelined": []}
    order = ["baseline", "pipelined"]
    for i in range(warmup + steps):
        for name in (order if i % 2 == 0 else order[::-1]):
            t = step_ms(name)
            if i >= warmup:
                ms[name].append(t)
    return ms


def side_by_side(ms: dict[str, list[float]], tokens: int) -> dict[str, Any]:
    """Per arm the median step and tokens/s with quartiles; the speed-up as the median of the
    per-round ratios baseline / pipelined, with quartiles."""
    ratios = [b / p for b, p in zip(ms["baseline"], ms["pipelined"])]
    out: dict[str, Any] = {"tokens_per_step": tokens, "speedup": statistics.median(ratios),
                           "speedup_quartiles": [quantile(ratios, 0.25), quantile(ratios, 0.75)]}
    for name, xs in ms.items():
        tps = [tokens / (x / 1e3) for x in xs]
        out[name] = {"median_step_ms": statistics.median(xs), "median_tokens_per_s": statistics.median(tps),
                     "tokens_per_s_quartiles": [quantile(tps, 0.25), quantile(tps, 0.75)]}
    return out


def report(r: dict[str, Any], where: str, json_path: Path | None) -> None:
    """Prints the side-by-side figures of `r` (`side_by_side`) under a line naming the plan and
    `where` it ran; writes `r` to `json_path` when given."""
    print(f"whole training step, baseline vs pipelined ({r['plan']['variant']}, boundaries {r['plan']['boundaries']}); "
          f"{where}")
    print(f"{r['tokens_per_step']} tokens per step; {r['steps']} measured steps per arm in ABBA order after {r['warmup']} warm-up")
    for name in ("baseline", "pipelined"):
        x = r[name]
        q1, q3 = x["tokens_per_s_quartiles"]
        print(f"  {name:<10} {x['median_tokens_per_s']:9.0f} tokens/s (quartiles {q1:.0f} .. {q3:.0f}), "
              f"median step {x['median_step_ms']:.1f} ms")
    q1, q3 = r["speedup_quartiles"]
    print(f"  speed-up   {r['speedup']:.3f}x (median of per-step ratios; quartiles {q1:.3f} .. {q3:.3f})")
    if json_path:
        json_path.write_text(json.dumps(r, indent=2) + "\n")


def add_arguments(ap: argparse.ArgumentParser, threads_help: str) -> None:
    """The arguments both side-by-side benchmarks take."""
    ap.add_argument("run_dir", type=Path, help="a run directory of ampipe train (config.json, plan.json)")
    ap.add_argument("--steps", type=int, default=20, help="measured steps per arm (default 20)")
    ap.add_argument("--warmup", type=int, default=2, help="steps per arm before measuring (default 2)")
    ap.add_argument("--threads", type=int, default=None, help=threads_help)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ampipe.bench.train_one_process", description=__doc__.split("\n\n")[0])
    add_arguments(ap, "torch intra-op threads (default: torch's)")
    a = ap.parse_args(argv)
    from ..runtime import keep_freed_memory

    keep_freed_memory()  # as a rank does (docs/pipeline.md); AMPIPE_MALLOC=default to compare
    if a.steps < 1 or a.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    r = run(a.run_dir, a.steps, a.warmup, a.threads)
    report(r, f"one process, {r['threads']} threads, comm {r['emulated']} -- EMULATED", a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
