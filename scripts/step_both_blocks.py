"""Take one training step of a compare arm with the pipelined block and, from the same state,
with the baseline block: are the gradients the same at that point of the trajectory?

    .venv/bin/python scripts/step_both_blocks.py runs/compare-gpt2/seed-1235/pipelined --step 170
    .venv/bin/python scripts/step_both_blocks.py runs/compare-gpt2/seed-1235/baseline --step 170 \
        --plan runs/compare-gpt2/seed-1235/pipelined/plan.json

Resumes the arm (its config.json, plan.json, checkpoints/) from its newest checkpoint before
--step on the config's ranks (CPU, gloo, spawned here), trains to step - 1 with the arm's own
block, then takes step --step three times from that state: pipelined, baseline, pipelined again.
Prints each one's loss and gradient norm (before clipping) and the parameters whose gradient
norms differ most. Written for a divergence `ampipe compare` reported (docs/compare.md): a spike
that both blocks produce at the same weights belongs to the trajectory, not to the block.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank(rank: int, world: int, init: str, arm: Path, step: int, work: Path, plan_file: Path) -> None:
    import ampipe.train.loop as loop
    from ampipe.parallel import init_parallel_groups
    from ampipe.train.worker_commands import build_trainer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        groups = init_parallel_groups(world)
        cfg = json.loads((arm / "config.json").read_text())
        plan = json.loads(plan_file.read_text())
        own = plan if (arm / "plan.json").exists() else None  # the block the arm trained with
        t = build_trainer(cfg, own, str(work), groups=groups, device="cpu", tensorboard=False, say=lambda s: None)
        start = t.resume()
        norms: dict[str, float] = {}
        clip = loop.clip_gradients

        def recording_clip(model, norm, limit):  # the per-parameter norms before clipping
            norms.clear()
            norms.update({n: float(p.grad.norm()) for n, p in model.named_parameters() if p.grad is not None})
            return clip(model, norm, limit)

        loop.clip_gradients = recording_clip
        while t.step < step - 1:
            t.train_step()
        state = copy.deepcopy((t.model.state_dict(), t.optimizer.state_dict(), t._rng, t.step))
        out = {}
        for name, p in (("pipelined", plan), ("baseline", None), ("pipelined again", plan)):
            t.model.load_state_dict(state[0])
            t.optimizer.load_state_dict(state[1])
            t._rng, t.step = copy.deepcopy(state[2]), state[3]
            t.set_block(p)
            m = t.train_step()
            out[name] = (m.loss, m.grad_norm, dict(norms))
        if rank == 0:
            print(f"{arm}: resumed from step {start}, trained to {step - 1} with its own block; step {step}:")
            for name, (loss, g, _) in out.items():
                print(f"  {name:16s} loss {loss:.6f}  grad norm {g:.6g}")
            a, b = out["pipelined"][2], out["baseline"][2]
            worst = sorted(((abs(a[k] - b[k]), k) for k in a), reverse=True)[:5]
            print("  largest per-parameter grad-norm differences (pipelined vs baseline, this rank's shard):")
            for d, k in worst:
                print(f"    {k}: {a[k]:.6g} vs {b[k]:.6g} (|diff| {d:.3g})")
    finally:
        dist.destroy_process_group()
    from ampipe.process_exit import exit_rank

    exit_rank(0)  # a spawned rank: see ampipe.process_exit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("arm", type=Path, help="an arm's run directory (seed-S/<arm>/ of ampipe compare)")
    ap.add_argument("--step", type=int, required=True, help="the step to take with both blocks")
    ap.add_argument("--plan", type=Path, help="the pipelined block's plan (default: the arm's plan.json)")
    a = ap.parse_args()
    plan_file = a.plan or a.arm / "plan.json"
    if not plan_file.exists():
        raise SystemExit(f"{plan_file}: missing; a baseline arm needs --plan (e.g. the pipelined arm's plan.json)")
    cfg = json.loads((a.arm / "config.json").read_text())
    world = cfg["parallelism"]["world_size"]
    ckpts = sorted(p for p in (a.arm / "checkpoints").glob("step-*") if int(p.name[5:]) < a.step)
    if not ckpts:
        raise SystemExit(f"{a.arm}/checkpoints: no checkpoint before step {a.step}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "run"
        shutil.copytree(ckpts[-1], work / "checkpoints" / ckpts[-1].name)
        mp.spawn(_rank, args=(world, str(Path(tmp) / "init"), a.arm.resolve(), a.step, work, plan_file.resolve()), nprocs=world)


if __name__ == "__main__":
    main()
