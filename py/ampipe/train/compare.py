"""The rank command of `ampipe compare`: ``compare`` (docs/compare.md).

For each seed, trainers of the same model from the same initialisation and the same data order
live on every rank: the baseline arm (plain MoE layers), the pipelined arm (every MoE layer an
`AMPipeBlock` running the plan) and, when asked, the control arm: the baseline with every initial
weight moved by one ulp (`perturb_one_ulp`), the noise envelope the pipelined arm is judged
against. Their steps alternate in a Williams order (`step_orders`: ABBA for two arms, a 6-step
cycle for three), so the machine's drift hits every arm alike. Each arm is a run directory of its
own (``seed-S/<arm>``: checkpoints, TensorBoard events), resumed as `ampipe train` resumes;
events carry ``arm`` and ``seed``. At every evaluation the parameter distance of each arm to the
baseline is measured and sent as a ``param_distance`` metric.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ampipe.worker.background import run_beside_heartbeats
from ampipe.worker.commands import CommandContext, command

__all__ = ["compare", "parameter_distance", "perturb_one_ulp", "step_orders", "ARMS", "FAULT_ENV"]

ARMS = ("baseline", "pipelined", "control")
_ARG_FIELDS = {"config", "plan", "seeds", "run_dir", "timeout_s", "control"}
# A test hook: "<parameter name>=<factor>" scales that parameter's gradient in the pipelined arm
# (a deliberately wrong block, which the envelope must catch). Reported in every seed's result.
FAULT_ENV = "AMPIPE_TEST_GRAD_SCALE"
# A test hook: seconds to pause after each round of steps, so that a test's Ctrl-C lands inside a
# seed on any machine (a round of the tests' tiny models takes milliseconds). Changes no number.
PACE_ENV = "AMPIPE_TEST_COMPARE_PACE_S"


def perturb_one_ulp(model: nn.Module) -> None:
    """The control arm's perturbation: every parameter element moved by one ulp of its dtype, up at
    even flat indices and down at odd ones (no net drift; zeros move to ±the smallest subnormal).

    The initial weights are a rounding of real-valued draws to the parameter dtype; a one-ulp move
    is another rounding of the same draw, so the control trains the same model from the same
    initialisation and data, differing by rounding alone."""
    with torch.no_grad():
        for p in model.parameters():
            towards = torch.full((p.numel(),), math.inf, dtype=p.dtype, device=p.device)
            towards[1::2] = -math.inf
            p.copy_(torch.nextafter(p, towards.view_as(p)))


def step_orders(n_arms: int) -> list[list[int]]:
    """A Williams design: the orders in which the arms take their steps, one order per step,
    cycling. Every arm runs in every position equally often and follows every other arm equally
    often (first-order carry-over balanced): [[0, 1], [1, 0]] (ABBA) for two arms, six orders for
    three (an odd number of arms needs the mirrored square too)."""
    first, lo, hi = [0], 1, n_arms - 1
    for j in range(1, n_arms):
        if j % 2:
            first.append(lo)
            lo += 1
        else:
            first.append(hi)
            hi -= 1
    rows = [[(x + r) % n_arms for x in first] for r in range(n_arms)]
    return rows + [row[::-1] for row in rows] if n_arms % 2 else rows


def _fault(model: nn.Module) -> str | None:
    """Applies the `FAULT_ENV` test hook to the pipelined arm's model; returns its description."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    name, sep, factor = spec.partition("=")
    params = dict(model.named_parameters())
    if not sep or name not in params:
        raise ValueError(f"{FAULT_ENV}: expected <parameter name>=<factor> naming one of the model's parameters "
                         f"(e.g. {next(iter(params))}=1.01); got {spec!r}")
    scale = float(factor)
    params[name].register_hook(lambda g: g * scale)
    return f"gradient of {name} scaled by {scale:g} in the pipelined arm ({FAULT_ENV})"


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
                  groups: Any, arm_names: tuple[str, ...]) -> dict[str, Any]:
    from ampipe.train.worker_commands import build_trainer

    cfg = {**config, "run": {**(config.get("run") or {}), "seed": seed}}
    arms = {}
    for name in arm_names:
        def emit(kind: str, _arm: str = name, **fields: Any) -> None:
            ctx.emit(kind, arm=_arm, seed=seed, **fields)

        arms[name] = build_trainer(cfg, plan if name == "pipelined" else None, str(root / f"seed-{seed}" / name),
                                   groups=groups, device=ctx.device or "cpu", emit=emit,
                                   should_stop=lambda: ctx.cancel_requested, say=lambda s: None)
    if "control" in arms:
        perturb_one_ulp(arms["control"].model)  # a resumed control loads its checkpoint over this
    fault = _fault(arms["pipelined"].model)
    for t in arms.values():
        t.begin(resume=True)
    base = arms["baseline"]
    total, every = base.tcfg.steps, base.tcfg.eval_interval
    ep_group = groups.ep.group if groups.ep.active else None
    stopped = False
    # An arm killed while saving may have resumed from an earlier step: bring it level first.
    while not stopped and (lag := min(arms.values(), key=lambda t: t.step)).step < max(t.step for t in arms.values()):
        lag.advance()
        stopped = lag.stop_requested()
        lag.checkpoint_if_due(stop=stopped)
    orders = step_orders(len(arms))
    names = list(arms)
    pace = float(os.environ.get(PACE_ENV) or 0)
    i = base.step
    while not stopped and base.step < total:
        for k in orders[i % len(orders)]:
            arms[names[k]].advance()
        if base.step % every == 0 or base.step == total:  # evaluated: where the parameters stand
            for name in names[1:]:
                d = parameter_distance(arms[name].model, base.model, ep_group)
                if ctx.rank == 0:
                    ctx.emit("metric", name="param_distance", arm=name, seed=seed, step=base.step, **d)
        stopped = base.stop_requested()
        for t in arms.values():
            t.checkpoint_if_due(stop=stopped)
        i += 1
        if pace:
            time.sleep(pace)
    summaries = {name: t.end(stopped=stopped) for name, t in arms.items()}
    distance = {name: parameter_distance(arms[name].model, base.model, ep_group) for name in names[1:]}
    return {"seed": seed, "stopped": stopped, "arms": summaries, "parameter_distance": distance, "fault": fault}


@command("compare")
def compare(args: dict, ctx: CommandContext) -> dict[str, Any]:
    """Baseline vs pipelined training over seeds. args: ``config`` (resolved), ``plan`` (the pipelined
    arm's), ``seeds`` (list of int), ``run_dir`` (the comparison's root), ``control`` (bool: train the
    control arm too). Stops after the current step of every arm when the controller sends ``cancel``
    (with checkpoints)."""
    unknown = set(args) - _ARG_FIELDS
    if unknown:
        raise ValueError(f"compare: unknown argument(s) {sorted(unknown)}; known: {sorted(_ARG_FIELDS)}")
    config, plan, seeds, run_dir = args.get("config"), args.get("plan"), args.get("seeds"), args.get("run_dir")
    if not isinstance(config, Mapping) or not isinstance(plan, Mapping) or not isinstance(run_dir, str):
        raise ValueError("compare: needs config (a mapping), plan (a mapping) and run_dir (a string)")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ValueError(f"compare: seeds must be a non-empty list of integers >= 0; got {seeds!r}")
    control = args.get("control", False)
    if not isinstance(control, bool):
        raise ValueError(f"compare: control must be a boolean; got {control!r}")
    arm_names = ARMS if control else ARMS[:2]
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
            r = _compare_seed(config, plan, seed, Path(run_dir), ctx, groups, arm_names)
            ctx.emit("seed_done", seed=seed, stopped=r["stopped"], parameter_distance=r["parameter_distance"])
            results.append(r)
            if r["stopped"]:
                break
        stopped = len(results) < len(seeds) or any(r["stopped"] for r in results)
        return {"rank": ctx.rank, "seeds": results, "stopped": stopped}

    return run_beside_heartbeats(ctx, float(args.get("timeout_s") or 7 * 24 * 3600.0), work, what="compare")
