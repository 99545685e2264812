"""Pipelined block vs baseline block, forward+backward, with an emulated all-to-all.

    python -m ampipe.bench.pipeline                       # CPU, default dims, ratios 0.25..1
    python -m ampipe.bench.pipeline --plan plan.json --ratios 0.5,1 --json out.json
    python -m ampipe.bench.pipeline --device cuda --world-size 8 --set seq_length=4096

Both blocks run in one process over the same parameters and input, repetitions
interleaved (baseline, plan 1, ..., plan n, then plan n, ..., baseline: ABBA order). Communication
is *emulated* (one device stands in for `--world-size` ranks): each all-to-all does its
local data movement plus `latency + bytes / bandwidth` on its stream. The bandwidth is
calibrated per ratio r from the measured baseline compute time C so that the baseline's
four all-to-alls (dispatch, combine and their backward) take r·C.

Figures are *paired*: repetition i gives the baseline time T_base,i, each plan's time
T_pipe,i and the plan's ideal bound T_bound,i (per pass the largest of fill + compute +
drain, fill + comm + drain and the longest dependency chain, from that repetition's per-op
times; `analysis.ideal_bound_ms`). A ratio is formed per repetition, then the median and the
quartiles over repetitions are quoted. On a shared machine whose speed drifts between
seconds, the two times of one repetition drift together and the ratio cancels it; medians
of each side taken separately do not.

Printed per ratio and plan: baseline and pipelined medians, speed-up T_base/T_pipe, the
ideal speed-up T_base/T_bound, the overlap efficiency median(T_base - T_pipe) /
median(T_base - T_bound) over repetitions (`[q1..q3, n of N]`: quartiles of the
per-repetition efficiency over the n repetitions whose bound is below the baseline), the
plan's own schedule replayed with the median op times (what the executor's hand-offs add
is the gap between that and the measured time), and per comm kind
the measured comm op time against the modelled delay (`emulated_delay`: ~1 when the
emulation does what it says; its local data movement is nothing with one rank).
Also the P=1 overhead (a one-chunk plan against the baseline, no emulation, paired over
`--overhead-iters` repetitions); for a multi-chunk plan, its cost without emulation split in two
with a third arm, its chunked reference (`chunked_block_forward`: the same chunks in one autograd
graph, no executor): what chunking costs by itself, and what the executor adds on top; and the
memory ratio: on CUDA the peak allocated during a
step; on CPU the bytes the step keeps alive for backward (tensors saved by autograd, plus
what the executor holds), deduplicated by storage, since CPU has no allocator peak counter.

``--shared-expert F`` runs it all twice: the block without a shared expert, then with one
of FFN width F (Megatron's shared expert; the named schedules' ``-shared`` variants, where
it is its own op per chunk), at the *same* emulated interconnect: the second run keeps the
bandwidth the first calibrated for each ratio (the ratios are those of the block without
it). Printed at the end: per ratio and plan, the speed-up without and with, side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..model.config import ModelConfig
from ..model.block_pieces import chunked_block_forward
from ..model.gpt import autocast_context
from ..pipeline.block import AMPipeBlock
from ..pipeline.dims import block_dims
from ..pipeline.analysis import emulated_delay_report, ideal_bound_ms, simulate_ms
from ..pipeline.emulation import EmulatedBaseline, EmulatedComm
from ..pipeline.side_by_side import block_step, capacity_label
from ..pipeline.plan import Plan, load_plan, retarget_plan
from .block import block_inputs, load_model_config, make_baseline_block
from .timing import sync
from ..wire import a2a_rows, wire_bytes

__all__ = ["bench_pipeline", "compare_shared_expert", "activation_bytes", "main"]

DEFAULT_MODEL = dict(num_layers=1, seq_length=512, micro_batch_size=2, hidden_size=256,
                     num_attention_heads=8, num_experts=4, moe_router_topk=2,
                     moe_ffn_hidden_size=512)
DEFAULT_PLANS = ("sequential-p1", "interleaved-p2", "grouped-p2", "interleaved-p4")
# The named schedules ship with the package (generated with the test fixtures by
# scripts/gen-plan-fixtures.ts), so an installed ampipe finds them.
SCHEDULES = Path(__file__).resolve().parent / "schedules"


def paired(values: list[float]) -> dict[str, float]:
    """Median and quartiles of per-repetition figures."""
    if not values:
        raise ValueError("paired: no repetitions")
    if len(values) < 2:
        v = values[0]
        return {"median": v, "q1": v, "q3": v, "n": len(values)}
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": q2, "q1": q1, "q3": q3, "n": len(values)}


def paired_figures(plan: Plan, base_ms: list[float], pipe_ms: list[float],
                   op_times: list[dict[str, dict[str, float]]]) -> dict[str, Any]:
    """Per repetition i: speed-up, ideal speed-up (the bound from that repetition's op
    times), each as `paired` statistics; and the overlap efficiency
    median_i(T_base - T_pipe) / median_i(T_base - T_bound) (None when the bound is not below
    the baseline), with the quartiles of the per-repetition efficiencies beside it. A ratio
    per repetition would be unstable where the bound comes near the baseline, and keeping
    only the repetitions whose bound is below it would keep the noise that went one way."""
    bounds = [ideal_bound_ms(plan, t)["bound_ms"] for t in op_times]
    gain = statistics.median(tb - b for tb, b in zip(base_ms, bounds))
    eff = None
    if gain > 0:
        per_rep = [(tb - tp) / (tb - b) for tb, tp, b in zip(base_ms, pipe_ms, bounds) if tb > b]
        eff = {**(paired(per_rep) if per_rep else {"median": None, "q1": None, "q3": None, "n": 0}),
               "value": statistics.median(tb - tp for tb, tp in zip(base_ms, pipe_ms)) / gain}
    return {"speedup": paired([tb / tp for tb, tp in zip(base_ms, pipe_ms)]),
            "ideal_speedup": paired([tb / b for tb, b in zip(base_ms, bounds)]),
            "overlap_efficiency": eff,
            "ideal_bound_ms": statistics.median(bounds)}


def _in_turn(blocks: dict[str, Any], i: int) -> list[tuple[str, Any]]:
    """The blocks of repetition i (0 = the first measured one): in order on even
    repetitions, reversed on odd ones (ABBA), so that a drift within a repetition does not
    always favour the blocks that run first. Even repetition counts balance the orders."""
    items = list(blocks.items())
    return items if i % 2 == 0 else items[::-1]


def _timed_step(block, x, dy, params, device, precision: ModelConfig) -> float:
    sync(device)
    t0 = time.perf_counter()
    block_step(block, x, dy, params, precision)
    sync(device)
    return (time.perf_counter() - t0) * 1e3


def _pct(stats: dict[str, float]) -> str:
    return f"{stats['median'] * 100:+.1f}% [{stats['q1'] * 100:+.1f}% .. {stats['q3'] * 100:+.1f}%]"


class _ChunkedReference(torch.nn.Module):
    """A plan's chunks computed by hand (`chunked_block_forward`) on the baseline layer's parameters."""

    def __init__(self, layer: torch.nn.Module, boundaries: list[int]) -> None:
        super().__init__()
        self.layer, self.boundaries = layer, list(boundaries)

    def forward(self, x: torch.Tensor):
        return chunked_block_forward(self.layer, x, self.boundaries)


def _max_diff_y(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor, precision: ModelConfig) -> float:
    """max |y_a - y_b| of two blocks' forwards on x, in eval mode (no dropout masks to differ):
    both arms compute one function."""
    modes = [(m, m.training) for m in {*a.modules(), *b.modules()}]
    try:
        a.eval()
        b.eval()
        with torch.no_grad(), autocast_context(precision, x.device):
            return (a(x)[0].float() - b(x)[0].float()).abs().max().item()
    finally:
        for m, mode in modes:
            m.training = mode


def activation_bytes(block: torch.nn.Module, x: torch.Tensor, precision: ModelConfig | None = None) -> int:
    """Bytes a forward keeps alive for backward: saved tensors and executor-held tensors,
    deduplicated by storage (CPU stand-in for a peak-memory counter)."""
    storages: dict[int, int] = {}

    def add(t: Any) -> None:
        if isinstance(t, torch.Tensor):
            try:
                st = t.untyped_storage()
                storages[st.data_ptr()] = st.nbytes()
            except (RuntimeError, NotImplementedError):
                pass

    def pack(t: torch.Tensor) -> torch.Tensor:
        add(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            autocast_context(precision, x.device) if precision is not None else contextlib.nullcontext():
        y, losses = block(x)
    step = getattr(y.grad_fn, "step", None)  # AMPipeBlock: what the islands hold
    if step is not None:
        for island in step.islands.values():
            for t in (*island.inputs, *island.outputs):
                add(t)
        for t in (step.kbuf, step.vbuf):
            add(t)
    add(y)
    del y, losses
    return sum(storages.values())


def _peak_cuda(block, x, dy, params, device, precision: ModelConfig) -> int:
    sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    block_step(block, x, dy, params, precision)
    sync(device)
    return torch.cuda.max_memory_allocated(device) - before


def _plans_for(cfg: ModelConfig, layer, names: list[str], plan_dir: Path,
               capacity_scope: str = "chunk") -> dict[str, Plan]:
    dims = block_dims(layer, cfg.seq_length, cfg.micro_batch_size)
    plans = {}
    for name in names:
        path = Path(name) if name.endswith(".json") else plan_dir / f"{name}.json"
        if cfg.has_shared_expert and not name.endswith(".json") and (plan_dir / f"{name}-shared.json").is_file():
            path = plan_dir / f"{name}-shared.json"  # the same schedule with the shared expert's ops
        if not name.endswith(".json") and not path.is_file():
            known = sorted(p.stem for p in plan_dir.glob("*.json"))
            raise SystemExit(f"--plan {name}: no schedule of that name in {plan_dir} "
                             f"(known: {', '.join(known)}; or give a plan file)")
        plan = load_plan(path)
        if name.endswith(".json"):
            plans[path.stem] = plan  # a plan made for these dims (`ampipe plan --out`)
        else:  # a committed schedule, retargeted to these dims with uniform boundaries
            plans[name] = retarget_plan(dataclasses.replace(plan, capacity_scope=capacity_scope), dims)
    return plans


def bench_pipeline(cfg: ModelConfig, plan_names: list[str], ratios: list[float], *,
                   latency_us: float = 20.0, world_size: int = 8, warmup: int = 1,
                   iters: int = 10, overhead_iters: int = 30, seed: int = 0,
                   device: str | torch.device = "cpu", capacity_scope: str = "chunk",
                   plan_dir: Path = SCHEDULES, bandwidths: dict[float, float] | None = None,
                   log=print) -> dict[str, Any]:
    """``bandwidths``: per ratio, the emulated bandwidth (GB/s) to use instead of the one that
    makes the baseline's all-to-alls take ratio x its compute (to compare two blocks at one
    interconnect)."""
    device = torch.device(device)
    layer = make_baseline_block(cfg, device=device, seed=seed)
    params = list(layer.parameters())
    x, dy = block_inputs(cfg, device, seed)
    plans = _plans_for(cfg, layer, plan_names, plan_dir, capacity_scope)
    capacity = {k: capacity_label(cfg, p) for k, p in plans.items()}

    # 1. Baseline compute and the cost of each plan, without communication.
    # Every arm (the baseline, each plan, each multi-chunk plan's chunked reference) runs
    # max(iters, overhead_iters) repetitions: the differences here are small. A multi-chunk
    # plan's chunked reference is the same chunks computed by hand in one autograd graph
    # (`chunked_block_forward`): what chunking costs by itself, apart from the executor.
    plain = {"baseline": layer, **{k: AMPipeBlock.from_layer(layer, p) for k, p in plans.items()}}
    refs = {k: f"{k} (chunked reference)" for k, p in plans.items() if p.num_chunks > 1
            and (cfg.dropless or p.capacity_scope == "chunk")}  # sequence scope: another function
    timed_arms = {**plain, **{r: _ChunkedReference(layer, plans[k].boundaries) for k, r in refs.items()}}
    samples: dict[str, list[float]] = {k: [] for k in timed_arms}
    for i in range(-warmup, max(iters, overhead_iters)):
        for k, b in _in_turn(timed_arms, i):
            t = _timed_step(b, x, dy, params, device, cfg)
            if i >= 0:
                samples[k].append(t)
    compute_ms = statistics.median(samples["baseline"])
    no_comm = {k: statistics.median(samples[k]) for k in plain}
    from ..runtime import freed_memory_kept

    malloc = "malloc keeping freed memory (ampipe.runtime)" if freed_memory_kept() else "default malloc settings"
    shared = (f" shared expert {cfg.moe_shared_expert_intermediate_size}"
              if cfg.has_shared_expert else "")
    log(f"baseline compute (no communication): {compute_ms:.2f} ms fwd+bwd "
        f"[{device}, {cfg.dtype}, s={cfg.seq_length} b={cfg.micro_batch_size} "
        f"H={cfg.hidden_size} E={cfg.num_experts} top-{cfg.moe_router_topk}{shared}; {malloc}]; routing: "
        + "; ".join(sorted(set(capacity.values()))))

    def over(arm: str, base: str = "baseline") -> dict[str, float]:
        return paired([t / tb - 1 for t, tb in zip(samples[arm], samples[base])])

    overhead_stats = {k: over(k) for k in plans if plans[k].num_chunks == 1}
    overhead = {k: v["median"] for k, v in overhead_stats.items()}
    for k, v in overhead_stats.items():
        log(f"P=1 overhead ({k}, no communication): {v['median'] * 100:+.1f}% "
            f"(paired median of {v['n']}; quartiles {v['q1'] * 100:+.1f}% .. {v['q3'] * 100:+.1f}%)")
    chunking = {}
    for k, r in refs.items():
        chunking[k] = {"chunked_reference": over(r), "pipelined": over(k), "executor": over(k, r),
                       "max_abs_diff_y": _max_diff_y(timed_arms[k], timed_arms[r], x, cfg)}
        c = chunking[k]
        log(f"P={plans[k].num_chunks} cost ({k}, no communication; paired medians of {c['pipelined']['n']} "
            f"[quartiles], separate medians, so they do not add up): pipelined {_pct(c['pipelined'])} over "
            f"the baseline; the chunking itself (its chunked reference, max |Δy| {c['max_abs_diff_y']:.1e}) "
            f"{_pct(c['chunked_reference'])}; the executor {_pct(c['executor'])} over that reference")
    for k in plans:
        if plans[k].num_chunks > 1 and k not in refs:
            log(f"{k}: no chunked reference (its capacity of the whole sequence, applied chunk by chunk, "
                f"is not the reference's per-chunk capacity)")

    # 2. Memory.
    if device.type == "cuda":
        mem = {k: _peak_cuda(b, x, dy, params, device, cfg) for k, b in plain.items()}
        mem_kind = "peak allocated during a step"
    else:
        mem = {k: activation_bytes(b, x, cfg) for k, b in plain.items()}
        mem_kind = "bytes kept for backward (saved + executor-held)"
    mem_ratio = {k: mem[k] / mem["baseline"] for k in plain if k != "baseline"}
    for k, v in mem_ratio.items():
        log(f"memory {k}: {v:.3f}x baseline ({mem_kind})")

    # 3. Emulated communication at each comm/compute ratio.
    rows = a2a_rows(cfg.seq_length * cfg.micro_batch_size, cfg.moe_router_topk, cfg.num_experts,
                    cfg.moe_expert_capacity_factor)
    token_dtype = cfg.torch_dtype if cfg.dtype != "fp32" else x.dtype  # tokens travel in the autocast dtype
    a2a_bytes = rows * cfg.hidden_size * torch.empty((), dtype=token_dtype).element_size()
    results = []
    for r in ratios:
        budget_s = r * compute_ms / 1e3 - 4 * latency_us * 1e-6
        if budget_s <= 0:
            raise SystemExit(f"--ratios {r}: the latency alone exceeds r x compute; lower --latency-us")
        wire = 4 * wire_bytes(a2a_bytes, world_size)
        bandwidth = bandwidths[r] if bandwidths is not None else wire / budget_s / 1e9
        emu = EmulatedComm(latency_us=latency_us, bandwidth_gbps=bandwidth, world_size=world_size)
        blocks = {"baseline": EmulatedBaseline(layer, emu),
                  **{k: AMPipeBlock.from_layer(layer, p, emulated_comm=emu) for k, p in plans.items()}}
        samples = {k: [] for k in blocks}
        op_samples: dict[str, list[dict[str, dict[str, float]]]] = {k: [] for k in plans}
        spans: dict[str, list[dict[str, float]]] = {k: [] for k in plans}
        delays: dict[str, list[dict[str, dict[str, float]]]] = {k: [] for k in plans}
        for i in range(-warmup, iters):
            for k, b in _in_turn(blocks, i):
                t = _timed_step(b, x, dy, params, device, cfg)
                if i >= 0:
                    samples[k].append(t)
                    if k in plans:
                        op_samples[k].append({n: ts.op_times_ms for n, ts in b.last_times.items()})
                        spans[k].append({n: ts.makespan_ms for n, ts in b.last_times.items()})
                        delays[k].append(b.last_delays_ms or {})
        tb = statistics.median(samples["baseline"])
        log(f"\nratio {r:g}: {emu.label}; baseline {tb:.2f} ms (emulated)")
        for k, plan in plans.items():
            tp = statistics.median(samples[k])
            per_op = {n: {op: statistics.median(s[n][op] for s in op_samples[k])
                          for op in op_samples[k][0][n]} for n in ("forward", "backward")}
            fig = paired_figures(plan, samples["baseline"], samples[k], op_samples[k])
            sim = simulate_ms(plan, per_op, per_stream=device.type == "cuda")["total_ms"]
            delay_check = emulated_delay_report(plan, per_op, delays[k])
            eff = fig["overlap_efficiency"]
            row = {"ratio": r, "plan": k, "degree": plan.num_chunks, "variant": plan.variant,
                   "baseline_ms": tb, "pipelined_ms": tp,
                   "speedup": fig["speedup"]["median"],
                   "ideal_bound_ms": fig["ideal_bound_ms"],
                   "ideal_speedup": fig["ideal_speedup"]["median"],
                   "overlap_efficiency": None if eff is None else eff["value"],
                   "paired": fig, "emulated": emu.label,
                   "schedule_simulated_ms": sim,
                   "calibration": {"plan": plan.to_dict(), "op_times_ms": per_op, "makespan_ms": {
                       n: statistics.median(sp[n] for sp in spans[k]) for n in ("forward", "backward")}},
                   "bandwidth_gbps": emu.bandwidth_gbps, "op_times_ms": per_op,
                   "emulated_delay": delay_check}
            results.append(row)
            eff_txt = ("n/a" if eff is None else f"{eff['value']:5.2f}" + (
                f" [{eff['q1']:.2f}..{eff['q3']:.2f}, {eff['n']} of {len(samples[k])}]"
                if eff["n"] else ""))
            log(f"  {k:<22} {tp:8.2f} ms  speed-up {row['speedup']:5.3f}  "
                f"ideal {row['ideal_speedup']:5.3f}  overlap efficiency {eff_txt}  "
                f"(this schedule with these op times: {sim:.2f} ms)")
            log("    comm op time / modelled delay: " + ", ".join(
                f"{kind} {d['measured_ms']:.2f}/{d['modelled_ms']:.2f} ms = {d['ratio']:.2f}"
                for kind, d in delay_check.items()))
    return {"label": "emulated communication", "device": str(device), "config": cfg.to_dict(),
            "precision": cfg.dtype,  # both arms ran under this autocast dtype (fp32: none)
            "capacity": capacity,  # per plan: dropless, or which capacity (exact or not)
            "compute_ms": compute_ms, "no_comm_ms": no_comm, "p1_overhead": overhead,
            "p1_overhead_paired": overhead_stats, "overhead_iters": overhead_iters,
            "chunking_cost": chunking,
            "memory_bytes": mem, "memory_ratio": mem_ratio, "memory_kind": mem_kind,
            "latency_us": latency_us, "world_size": world_size, "iters": iters,
            "results": results}


def compare_shared_expert(cfg: ModelConfig, width: int, plan_names: list[str], ratios: list[float],
                          log=print, **options: Any) -> dict[str, Any]:
    """`bench_pipeline` without a shared expert, then with one of FFN width ``width`` at the
    bandwidths the first run calibrated (one emulated interconnect for both); the speed-ups
    side by side per ratio and plan."""
    without = cfg.replace(moe_shared_expert_intermediate_size=None, moe_shared_expert_gate=False)
    with_shared = cfg.replace(moe_shared_expert_intermediate_size=width)
    log("== without a shared expert ==")
    base = bench_pipeline(without, plan_names, ratios, log=log, **options)
    bandwidths = {row["ratio"]: row["bandwidth_gbps"] for row in base["results"]}
    log(f"\n== with a shared expert (FFN {width}), the same emulated interconnect ==")
    shared = bench_pipeline(with_shared, plan_names, ratios, bandwidths=bandwidths, log=log, **options)
    rows = []
    log(f"\nspeed-up over the baseline block, without -> with a shared expert (FFN {width}), "
        f"same emulated interconnect; paired medians:")
    for a, b in zip(base["results"], shared["results"]):
        rows.append({"ratio": a["ratio"], "plan": a["plan"], "bandwidth_gbps": a["bandwidth_gbps"],
                     "speedup_without": a["speedup"], "speedup_with": b["speedup"],
                     "baseline_ms_without": a["baseline_ms"], "baseline_ms_with": b["baseline_ms"],
                     "pipelined_ms_without": a["pipelined_ms"], "pipelined_ms_with": b["pipelined_ms"]})
        log(f"  ratio {a['ratio']:<5g} {a['plan']:<16} {a['speedup']:.3f} -> {b['speedup']:.3f}   "
            f"(baseline {a['baseline_ms']:.2f} -> {b['baseline_ms']:.2f} ms, "
            f"pipelined {a['pipelined_ms']:.2f} -> {b['pipelined_ms']:.2f} ms)")
    return {"label": "emulated communication, without and with a shared expert",
            "shared_expert_intermediate_size": width, "without": base, "with": shared,
            "comparison": rows}


def _count(least: int):
    def parse(text: str) -> int:
        n = int(text)
        if n < least:
            raise argparse.ArgumentTypeError(f"must be an integer >= {least}, got {text}")
        return n
    parse.__name__ = "integer"  # argparse's "invalid integer value: ..."
    return parse


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m ampipe.bench.pipeline",
        description="Baseline vs pipelined block (forward+backward) with an emulated all-to-all.")
    ap.add_argument("--config", help="YAML/JSON experiment config (its model section is used)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a model field, e.g. --set seq_length=1024 (repeatable)")
    ap.add_argument("--plan", action="append", default=[], metavar="NAME|FILE",
                    help="a plan file for these dims, or a committed schedule name "
                         f"(retargeted to the dims); default {', '.join(DEFAULT_PLANS)}")
    ap.add_argument("--plan-dir", default=str(SCHEDULES), help="where schedule names are looked up")
    ap.add_argument("--ratios", default="0.25,0.5,0.75,1.0",
                    help="emulated comm/compute ratios of the baseline block")
    ap.add_argument("--latency-us", type=float, default=20.0, help="emulated latency per all-to-all")
    ap.add_argument("--world-size", type=int, default=8, help="emulated expert-parallel ranks")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--warmup", type=_count(0), default=1)
    ap.add_argument("--iters", type=_count(1), default=10, help="repetitions per ratio")
    ap.add_argument("--overhead-iters", type=_count(1), default=30,
                    help="repetitions without communication of every block and each multi-chunk "
                         "plan's chunked reference (the P=1 overhead, the chunking and executor costs)")
    ap.add_argument("--capacity-scope", choices=["chunk", "sequence"], default="chunk",
                    help="with a capacity factor, where the named schedules size it (sequence: exact, "
                         "needs moe_token_drop_policy=position)")
    ap.add_argument("--shared-expert", type=_count(1), metavar="F",
                    help="run without and then with a shared expert of FFN width F at the same "
                         "emulated interconnect, and compare the speed-ups")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    args = ap.parse_args(argv)
    from ..runtime import keep_freed_memory

    keep_freed_memory()  # as a rank does (docs/pipeline.md); AMPIPE_MALLOC=default to compare
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(args.threads)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    defaults = [] if args.config else [f"{k}={v}" for k, v in DEFAULT_MODEL.items()]
    cfg = load_model_config(args.config, defaults + args.set)
    ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    options = dict(latency_us=args.latency_us, world_size=args.world_size, warmup=args.warmup,
                   iters=args.iters, overhead_iters=args.overhead_iters, seed=args.seed,
                   device=args.device, capacity_scope=args.capacity_scope, plan_dir=Path(args.plan_dir))
    plans = args.plan or list(DEFAULT_PLANS)
    if args.shared_expert:
        out = compare_shared_expert(cfg, args.shared_expert, plans, ratios, **options)
    else:
        out = bench_pipeline(cfg, plans, ratios, **options)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
