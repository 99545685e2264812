// `ampipe run`'s library: the plan a run executes, what each rank returns (`run_block`'s result,
// typed and checked on receipt), the ranks' results combined, the calibration file and the trace
// of the schedule the ranks replayed. src/commands/run.ts launches the ranks and prints; the bench
// sweep (src/sweep/sweep.ts) runs the same rank command per case.
import { join } from "node:path";
import { z } from "zod";
import { anyNumber, opTimesMs } from "../bridge/index.ts";
import type { ExperimentConfig } from "../config/index.ts";
import { median } from "../plan/calibration.ts";
import { predict } from "../plan/costs.ts";
import { checkPlanDims } from "../plan/dims.ts";
import { costModelFor, planForConfig } from "../plan/for-config.ts";
import { makePlan } from "../plan/generators.ts";
import type { BlockDims, Plan } from "../plan/ir.ts";
import { readPlan, writeFileAtomic, writePlan } from "../plan/io.ts";
import type { PlanChoice } from "../plan/planner.ts";
import { passResult, type PassName } from "../plan/simulate.ts";
import { chromeTrace } from "../plan/trace.ts";

/** The Python module that registers `run_block` on each rank. */
export const RANK_MODULE = "ampipe.pipeline.worker_commands";
export const RESULT_FORMAT = "ampipe.run";

// ---- what a rank returns (run_block_comparison's dict plus the rank's identity) ---------------

const differences = z.record(z.string(), anyNumber); // inf where a tensor was missing on one side

/** `run_block`'s result (py/ampipe/pipeline/worker_commands.py), checked on receipt. */
export const RankResultSchema = z.object({
  rank: z.int(),
  ep_rank: z.int(),
  ep_size: z.int(),
  world_size: z.int(),
  backend: z.string().nullable(),
  device: z.string(),
  emulated: z.string().nullable(),
  /** The autocast dtype both arms ran in (fp32: none), and the routing (dropless or which capacity; exact or not). */
  precision: z.string(),
  capacity: z.string(),
  plan: z.object({ variant: z.string(), degree: z.int(), boundaries: z.array(z.int()) }),
  dims: z.record(z.string(), z.unknown()).transform((d) => d as unknown as BlockDims),
  steps: z.int(),
  warmup: z.int(),
  seed: z.int(),
  equivalence: z.object({
    /** Tensor name -> max|pipelined - baseline| / max|baseline|, largest over the steps. */
    largest_relative_differences: differences,
    worst: z.tuple([z.string(), anyNumber]),
    tolerance: z.number(),
    ok: z.boolean(),
  }),
  baseline_ms: z.number(),
  pipelined_ms: z.number(),
  baseline_samples_ms: z.array(z.number()),
  pipelined_samples_ms: z.array(z.number()),
  speedup: z.number(),
  ideal_bound_ms: z.number(),
  ideal_speedup: z.number(),
  overlap_efficiency: z.number().nullable(),
  bound: z.record(z.string(), z.number()),
  /** The plan's step time with the measured op times and no executor overhead (a replay)... */
  simulated_ms: z.number().optional(),
  /** ... and that replay op by op: {pass: {op id: [start_ms, end_ms]}}. */
  replay: z.object({ forward: z.record(z.string(), z.tuple([z.number(), z.number()])), backward: z.record(z.string(), z.tuple([z.number(), z.number()])) }),
  op_times_ms: opTimesMs,
  /** Per comm kind, measured op time against the emulated delay put on it (null without emulation). */
  emulated_delay: z.record(z.string(), z.record(z.string(), anyNumber)).nullable(),
  /** The planner's calibration input for this rank. */
  calibration: z.object({ plan: z.unknown(), op_times_ms: opTimesMs, makespan_ms: z.record(z.string(), z.number()) }),
});
export type RankResult = z.output<typeof RankResultSchema>;

export interface RunSummary {
  equivalence: {
    ok: boolean;
    tolerance: number;
    dtype: string;
    /** Largest over ranks and steps; null where a tensor was missing on one side (a failure). */
    largest_relative_differences: Record<string, number | null>;
    worst: { name: string; value: number | null; rank: number };
  };
  timing: {
    /** How the ranks' times are combined: each step takes as long as its slowest rank. */
    aggregation: string;
    baseline_ms: number;
    pipelined_ms: number;
    speedup: number;
    ideal_bound_ms: number;
    ideal_speedup: number;
    overlap_efficiency: number | null;
    /** The schedule replayed with the measured op times (slowest rank): pipelined minus this is executor overhead. */
    replayed_ms: number | null;
    steps: Array<{ baseline_ms: number; pipelined_ms: number }>;
    bound: Record<string, number>;
  };
  emulated: string | null;
}

/** Combines the ranks' results: differences are the largest over ranks, times the slowest rank's per step. */
export function summarizeRanks(results: RankResult[], dtype: string): RunSummary {
  if (results.length === 0) throw new Error("no rank returned a result");
  const diffs: Record<string, number | null> = {};
  let worst = { name: "", value: -1 as number | null, rank: 0 };
  for (const r of results) {
    for (const [k, v] of Object.entries(r.equivalence.largest_relative_differences)) {
      // A tensor present on one side only comes back as inf; JSON has no inf, so it becomes null.
      const val = Number.isFinite(v) ? v : null;
      const prev = diffs[k];
      diffs[k] = prev === null || val === null ? null : Math.max(prev ?? 0, val);
      const worse = val === null ? worst.value !== null : worst.value !== null && val > worst.value;
      if (worse) worst = { name: k, value: val, rank: r.rank };
    }
  }
  const tolerance = Math.max(...results.map((r) => r.equivalence.tolerance));
  const ok = results.every((r) => r.equivalence.ok) && Object.values(diffs).every((v) => v !== null && v <= tolerance);

  const n = Math.min(...results.map((r) => Math.min(r.baseline_samples_ms.length, r.pipelined_samples_ms.length)));
  const steps = Array.from({ length: n }, (_, i) => ({
    baseline_ms: Math.max(...results.map((r) => r.baseline_samples_ms[i])),
    pipelined_ms: Math.max(...results.map((r) => r.pipelined_samples_ms[i])),
  }));
  const baseline = median(steps.map((s) => s.baseline_ms));
  const pipelined = median(steps.map((s) => s.pipelined_ms));
  const slowest = results.reduce((a, r) => (r.ideal_bound_ms > a.ideal_bound_ms ? r : a));
  const bound = slowest.ideal_bound_ms;
  return {
    equivalence: { ok, tolerance, dtype, largest_relative_differences: diffs, worst },
    timing: {
      aggregation: "per step, the slowest rank; then the median over the measured steps",
      baseline_ms: baseline,
      pipelined_ms: pipelined,
      speedup: baseline / pipelined,
      ideal_bound_ms: bound,
      ideal_speedup: baseline / bound,
      // (T_baseline - T_pipelined) / (T_baseline - T_bound); undefined when the bound is not below the baseline.
      overlap_efficiency: baseline > bound ? (baseline - pipelined) / (baseline - bound) : null,
      replayed_ms: results.every((r) => typeof r.simulated_ms === "number") ? Math.max(...results.map((r) => r.simulated_ms!)) : null,
      steps,
      bound: slowest.bound,
    },
    emulated: results[0].emulated,
  };
}

// ---- the plan -------------------------------------------------------------------------------

export interface PlannedBlock {
  plan: Plan;
  source: "planner" | string;
  /** The planner's search (its candidates), when the planner made the plan. */
  choice?: PlanChoice;
  planPath: string;
  tracePath: string;
  predicted: { forward_ms: number; backward_ms: number; total_ms: number; sequential_total_ms: number; speedup: number; profile: string; calibrated: boolean };
}

/** Plans the config (or loads `o.plan`, checked against it), writes plan.json and plan.trace.json into outDir. */
export function prepareRunPlan(cfg: ExperimentConfig, o: { plan?: string; calibration?: string }, outDir: string): PlannedBlock {
  const planPath = join(outDir, "plan.json");
  const tracePath = join(outDir, "plan.trace.json");
  if (!o.plan) {
    const r = planForConfig(cfg, { out: planPath, trace: tracePath, calibration: o.calibration });
    const p = r.summary.predicted as PlannedBlock["predicted"];
    return {
      plan: r.choice.plan, source: "planner", choice: r.choice, planPath, tracePath,
      predicted: { forward_ms: p.forward_ms, backward_ms: p.backward_ms, total_ms: p.total_ms, sequential_total_ms: p.sequential_total_ms, speedup: p.speedup, profile: r.model.profile, calibrated: r.model.calibration !== undefined },
    };
  }
  const plan = readPlan(o.plan);
  checkPlanDims(plan, cfg, o.plan);
  const { model } = costModelFor(cfg, o.calibration);
  const sim = predict(model, plan);
  const seq = predict(model, makePlan("sequential", plan.dims, { boundaries: [0, plan.dims.seq_length], chunkQkv: plan.chunk_qkv }));
  writePlan(planPath, plan);
  writeFileAtomic(tracePath, JSON.stringify(chromeTrace(plan, sim)) + "\n");
  return {
    plan, source: o.plan, planPath, tracePath,
    predicted: { forward_ms: sim.forward.makespanMs, backward_ms: sim.backward.makespanMs, total_ms: sim.totalMs, sequential_total_ms: seq.totalMs, speedup: seq.totalMs / sim.totalMs, profile: model.profile, calibrated: model.calibration !== undefined },
  };
}

/** Measured per-op times in the planner's calibration format (docs/plan.md), one run per rank. */
export function calibrationDoc(results: RankResult[], planFile: string, outDir: string, device: string): Record<string, unknown> {
  return {
    format: "ampipe.calibration",
    version: 1,
    device,
    runs: results.map((r) => ({
      plan: planFile,
      op_times_ms: r.op_times_ms,
      makespan_ms: { total: r.pipelined_ms },
      source: `ampipe run ${outDir} rank ${r.rank}${r.emulated ? ` (${r.emulated})` : ""}`,
    })),
  };
}

/**
 * The schedule one rank replayed from its measured op times (`replay` in its result; the ranks
 * own the replay of a measured run), as a Chrome trace. Measured times already include any
 * slowdown from overlap.
 */
export function replayTrace(plan: Plan, r: RankResult, labelPrefix = ""): ReturnType<typeof chromeTrace> {
  const pass = (name: PassName) => {
    const ops = plan[name];
    const span = ops.map((op) => r.replay[name][op.id] ?? [0, 0]);
    return passResult(plan, name, span.map((s) => s[0]), span.map((s) => s[1]), ops.map((op) => r.op_times_ms[name][op.id] ?? 0));
  };
  const forward = pass("forward");
  const backward = pass("backward");
  return chromeTrace(plan, { forward, backward, totalMs: forward.makespanMs + backward.makespanMs },
    `${labelPrefix}measured op times of rank ${r.rank}, replayed`);
}
