// How `ampipe run` combines the ranks' results and checks a plan file against the config.
import { describe, expect, it } from "vitest";
import { calibrationDoc, summarizeRanks, type RankResult } from "../../../src/run/run-block.ts";
import { resolveConfig } from "../../../src/config/index.ts";
import { makePlan } from "../../../src/plan/generators.ts";
import { parseCalibration } from "../../../src/plan/calibration.ts";
import { checkPlanDims, dimsFromConfig } from "../../../src/plan/dims.ts";

const cfg = resolveConfig({
  model: { hidden_size: 32, num_attention_heads: 4, seq_length: 48, num_experts: 4, moe_router_topk: 2, moe_ffn_hidden_size: 32 },
  parallelism: { world_size: 2, expert_model_parallel_size: 2 },
});
const plan = makePlan("grouped", dimsFromConfig(cfg), { boundaries: [0, 24, 48] });

function rank(r: number, o: { diffs?: Record<string, number>; base?: number[]; pipe?: number[]; bound?: number; tol?: number } = {}): RankResult {
  const diffs = o.diffs ?? { y: 1e-7, dx: 2e-7, "grad.w": 3e-7 };
  const tol = o.tol ?? 1e-5;
  const worst = Object.entries(diffs).reduce((a, b) => (b[1] > a[1] ? b : a));
  const base = o.base ?? [10, 11, 12];
  const pipe = o.pipe ?? [8, 9, 10];
  const ops = (list: typeof plan.forward) => Object.fromEntries(list.map((op) => [op.id, 0.5]));
  return {
    rank: r, ep_rank: r, ep_size: 2, world_size: 2, backend: "gloo", device: "cpu", emulated: null,
    precision: "fp32", capacity: "dropless (exact)", replay: { forward: {}, backward: {} }, emulated_delay: null,
    calibration: { plan, op_times_ms: { forward: ops(plan.forward), backward: ops(plan.backward) }, makespan_ms: {} },
    plan: { variant: "grouped", degree: 2, boundaries: [0, 24, 48] }, dims: plan.dims, steps: base.length, warmup: 0, seed: 1,
    equivalence: { largest_relative_differences: diffs, worst: worst as [string, number], tolerance: tol, ok: worst[1] <= tol },
    baseline_ms: 0, pipelined_ms: 0, baseline_samples_ms: base, pipelined_samples_ms: pipe,
    speedup: 0, ideal_bound_ms: o.bound ?? 7, ideal_speedup: 0, overlap_efficiency: null, bound: { bound_ms: o.bound ?? 7 },
    op_times_ms: { forward: ops(plan.forward), backward: ops(plan.backward) },
  };
}

describe("summarizeRanks", () => {
  it("takes the largest difference over ranks and passes within the tolerance", () => {
    const s = summarizeRanks([rank(0), rank(1, { diffs: { y: 5e-6, dx: 1e-8, "grad.w": 0 } })], "fp32");
    expect(s.equivalence.ok).toBe(true);
    expect(s.equivalence.largest_relative_differences).toEqual({ y: 5e-6, dx: 2e-7, "grad.w": 3e-7 });
    expect(s.equivalence.worst).toEqual({ name: "y", value: 5e-6, rank: 1 });
  });

  it("fails when one rank exceeds the tolerance, naming the tensor and the rank", () => {
    const s = summarizeRanks([rank(0), rank(1, { diffs: { y: 1e-7, dx: 1e-7, "grad.w": 2e-3 } })], "fp32");
    expect(s.equivalence.ok).toBe(false);
    expect(s.equivalence.worst).toEqual({ name: "grad.w", value: 2e-3, rank: 1 });
  });

  it("treats a tensor missing on one side (inf) as a failure, stored as null", () => {
    const s = summarizeRanks([rank(0, { diffs: { y: 0, "grad.w": Infinity } }), rank(1)], "fp32");
    expect(s.equivalence.ok).toBe(false);
    expect(s.equivalence.largest_relative_differences["grad.w"]).toBeNull();
    expect(s.equivalence.worst).toMatchObject({ name: "grad.w", value: null, rank: 0 });
    expect(JSON.parse(JSON.stringify(s)).equivalence.largest_relative_differences["grad.w"]).toBeNull();
  });

  it("times each step by its slowest rank, then takes the median", () => {
    const s = summarizeRanks([rank(0, { base: [10, 30, 12], pipe: [8, 20, 9] }), rank(1, { base: [14, 11, 13], pipe: [7, 9, 11], bound: 6 })], "fp32");
    expect(s.timing.steps).toEqual([{ baseline_ms: 14, pipelined_ms: 8 }, { baseline_ms: 30, pipelined_ms: 20 }, { baseline_ms: 13, pipelined_ms: 11 }]);
    expect(s.timing.baseline_ms).toBe(14);
    expect(s.timing.pipelined_ms).toBe(11);
    expect(s.timing.speedup).toBeCloseTo(14 / 11, 12);
    expect(s.timing.ideal_bound_ms).toBe(7); // the slowest rank's bound
    expect(s.timing.ideal_speedup).toBeCloseTo(2, 12);
    expect(s.timing.overlap_efficiency).toBeCloseTo((14 - 11) / (14 - 7), 12);
  });

  it("reports the replayed schedule of the slowest rank, when every rank has one", () => {
    expect(summarizeRanks([{ ...rank(0), simulated_ms: 9 }, { ...rank(1), simulated_ms: 12 }], "fp32").timing.replayed_ms).toBe(12);
    expect(summarizeRanks([{ ...rank(0), simulated_ms: 9 }, rank(1)], "fp32").timing.replayed_ms).toBeNull();
  });

  it("leaves the overlap efficiency undefined when the bound is not below the baseline", () => {
    const s = summarizeRanks([rank(0, { base: [5, 5], pipe: [6, 6], bound: 7 })], "fp32");
    expect(s.timing.overlap_efficiency).toBeNull();
  });
});

describe("checkPlanDims", () => {
  it("accepts the plan made for the config", () => {
    expect(() => checkPlanDims(plan, cfg, "p.json")).not.toThrow();
  });

  it("names every differing field and the config field it comes from", () => {
    const other = makePlan("grouped", { ...plan.dims, hidden_size: 64, expert_model_parallel_size: 1 }, { boundaries: [0, 24, 48] });
    expect(() => checkPlanDims(other, cfg, "p.json")).toThrow(
      /p\.json: the plan does not fit the config's block\n {2}dims\.hidden_size: the plan has 64, the config has 32 \(model\.hidden_size\)\n {2}dims\.expert_model_parallel_size: the plan has 1, the config has 2 \(parallelism\.expert_model_parallel_size\)$/,
    );
  });
});

describe("calibrationDoc", () => {
  it("is one calibration run per rank that the planner parses", () => {
    const doc = calibrationDoc([rank(0), rank(1)], "plan.json", "runs/x", "cpu");
    const data = parseCalibration({ ...doc, runs: (doc.runs as Array<Record<string, unknown>>).map((r) => ({ ...r, plan })) });
    expect(data.runs).toHaveLength(2);
    expect(data.runs[0].opTimesMs.size).toBe(plan.forward.length + plan.backward.length);
    expect(data.makespans.map((m) => m.pass)).toEqual(["total", "total"]);
  });
});
