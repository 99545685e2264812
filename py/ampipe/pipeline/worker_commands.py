"""Rank commands of the pipelined block: ``run_block`` (what ``ampipe run`` sends each rank).

The controller imports this module on every rank (``launchRanks({imports: [...]})``); the
command builds one MoE layer from the resolved experiment config, checks the plan against
it, and calls `run_block_comparison` with the rank's expert-parallel group.

The comparison runs on a helper thread while the rank's main thread keeps heartbeating
(`ampipe.worker.background`): a comparison of a large block can outlast the controller's
heartbeat deadline. Each measured step's metric event is emitted as the step ends, from the
helper thread, so the controller's progress is live.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from ampipe.worker.background import run_beside_heartbeats
from ampipe.worker.commands import CommandContext, command

__all__ = ["TOLERANCE_BY_DTYPE", "CUDA_TOLERANCE_BY_DTYPE", "default_tolerance", "plan_for_config", "run_block"]

# Largest relative difference (max|got - ref| / max|ref|, per tensor) accepted as equivalent.
# fp32 on CPU: the 1e-5. On CUDA, chunked attention and matmuls of other shapes pick
# other kernels (and reduction orders), so fp32 gets 1e-4, as in test_cuda.py. Half
# precisions round each op's output, and the chunked schedule sums in another order.
TOLERANCE_BY_DTYPE: dict[str, float] = {"fp32": 1e-5, "bf16": 3e-2, "fp16": 1e-2}
CUDA_TOLERANCE_BY_DTYPE: dict[str, float] = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 1e-2}


def default_tolerance(dtype: str, device_type: str) -> float:
    """The equivalence tolerance `run_block` uses unless it is given one."""
    table = CUDA_TOLERANCE_BY_DTYPE if device_type == "cuda" else TOLERANCE_BY_DTYPE
    return table[dtype]


# The main thread stops waiting (and the command fails) after this long by default.
DEFAULT_TIMEOUT_S = 3600.0

_ARG_FIELDS = {"config", "plan", "steps", "warmup", "seed", "emulated_comm", "tolerance", "timeout_s"}


def plan_for_config(plan: Mapping[str, Any], config: Mapping[str, Any]) -> Any:
    """The loaded `Plan`, checked against the experiment config: its dims (naming the field), its
    capacity scope, and the scope against the drop policy. Every rank command that runs a plan uses it."""
    from ampipe.config_schema import resolve_section
    from ampipe.model.config import ModelConfig, check_capacity_scope
    from ampipe.pipeline.dims import dims_from_config
    from ampipe.pipeline.plan import PlanError, check_dims, load_plan

    p = load_plan(dict(plan))
    check_dims(p, dims_from_config(config))
    scope = resolve_section(config, "pipeline")["capacity_scope"]
    if p.capacity_scope != scope:
        raise PlanError(f"plan: capacity_scope = {p.capacity_scope!r} but the config's "
                        f"pipeline.capacity_scope is {scope!r}")
    check_capacity_scope(scope, ModelConfig.from_dict(resolve_section(config, "model")).moe_token_drop_policy)
    return p


def _int_arg(args: Mapping[str, Any], name: str, default: int, minimum: int) -> int:
    v = args.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"run_block: {name} must be an integer >= {minimum}, got {v!r}")
    return v


def _expert_parallel(ctx: CommandContext, ep_size: int):
    from ampipe.parallel.groups import ExpertParallel

    if ep_size == 1:
        return ExpertParallel.single()
    if ctx.backend is None:
        raise RuntimeError(f"run_block: parallelism.expert_model_parallel_size = {ep_size} needs "
                           "torch.distributed on the ranks (launch them with dist enabled)")
    if ctx.world_size % ep_size != 0:
        raise ValueError(f"run_block: parallelism.world_size ({ctx.world_size}) is not divisible by "
                         f"parallelism.expert_model_parallel_size ({ep_size})")
    # Contiguous ranks [k*ep, (k+1)*ep) share experts: the layout of ampipe.parallel.groups.
    return ExpertParallel(group=ctx.subgroup(ep_size), size=ep_size, rank=ctx.rank % ep_size)


@command("run_block")
def run_block(args: dict, ctx: CommandContext) -> dict[str, Any]:
    """Baseline block vs `AMPipeBlock` on this rank, side by side (docs/run.md).

    args: ``config`` (the resolved experiment config), ``plan`` (plan JSON, checked against
    the config's dims), and optionally ``steps``, ``warmup``, ``seed`` (default: the
    config's ``run`` section), ``emulated_comm`` (default: ``pipeline.emulated_comm``),
    ``tolerance`` (default: `default_tolerance` of the dtype and device), ``timeout_s``.

    Emits ``progress`` events (stage ``start`` and ``done``) and one ``metric`` event per
    measured step as it ends (``name="block_step"``, ``baseline_ms``, ``pipelined_ms``); returns
    `run_block_comparison`'s dict plus ``rank``, ``world_size``, ``backend`` and ``dims``.
    """
    unknown = set(args) - _ARG_FIELDS
    if unknown:
        raise ValueError(f"run_block: unknown argument(s) {sorted(unknown)}; known: {sorted(_ARG_FIELDS)}")
    for name in ("config", "plan"):
        if not isinstance(args.get(name), Mapping):
            raise ValueError(f"run_block: argument {name!r} is required (a mapping), "
                             f"got {type(args.get(name)).__name__}")
    from ampipe.config_schema import resolve_section
    from ampipe.pipeline.dims import dims_from_config

    config: Mapping[str, Any] = args["config"]
    run_cfg = resolve_section(config, "run")
    steps = _int_arg(args, "steps", run_cfg["steps"], 1)
    warmup = _int_arg(args, "warmup", run_cfg["warmup"], 0)
    seed = _int_arg(args, "seed", run_cfg["seed"], 0)
    emulated = args["emulated_comm"] if "emulated_comm" in args else resolve_section(config, "pipeline")["emulated_comm"]
    timeout_s = float(args.get("timeout_s") or DEFAULT_TIMEOUT_S)

    dims = dims_from_config(config)
    plan = plan_for_config(args["plan"], config)  # a PlanError naming the field, before any rank builds anything
    device = ctx.device if ctx.device is not None else "cpu"
    tolerance = args.get("tolerance")
    if tolerance is None:
        tolerance = default_tolerance(dims["dtype"], getattr(device, "type", str(device).split(":")[0]))
    if not isinstance(tolerance, (int, float)) or isinstance(tolerance, bool) or tolerance < 0:
        raise ValueError(f"run_block: tolerance must be a number >= 0, got {tolerance!r}")

    ep = _expert_parallel(ctx, dims["expert_model_parallel_size"])
    ctx.emit("progress", stage="start", steps=steps, warmup=warmup,
             variant=plan.variant, degree=plan.num_chunks)
    t0 = time.perf_counter()

    def on_step(i: int, tb: float, tp: float) -> None:  # on the helper thread, as each step ends
        ctx.emit("metric", name="block_step", step=i, steps=steps, baseline_ms=tb, pipelined_ms=tp)

    def body() -> dict[str, Any]:
        return _compare(config, plan, steps, warmup, seed, device, ep, emulated, float(tolerance), on_step)

    result = _run_beside_heartbeats(ctx, timeout_s, body)
    ctx.emit("progress", stage="done", seconds=time.perf_counter() - t0,
             ok=bool(result["equivalence"]["ok"]))
    result.update({"rank": ctx.rank, "ep_rank": ep.rank, "world_size": ctx.world_size,
                   "backend": ctx.backend, "dims": dims, "steps": steps, "warmup": warmup, "seed": seed})
    return result


def _compare(config: Mapping[str, Any], plan: Any, steps: int, warmup: int, seed: int,
             device: Any, ep: Any, emulated: Any, tolerance: float, on_step=None) -> dict[str, Any]:
    import torch

    from ampipe.pipeline.side_by_side import run_block_comparison

    if torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device))  # the current device is per thread
    from ampipe.config_schema import resolve_section

    return run_block_comparison(resolve_section(config, "model"), plan, steps, warmup=warmup,
                                seed=seed, device=device, ep=ep, emulated_comm=emulated,
                                tolerance=tolerance, on_step=on_step)


def _run_beside_heartbeats(ctx: CommandContext, timeout_s: float, fn) -> Any:
    return run_beside_heartbeats(ctx, timeout_s, fn, what="run_block: the comparison")
