"""The rank command of `ampipe compare`: ``compare`` (docs/compare.md).

For each seed, two trainers of the same model from the same initialisation and the same data
order live on every rank: the baseline arm (plain MoE layers) and the pipelined arm (every MoE
layer an `AMPipeBlock` running the plan). Their steps alternate in ABBA order (step i: baseline
first when i is even, pipelined first when odd), so the machine's drift hits both alike. Each arm
is a run directory of its own (``seed-S/baseline``, ``seed-S/pipelined``: checkpoints, TensorBoard
events), resumed as `ampipe train` resumes; events carry ``arm`` and ``seed``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ampipe.worker.background import run_beside_heartbeats
from ampipe.worker.commands import CommandContext, command

__all__ = ["compare", "parameter_distance", "ARMS"]

ARMS = ("baseline", "pipelined")
_ARG_FIELDS = {"config", "plan", "seeds", "run_dir", "timeout_s"}


def parameter_distance(a: nn.Module, b: nn.Module, ep_group: Any = None) -> dict[str, float]:
    """‖a − b‖₂ over the whole model, relative to ‖b‖₂, and max |a − b|.

    Dense parameters are the same on every rank (counted once); each expert-parallel rank holds
    other experts, whose sums are added over `ep_group`."""
    from ampipe.parallel.grad_sync import is_expert_parameter

    pb = dict(b.named_parameters())
    sums = torch.zeros(2, 2, dtype=torch.float64)  # [dense, expert] x [diff², ref²]
    worst = torch.zeros(2, dtype=torch.float64)
    for name, p in a.named_parameters():
        q = pb[name]
        i = 1 if is_expert_parameter(p) else 0
        d = (p.detach().double() - q.detach().double())
        sums[i, 0] += d.pow(2).sum().cpu()
        sums[i, 1] += q.detach().double().pow(2).sum().cpu()
        if d.numel():
            worst[i] = torch.maximum(worst[i], d.abs().max().cpu())
    if ep_group is not None:
        device = next(a.parameters()).device  # NCCL reduces device tensors only
        expert = torch.stack([sums[1, 0], sums[1, 1]]).to(device)
        dist.all_reduce(expert, group=ep_group)
        sums[1] = expert.cpu()
        w = worst[1:].clone().to(device)
        dist.all_reduce(w, op=dist.ReduceOp.MAX, group=ep_group)
        worst[1] = w.cpu()[0]
    diff, ref = math.sqrt(float(sums[:, 0].sum())), math.sqrt(float(sums[:, 1].sum()))
    return {"l2": diff, "relative": diff / ref if ref > 0 else diff, "max_abs": float(worst.max())}


def _any_rank(flag: bool, device: torch.device, groups: Any) -> bool:
    """Whether any rank's `flag` is set (collective with several ranks)."""
    if groups.world_size == 1:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _compare_seed(config: Mapping[str, Any], plan: Mapping[str, Any], seed: int, root: Path, ctx: CommandContext,
                  groups: Any) -> dict[str, Any]:
    from ampipe.train.worker_commands import build_trainer

    cfg = {**config, "run": {**(config.get("run") or {}), "seed": seed}}
    arms = {}
    for name in ARMS:
        def emit(kind: str, _arm: str = name, **fields: Any) -> None:
            ctx.emit(kind, arm=_arm, seed=seed, **fields)

        arms[name] = build_trainer(cfg, None if name == "baseline" else plan, str(root / f"seed-{seed}" / name),
                                   groups=groups, device=ctx.device or "cpu", emit=emit,
                                   should_stop=lambda: ctx.cancel_requested, say=lambda s: None)
    for t in arms.values():
        t.begin(resume=True)
    total = arms["baseline"].tcfg.steps
    stopped = False
    # An arm killed while saving may have resumed from an earlier step: bring it level first.
    while not stopped and (lag := min(arms.values(), key=lambda t: t.step)).step < max(t.step for t in arms.values()):
        lag.advance()
        stopped = lag.stop_requested()
        lag.checkpoint_if_due(stop=stopped)
    i = arms["baseline"].step
    while not stopped and arms["baseline"].step < total:
        for name in (ARMS if i % 2 == 0 else ARMS[::-1]):
            arms[name].advance()
        stopped = arms["baseline"].stop_requested()
        for t in arms.values():
            t.checkpoint_if_due(stop=stopped)
        i += 1
    summaries = {name: t.end(stopped=stopped) for name, t in arms.items()}
    distance = parameter_distance(arms["pipelined"].model, arms["baseline"].model,
                                  groups.ep.group if groups.ep.active else None)
    return {"seed": seed, "stopped": stopped, "arms": summaries, "parameter_distance": distance}


@command("compare")
def compare(args: dict, ctx: CommandContext) -> dict[str, Any]:
    """Baseline vs pipelined training over seeds. args: ``config`` (resolved), ``plan`` (the pipelined
    arm's), ``seeds`` (list of int), ``run_dir`` (the comparison's root). Stops after the current step
    of both arms when the controller sends ``cancel`` (with checkpoints)."""
    unknown = set(args) - _ARG_FIELDS
    if unknown:
        raise ValueError(f"compare: unknown argument(s) {sorted(unknown)}; known: {sorted(_ARG_FIELDS)}")
    config, plan, seeds, run_dir = args.get("config"), args.get("plan"), args.get("seeds"), args.get("run_dir")
    if not isinstance(config, Mapping) or not isinstance(plan, Mapping) or not isinstance(run_dir, str):
        raise ValueError("compare: needs config (a mapping), plan (a mapping) and run_dir (a string)")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ValueError(f"compare: seeds must be a non-empty list of integers >= 0; got {seeds!r}")
    from ampipe.parallel.groups import ParallelGroups, init_parallel_groups
    from ampipe.pipeline.worker_commands import plan_for_config

    plan_for_config(plan, config)
    ep = int((config.get("parallelism") or {}).get("expert_model_parallel_size", 1))
    if ctx.backend is None and ctx.world_size > 1:
        raise RuntimeError("compare: several ranks need torch.distributed (launch them with dist enabled)")
    groups = init_parallel_groups(ep) if ctx.backend is not None else ParallelGroups.single()

    def work() -> dict[str, Any]:
        device = torch.device(ctx.device or "cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        results = []
        for i, seed in enumerate(seeds):
            if i and _any_rank(ctx.cancel_requested, device, groups):
                break  # cancelled during the last step of the seed before: start no new one
            r = _compare_seed(config, plan, seed, Path(run_dir), ctx, groups)
            ctx.emit("seed_done", seed=seed, stopped=r["stopped"], parameter_distance=r["parameter_distance"])
            results.append(r)
            if r["stopped"]:
                break
        stopped = len(results) < len(seeds) or any(r["stopped"] for r in results)
        return {"rank": ctx.rank, "seeds": results, "stopped": stopped}

    return run_beside_heartbeats(ctx, float(args.get("timeout_s") or 7 * 24 * 3600.0), work, what="compare")
