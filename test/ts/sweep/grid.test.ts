// The bench grid, the emulated bandwidth per ratio, and results.jsonl (resume input) — no ranks.
import { appendFileSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { resolveConfig } from "../../../src/config/index.ts";
import { benchSettings, expandGrid, withModel } from "../../../src/sweep/grid.ts";
import { appendResult, readResults, referenceMoeOverlap, resultsCsv, type CaseResult } from "../../../src/sweep/results.ts";
import { bandwidthForRatio } from "../../../src/sweep/emulation.ts";

const dir = mkdtempSync(join(tmpdir(), "ampipe-grid-test-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const config = (bench: Record<string, unknown>, extra: Record<string, unknown> = {}) =>
  resolveConfig({ model: { seq_length: 256, hidden_size: 64, num_attention_heads: 4 }, pipeline: { emulated_comm: { latency_us: 10, bandwidth_gbps: 1, world_size: 8 } }, bench, ...extra });

describe("bench grid", () => {
  it("runs moe-overlap first, then each variant at each degree, then the planner, per (sequence length, ratio)", () => {
    const cfg = config({ seq_lengths: [128, 256], comm_compute_ratios: [0.5, 1], degrees: [4, 2], moe_overlap_degrees: [2] });
    const ids = expandGrid(benchSettings(cfg, false)).map((c) => c.id);
    expect(ids.slice(0, 6)).toEqual([
      "s128-r0.5-moe-overlap-p2", "s128-r0.5-grouped-p2", "s128-r0.5-grouped-p4", "s128-r0.5-interleaved-p2", "s128-r0.5-interleaved-p4", "s128-r0.5-planner",
    ]);
    expect(ids).toHaveLength(4 * 6);
    expect(new Set(ids).size).toBe(ids.length);
    expect(ids[6]).toBe("s128-r1-moe-overlap-p2");
  });

  it("defaults to the model's sequence length and the configured interconnect; the quick slice replaces fields", () => {
    const cfg = config({ degrees: [2], moe_overlap_degrees: [], planner: false, quick: { variants: ["grouped"], steps: 2 } });
    expect(expandGrid(benchSettings(cfg, false)).map((c) => c.id)).toEqual(["s256-grouped-p2", "s256-interleaved-p2"]);
    const quick = benchSettings(cfg, true);
    expect(quick.steps).toBe(2);
    expect(expandGrid(quick).map((c) => c.id)).toEqual(["s256-grouped-p2"]);
    expect(() => benchSettings(config({}), true)).toThrow(/--quick: the config has no bench.quick section/);
  });

  it("names the field of a bad bench section", () => {
    expect(() => config({ seq_lengths: [64, 128], degrees: [2, 100] })).toThrow(/bench\.degrees: 100 exceeds the shortest sequence length \(64\)/);
    expect(() => resolveConfig({ bench: { comm_compute_ratios: [0.5] } })).toThrow(/bench\.comm_compute_ratios: needs pipeline\.emulated_comm/);
    expect(() => config({ variants: ["moe-overlap"] })).toThrow(/bench\.variants/);
    expect(() => config({ quick: { degree: 2 } })).toThrow(/bench\.quick/);
  });

  it("sweeps bench.models, re-resolving derived fields and rejecting a model that breaks an invariant", () => {
    const cfg = config({ models: [{ name: "wide", hidden_size: 128, num_attention_heads: 8 }, { name: "top1", moe_router_topk: 1 }], degrees: [2], moe_overlap_degrees: [], planner: false, variants: ["grouped"] });
    const cases = expandGrid(benchSettings(cfg, false));
    expect(cases.map((c) => c.id)).toEqual(["wide-s256-grouped-p2", "top1-s256-grouped-p2"]);
    const wide = withModel(cfg, cases[0].group.model, 256);
    expect(wide.model.hidden_size).toBe(128);
    expect(wide.model.kv_channels).toBe(16);
    expect(wide.model.num_query_groups).toBe(8);
    const bad = config({ models: [{ name: "odd", num_experts: 3 }] });
    expect(() => benchSettings(bad, false)).toThrow(/bench\.models\[0\] \(odd\) at seq_length 256: model\.num_experts: must be divisible/);
  });

  it("sets the emulated bandwidth so that the four all-to-alls of the sequential block take ratio x compute", () => {
    const cfg = config({});
    const emu = { latency_us: 10, bandwidth_gbps: 1, world_size: 8 };
    const bw = bandwidthForRatio(cfg, 256, 0.5, 20, emu);
    // by hand: 256 tokens x 2 sequences x top-2 x 64 hidden x 4 bytes, 7/8 of it on the wire, 4 times
    const wire = 4 * (256 * 2 * 2 * 64 * 4) * (7 / 8);
    const delayS = 4 * 10e-6 + wire / (bw * 1e9);
    expect(delayS).toBeCloseTo(0.5 * 20e-3, 12);
    expect(() => bandwidthForRatio(cfg, 256, 0.001, 1, { ...emu, latency_us: 100 })).toThrow(/latency alone/);
  });
});

const result = (over: Partial<CaseResult>): CaseResult => ({
  case: "s1-grouped-p2", group: "s1", model: null, seq_length: 1, comm_compute_ratio: null, comm_compute_measured: null, source: "grid", variant: "grouped", degree: 2, boundaries: [0, 1],
  status: "ok", error: null, interconnect: "real", emulated: null, bandwidth_gbps: null, measured_ms: 1, measured_q1_ms: 1, measured_q3_ms: 1,
  baseline_ms: 2, baseline_q1_ms: 2, baseline_q3_ms: 2, predicted_ms: 1, predicted_baseline_ms: 2, prediction_error: 0, speedup: 2, speedup_q1: 2, speedup_q3: 2,
  speedup_vs_moe_overlap: null, moe_overlap_reference: null, overlap_efficiency: null, ideal_bound_ms: null, replayed_ms: null, equivalence_ok: true,
  largest_relative_difference: 0, steps: 1, trace: null, samples: [], elapsed_s: 0, finished: "", ...over,
});

describe("results.jsonl", () => {
  it("keeps the last record of a case and cuts a torn last line off the file", () => {
    const path = join(dir, "results.jsonl");
    appendResult(path, result({ case: "a", status: "error", error: "boom" }));
    appendResult(path, result({ case: "b" }));
    appendResult(path, result({ case: "a" }));
    appendFileSync(path, '{"case": "c", "stat'); // kill -9 mid-write
    const rs = readResults(path);
    expect(rs.map((r) => [r.case, r.status])).toEqual([["b", "ok"], ["a", "ok"]]);
    expect(readFileSync(path, "utf8").endsWith("}\n")).toBe(true);
    appendResult(path, result({ case: "c" }));
    expect(readResults(path).map((r) => r.case)).toEqual(["b", "a", "c"]);
  });

  it("rejects a corrupt line that is not the last", () => {
    const path = join(dir, "corrupt.jsonl");
    writeFileSync(path, "not json\n" + JSON.stringify(result({})) + "\n");
    expect(() => readResults(path)).toThrow(/line 1 is not JSON/);
  });

  it("relates each case to the best moe-overlap case of its group", () => {
    const rs = referenceMoeOverlap([
      result({ case: "m2", source: "moe-overlap", variant: "moe-overlap", speedup: 1.1 }),
      result({ case: "m4", source: "moe-overlap", variant: "moe-overlap", speedup: 1.2 }),
      result({ case: "g", speedup: 1.5 }),
      result({ case: "other", group: "s2", speedup: 1.5 }),
    ]);
    expect(rs.map((r) => r.moe_overlap_reference)).toEqual(["m4", "m4", "m4", null]);
    expect(rs[2].speedup_vs_moe_overlap).toBeCloseTo(1.25, 12);
    expect(rs[0].speedup_vs_moe_overlap).toBeCloseTo(1.1 / 1.2, 12);
    expect(rs[3].speedup_vs_moe_overlap).toBeNull();
  });

  it("writes CSV with a header and quoted cells", () => {
    const csv = resultsCsv([result({ case: "x", status: "error", error: 'rank 0: "bad", really\nsecond line', boundaries: [0, 4, 8] })]).split("\n");
    expect(csv[0].startsWith("case,group,model,seq_length,")).toBe(true);
    expect(csv[1]).toContain(",0 4 8,");
    expect(csv[1]).toContain('"rank 0: ""bad"", really');
  });
});

describe("the committed bench configs", () => {
  const root = join(import.meta.dirname, "..", "..", "..");
  it("resolve, with the grids their comments describe", async () => {
    const { loadConfig } = await import("../../../src/config/index.ts");
    const paper = loadConfig(join(root, "configs", "bench-paper.yaml"));
    expect(paper.parallelism.device).toBe("cuda");
    expect(paper.pipeline.emulated_comm).toBeNull();
    expect(expandGrid(benchSettings(paper, false))).toHaveLength(250);
    const cpu = loadConfig(join(root, "configs", "bench-cpu.yaml"));
    expect(expandGrid(benchSettings(cpu, false))).toHaveLength(42);
    const def = loadConfig(join(root, "configs", "default.yaml"));
    expect(expandGrid(benchSettings(def, true)).map((c) => c.id)).toEqual([
      "s1024-r0.75-moe-overlap-p2", "s1024-r0.75-grouped-p2", "s1024-r0.75-interleaved-p2", "s1024-r0.75-planner",
    ]);
  });
});

describe("the sequential block's emulated delay", () => {
  it("is what bandwidthForRatio budgeted: ratio x compute", async () => {
    const { baselineDelayMs } = await import("../../../src/sweep/emulation.ts");
    const cfg = config({});
    const emu = { latency_us: 10, bandwidth_gbps: 1, world_size: 8 };
    const bw = bandwidthForRatio(cfg, 256, 0.75, 40, emu);
    expect(baselineDelayMs(cfg, { ...emu, bandwidth_gbps: bw })).toBeCloseTo(0.75 * 40, 9);
  });
});
