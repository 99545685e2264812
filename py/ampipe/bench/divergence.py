"""How fast two training runs drift apart from a rounding-sized difference: the pipelined block
against the baseline, next to the baseline against itself with every initial weight nudged by a
relative 1e-7 (a control: what the training dynamics alone make of fp32 rounding).

    python -m ampipe.bench.divergence runs/compare/seed-1234 --steps 80

Reads ``baseline/config.json`` and ``pipelined/plan.json`` of a comparison's seed directory and
trains three models on one process (expert-parallel size 1, real communication only, the ranks
become gradient accumulation): baseline, pipelined, perturbed baseline, on the same data, one step
each in turn. Prints |Δloss| of each pair every few steps. The block's equivalence makes the first
pair differ by rounding only; if the control diverges as fast, the divergence is the dynamics', not
the block's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ampipe.bench.divergence", description=__doc__.split("\n\n")[0])
    ap.add_argument("seed_dir", type=Path, help="a seed directory of ampipe compare (baseline/, pipelined/)")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--every", type=int, default=8, help="print every N steps (default 8)")
    ap.add_argument("--nudge", type=float, default=1e-7, help="relative size of the control's weight nudge")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    from ..parallel.groups import ParallelGroups
    from ..train.worker_commands import build_trainer

    cfg = json.loads((a.seed_dir / "baseline" / "config.json").read_text())
    plan = json.loads((a.seed_dir / "pipelined" / "plan.json").read_text())
    cfg["parallelism"] = {**cfg["parallelism"], "world_size": 1, "expert_model_parallel_size": 1}
    plan["dims"]["expert_model_parallel_size"] = 1
    cfg["pipeline"] = {**cfg["pipeline"], "emulated_comm": None}
    cfg["train"] = {**cfg["train"], "steps": max(cfg["train"]["steps"], a.steps),
                    "eval_interval": 10**9, "checkpoint_interval": 10**9}
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        runs = {name: build_trainer(cfg, p, str(Path(tmp) / name), groups=ParallelGroups.single(), device="cpu",
                                    say=lambda s: None, tensorboard=False)
                for name, p in (("baseline", None), ("pipelined", plan), ("control", None))}
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            for p in runs["control"].model.parameters():
                p.mul_(1 + a.nudge * torch.randn(p.shape, generator=g))
        for t in runs.values():
            t.begin(resume=False)
        rows = []
        print(f"|Δloss| per step; control = the baseline with every initial weight scaled by 1 + {a.nudge:g}·N(0,1)")
        for step in range(1, a.steps + 1):
            loss = {name: t.advance().loss for name, t in runs.items()}
            row = {"step": step, "pipelined_vs_baseline": abs(loss["pipelined"] - loss["baseline"]),
                   "control_vs_baseline": abs(loss["control"] - loss["baseline"])}
            rows.append(row)
            if step % a.every == 1 or step == a.steps:
                print(f"  step {step:4d}  pipelined vs baseline {row['pipelined_vs_baseline']:.1e}   "
                      f"control vs baseline {row['control_vs_baseline']:.1e}", flush=True)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
