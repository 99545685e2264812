"""Baseline block vs pipelined block, side by side: equivalence, times, speed-up, bound.

`run_block_comparison` is what the rank-side `run_block` command calls: it builds one MoE
layer, runs the baseline block and the `AMPipeBlock` over the same parameters on the same
input (repetitions interleaved), and returns a msgpack-able dict with the largest
differences of outputs, losses and every gradient, the median step times, the speed-up,
the ideal bound and the replayed schedule (`analysis.py`) and per-op times (keyed by op id,
the calibration input of the planner).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..model.config import ModelConfig
from ..model.gpt import autocast_context, init_parameters
from ..model.layers import TransformerLayer
from ..parallel.groups import ExpertParallel
from .analysis import emulated_delay_report, ideal_bound_ms, replay, simulate_ms
from .block import AMPipeBlock
from .dims import model_config_from_plan
from .emulation import EmulatedBaseline, EmulatedComm
from .plan import Plan, load_plan
from .streams import OpTimes

__all__ = ["capacity_label", "block_step", "largest_differences", "run_block_comparison"]


def capacity_label(cfg: ModelConfig, plan: Plan) -> str:
    """Which routing a figure used, and whether the pipelined block is exactly the baseline."""
    if cfg.dropless:
        return "dropless (exact)"
    what = f"capacity factor {cfg.moe_expert_capacity_factor:g}, drop policy {cfg.moe_token_drop_policy}"
    if plan.capacity_scope == "sequence":
        return f"{what}, capacity of the whole sequence (exact)"
    return (f"{what}, capacity per chunk (another function than the baseline's whole-sequence "
            f"capacity: equal only where no chunk reaches its capacity)")


def block_step(block: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor,
               params: Sequence[torch.nn.Parameter],
               precision: ModelConfig | None = None) -> dict[str, torch.Tensor]:
    """One forward+backward of `(y·dy).sum() + aux + z`; returns y, the losses and the grads.

    `precision`: the forward runs under that config's autocast (`autocast_context`, as the
    model runs it: bf16/fp16 matmuls, fp32 parameters); the backward, as usual, outside it."""
    x.grad = None
    for p in params:
        p.grad = None
    with autocast_context(precision, x.device) if precision is not None else contextlib.nullcontext():
        y, losses = block(x)
        obj = (y.float() * dy).sum()
        if losses is not None:
            obj = obj + losses.aux_loss + losses.z_loss
    obj.backward()
    out = {"y": y.detach(), "dx": x.grad}
    if losses is not None:
        out["aux_loss"] = losses.aux_loss.detach()
        out["z_loss"] = losses.z_loss.detach()
    return out


def largest_differences(ref: Mapping[str, torch.Tensor | None],
                        got: Mapping[str, torch.Tensor | None]) -> dict[str, float]:
    """max|got - ref| / max|ref| per tensor (relative to the tensor's scale)."""
    out = {}
    for k, r in ref.items():
        g = got.get(k)
        if r is None and g is None:
            continue
        if r is None or g is None:
            out[k] = float("inf")
            continue
        r, g = r.double(), g.double()
        scale = r.abs().max().item()
        out[k] = (g - r).abs().max().item() / (scale if scale > 0 else 1.0)
    return out


def _median_makespans(samples: list[dict[str, OpTimes]]) -> dict[str, float]:
    out = {name: statistics.median(s[name].makespan_ms for s in samples)
           for name in ("forward", "backward") if all(name in s for s in samples)}
    if len(out) == 2:
        out["total"] = out["forward"] + out["backward"]
    return out


def _median_times(samples: list[dict[str, OpTimes]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name in ("forward", "backward"):
        per_op: dict[str, list[float]] = {}
        for s in samples:
            if name in s:
                for k, v in s[name].op_times_ms.items():
                    per_op.setdefault(k, []).append(v)
        out[name] = {k: statistics.median(v) for k, v in per_op.items()}
    return out


def run_block_comparison(
    model_cfg: ModelConfig | Mapping[str, Any] | None,
    plan: Plan | str | Mapping[str, Any],
    steps: int = 5,
    *,
    warmup: int = 1,
    seed: int = 0,
    device: str | torch.device = "cpu",
    ep: ExpertParallel | None = None,
    emulated_comm: EmulatedComm | Mapping[str, Any] | None = None,
    tolerance: float = 1e-5,
    input_seed: int | None = None,
    on_step: Callable[[int, float, float], None] | None = None,
) -> dict[str, Any]:
    """Run the baseline and the pipelined block side by side (steps in ABBA order); returns a
    plain dict.

    `model_cfg` supplies what the plan's dims do not (norm, rope, router options ...); the
    plan's dims win. With `ep` (an initialised expert-parallel group), each rank builds its
    shard of the same global weights and checks its own input against the baseline.
    `on_step(i, baseline_ms, pipelined_ms)` is called as each measured step ends.
    """
    if not isinstance(plan, Plan):
        plan = load_plan(plan)
    if isinstance(emulated_comm, Mapping):
        emulated_comm = EmulatedComm.from_dict(emulated_comm)
    cfg = model_config_from_plan(plan, model_cfg)
    device = torch.device(device)
    ep = ep or ExpertParallel.single()
    layer = TransformerLayer(cfg, 0, ep)
    init_parameters(layer, cfg, seed, prefix="decoder.layers.0.")
    layer = layer.to(device)
    block = AMPipeBlock.from_layer(layer, plan, emulated_comm=emulated_comm)
    baseline: torch.nn.Module = layer if emulated_comm is None else EmulatedBaseline(layer, emulated_comm)
    params = list(layer.parameters())
    names = [n for n, _ in layer.named_parameters()]

    g = torch.Generator().manual_seed(seed * 7919 + 17 + ep.rank if input_seed is None else input_seed)
    shape = (cfg.seq_length, cfg.micro_batch_size, cfg.hidden_size)
    x = torch.randn(shape, generator=g).to(device).requires_grad_(True)
    dy = (torch.randn(shape, generator=g) * cfg.hidden_size ** -0.5).to(device)

    def run(which: torch.nn.Module) -> tuple[dict[str, torch.Tensor], float]:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = block_step(which, x, dy, params, precision=cfg)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        ms = (time.perf_counter() - t0) * 1e3
        out.update({f"grad.{n}": p.grad.detach().clone() if p.grad is not None else None
                    for n, p in zip(names, params)})
        out["dx"] = out["dx"].detach().clone() if out["dx"] is not None else None
        return out, ms

    for _ in range(warmup):
        run(baseline)
        run(block)
    base_ms, pipe_ms, samples, delays = [], [], [], []
    diffs: dict[str, float] = {}
    for i in range(max(1, steps)):
        # ABBA: the baseline first on even steps, second on odd ones, so that a drift within a
        # step does not always favour the block that runs first.
        if i % 2 == 0:
            ref, tb = run(baseline)
            got, tp = run(block)
        else:
            got, tp = run(block)
            ref, tb = run(baseline)
        if on_step is not None:
            on_step(i, tb, tp)
        base_ms.append(tb)
        pipe_ms.append(tp)
        samples.append(block.last_times)
        delays.append(block.last_delays_ms or {})
        for k, v in largest_differences(ref, got).items():
            diffs[k] = max(diffs.get(k, 0.0), v)

    op_times = _median_times(samples)
    bound = ideal_bound_ms(plan, op_times)
    schedule = replay(plan, op_times, per_stream=device.type == "cuda")
    sim = simulate_ms(plan, op_times, per_stream=device.type == "cuda")
    tb, tp = statistics.median(base_ms), statistics.median(pipe_ms)
    worst = max(diffs.items(), key=lambda kv: kv[1])
    gain = tb - bound["bound_ms"]
    return {
        "plan": {"variant": plan.variant, "degree": plan.num_chunks,
                 "boundaries": list(plan.boundaries)},
        "device": str(device),
        "rank": ep.rank, "ep_size": ep.size,
        "emulated": emulated_comm.label if emulated_comm is not None else None,
        # What both arms computed in: autocast to this dtype (fp32: none), fp32 parameters.
        "precision": cfg.dtype,
        "capacity": capacity_label(cfg, plan),
        "equivalence": {"largest_relative_differences": diffs, "worst": list(worst),
                        "tolerance": tolerance, "ok": worst[1] <= tolerance},
        "baseline_ms": tb, "pipelined_ms": tp,
        "baseline_samples_ms": base_ms, "pipelined_samples_ms": pipe_ms,
        "speedup": tb / tp,
        "ideal_bound_ms": bound["bound_ms"], "ideal_speedup": tb / bound["bound_ms"],
        "overlap_efficiency": (tb - tp) / gain if gain > 0 else None,
        "bound": bound,
        "simulated_ms": sim["total_ms"],
        # That replay, op by op ({pass: {op id: [start_ms, end_ms]}}): the measured run's schedule.
        "replay": {name: {k: list(v) for k, v in spans.items()} for name, spans in schedule.items()},
        "op_times_ms": op_times,
        # Emulation check: per comm kind, measured op time / modelled delay (expect ~1).
        "emulated_delay": emulated_delay_report(plan, op_times, delays) if emulated_comm else None,
        # The planner's calibration input (docs/plan.md): `ampipe plan --calibration`.
        "calibration": {"plan": plan.to_dict(), "op_times_ms": op_times,
                        "makespan_ms": _median_makespans(samples)},
    }
