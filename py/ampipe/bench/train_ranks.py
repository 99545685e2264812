"""Whole training steps, baseline block vs pipelined block, side by side on the run's own ranks.

    python -m ampipe.bench.train_ranks runs/train                  # config.json, plan.json of `ampipe train`
    python -m ampipe.bench.train_ranks runs/train --no-emulation --steps 40

As `ampipe.bench.train_one_process`, but on the config's ranks: ``parallelism.world_size``
processes spawned here (gloo on loopback, NCCL on CUDA), expert parallelism as configured, so every
step has the real all-to-all between ranks. Both arms are built on every rank from the same seed
and alternate in ABBA order; a round's time is its slowest rank's (the ranks wait for each other).
No span is recorded: this is what a training step itself costs (a profile's spans ask each
collective for a completion callback, which costs time, docs/pipeline.md). ``--no-emulation`` drops
the config's emulated interconnect: real communication only, the case where pipelining has nothing
to hide beyond the real exchange and what it costs shows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..process_exit import exit_rank
from .block import _free_port, _init_rank
from .train_one_process import abba_steps, add_arguments, report, side_by_side


def _rank(rank: int, world: int, port: int, config: dict[str, Any], plan: dict[str, Any],
          steps: int, warmup: int, threads: int, queue) -> None:  # noqa: ANN001
    import torch.distributed as dist

    from ..parallel.groups import init_parallel_groups
    from ..runtime import keep_freed_memory
    from ..train.worker_commands import build_trainer

    keep_freed_memory()  # as a rank of `ampipe train` does
    device = _init_rank(rank, world, port, config["parallelism"].get("device", "cpu"), threads)
    try:
        groups = init_parallel_groups(int(config["parallelism"]["expert_model_parallel_size"]))
        with tempfile.TemporaryDirectory() as tmp:
            arms = {name: build_trainer(config, p, str(Path(tmp) / name), groups=groups, device=device,
                                        say=lambda s: None, tensorboard=False)
                    for name, p in (("baseline", None), ("pipelined", plan))}
            ms = abba_steps(lambda name: arms[name].train_step().step_ms, steps, warmup)
        slowest = {}
        for name, xs in ms.items():  # per round, the slowest rank's step
            t = torch.tensor(xs, dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            slowest[name] = t.tolist()
        if rank == 0:
            queue.put(slowest)  # a SimpleQueue: written before put returns
    finally:
        dist.destroy_process_group()
    exit_rank(0)  # see ampipe.process_exit


def run(run_dir: Path, steps: int, warmup: int, threads: int | None, emulation: bool) -> dict[str, Any]:
    import torch.multiprocessing as mp

    from ..pipeline.emulation import EmulatedComm

    config = json.loads((run_dir / "config.json").read_text())
    plan_path = run_dir / "plan.json"
    if not plan_path.is_file():
        raise SystemExit(f"{plan_path}: missing (the run trained the baseline block; train the pipelined one first)")
    plan = json.loads(plan_path.read_text())
    world = int(config["parallelism"]["world_size"])
    if not emulation:
        config["pipeline"] = {**config["pipeline"], "emulated_comm": None}
    config["train"] = {**config["train"], "steps": max(config["train"]["steps"], warmup + steps + 1),
                       "checkpoint_interval": 10**9, "eval_interval": 10**9}
    threads = threads or max(1, (os.cpu_count() or 1) // world)
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(_rank, args=(world, _free_port(), config, plan, steps, warmup, threads, queue), nprocs=world, join=True)
    ms = queue.get()
    emu = config["pipeline"].get("emulated_comm")
    return {"interconnect": f"{EmulatedComm.from_dict(emu).label} -- EMULATED" if emu else
            "real communication only", "run_dir": str(run_dir), "ranks": world,
            "expert_model_parallel_size": config["parallelism"]["expert_model_parallel_size"],
            "steps": steps, "warmup": warmup, "threads_per_rank": threads,
            "plan": {"variant": plan["variant"], "boundaries": plan["boundaries"]}, **side_by_side(ms, (
                config["train"]["global_batch_size"] * config["model"]["seq_length"]))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ampipe.bench.train_ranks", description=__doc__.split("\n\n")[0])
    add_arguments(ap, "torch intra-op threads per rank (default: cores / ranks)")
    ap.add_argument("--no-emulation", dest="emulation", action="store_false",
                    help="drop the config's emulated interconnect (real communication only)")
    a = ap.parse_args(argv)
    if a.steps < 1 or a.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    r = run(a.run_dir, a.steps, a.warmup, a.threads, a.emulation)
    report(r, f"{r['ranks']} ranks (expert-parallel size {r['expert_model_parallel_size']}), "
              f"{r['threads_per_rank']} thread(s) each; {r['interconnect']}; a round's time is its slowest rank's", a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
