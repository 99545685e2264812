import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { runPlan } from "../../../src/commands/plan.ts";
import { costModelFor } from "../../../src/plan/for-config.ts";
import { checkPlanDims, dimsFromConfig } from "../../../src/plan/dims.ts";
import { loadConfig } from "../../../src/config/index.ts";
import { predict } from "../../../src/plan/costs.ts";
import { readPlan } from "../../../src/plan/io.ts";
import { makePlan } from "../../../src/plan/generators.ts";

const root = join(import.meta.dirname, "..", "..", "..");
const dir = mkdtempSync(join(tmpdir(), "ampipe-plan-"));
const config = (name: string, pipeline: string, extra = "") => {
  const path = join(dir, name);
  writeFileSync(path, [
    "model:", "  hidden_size: 64", "  num_attention_heads: 4", "  num_query_groups: 2", "  seq_length: 128", "  micro_batch_size: 2",
    "  num_experts: 4", "  moe_router_topk: 2", "  moe_ffn_hidden_size: 128", extra,
    "parallelism:", "  world_size: 2", "  expert_model_parallel_size: 2",
    "pipeline:", pipeline, "run:", `  output_dir: ${join(dir, "run")}`, "",
  ].join("\n"));
  return path;
};

describe("ampipe plan", () => {
  it("converts a config to dims", () => {
    const d = dimsFromConfig(loadConfig(config("dims.yaml", "  degree: auto")));
    expect(d).toEqual({
      seq_length: 128, micro_batch_size: 2, hidden_size: 64, num_attention_heads: 4, num_query_groups: 2, kv_channels: 16,
      num_experts: 4, moe_router_topk: 2, moe_ffn_hidden_size: 128, moe_shared_expert_intermediate_size: null,
      expert_model_parallel_size: 2, dtype: "fp32",
    });
  });

  it("writes a valid plan and a Perfetto trace, and reports the timeline and the speed-up", () => {
    const out = join(dir, "a", "plan.json");
    const r = runPlan(config("a.yaml", "  degree: auto\n  variant: auto"), { out, bandwidthGbps: "0.02" });
    const plan = readPlan(out);
    expect(plan.boundaries).toEqual(r.choice.best.boundaries);
    expect(r.tracePath).toBe(join(dir, "a", "plan.trace.json"));
    const trace = JSON.parse(readFileSync(r.tracePath!, "utf8"));
    expect(trace.traceEvents.filter((e: { ph: string }) => e.ph === "X").length).toBe(plan.forward.length + plan.backward.length + 2);
    expect(r.text).toMatch(/^plan: (grouped|interleaved|sequential), P=\d+/);
    expect(r.text).toMatch(/\n {2}compute \|[a-zA-Z.]+\|\n {2}comm {4}\|[a-zA-Z.]+\|/);
    expect(r.text).toMatch(/speed-up \d+\.\d{3}x/);
    expect(r.choice.best.totalMs).toBeLessThanOrEqual(r.choice.sequential.totalMs);
    // a slow link (0.02 GB/s: ~3 ms per all-to-all, well above the CPU per-op cost) makes it worth hiding
    expect(r.choice.speedup).toBeGreaterThan(1);
    expect((r.summary.predicted as { total_ms: number }).total_ms).toBeCloseTo(predict(r.model, plan).totalMs, 9);
  });

  it("fixed degree and variant from the config, --variant/--degree overrides, --no-trace", () => {
    const path = config("b.yaml", "  degree: 2\n  variant: grouped\n  chunk_qkv: false");
    const r = runPlan(path, { out: join(dir, "b.json"), trace: false });
    expect(r.choice.best.variant).toBe("grouped");
    expect(r.choice.best.boundaries.length).toBe(3);
    expect(r.choice.plan.chunk_qkv).toBe(false);
    expect(r.tracePath).toBeNull();
    const s = runPlan(path, { out: join(dir, "c.json"), variant: "interleaved", degree: "4", trace: false });
    expect(s.choice.best.variant).toBe("interleaved");
    expect(s.choice.best.boundaries.length).toBe(5);
    const b = runPlan(config("d.yaml", "  degree: 3\n  boundaries: [0, 64, 104, 128]"), { out: join(dir, "d.json"), trace: false });
    expect(b.choice.best.boundaries).toEqual([0, 64, 104, 128]);
  });

  it("uses emulated_comm for the interconnect", () => {
    const path = config("e.yaml", "  emulated_comm: { latency_us: 500, bandwidth_gbps: 1, world_size: 4 }");
    const r = runPlan(path, { out: join(dir, "e.json"), trace: false, variant: "sequential" });
    expect(r.model.coefficients.dispatch.b).toBeCloseTo(0.5, 12);
    expect(r.model.work.commWorldSize).toBe(4);
  });

  it("costModelFor: emulated_comm for the interconnect unless an override is given; an unknown profile is named", () => {
    const cfg = loadConfig(config("m.yaml", "  emulated_comm: { latency_us: 500, bandwidth_gbps: 1, world_size: 4 }"));
    const plain = costModelFor(cfg).model;
    expect(plain.coefficients.dispatch.b).toBeCloseTo(0.5, 12);
    expect(plain.coefficients.dispatch.a).toBeCloseTo(1e3 / 1e9, 18);
    const over = costModelFor(cfg, undefined, { latencyUs: 20, overlapSlowdown: 1.5 }).model;
    expect(over.coefficients.dispatch.b).toBeCloseTo(0.02, 12);
    expect(over.coefficients.dispatch.a).toBeCloseTo(1e3 / 1e9, 18);
    expect(over.overlapSlowdown).toBe(1.5);
    expect(() => costModelFor(cfg, undefined, { profile: "tpu" })).toThrow(/--profile: unknown device profile "tpu"/);
  });

  it("checkPlanDims names every dims field that differs, with its config field", () => {
    const cfg = loadConfig(config("k.yaml", "  degree: auto"));
    const plan = makePlan("grouped", { ...dimsFromConfig(cfg), seq_length: 64, expert_model_parallel_size: 1 }, { degree: 2 });
    expect(() => checkPlanDims(makePlan("grouped", dimsFromConfig(cfg), { degree: 2 }), cfg, "p.json")).not.toThrow();
    let message = "";
    try {
      checkPlanDims(plan, cfg, "p.json");
    } catch (e) {
      message = (e as Error).message;
    }
    expect(message.split("\n")).toEqual([
      "p.json: the plan does not fit the config's block",
      "  dims.seq_length: the plan has 64, the config has 128 (model.seq_length)",
      "  dims.expert_model_parallel_size: the plan has 1, the config has 2 (parallelism.expert_model_parallel_size)",
    ]);
    // the capacity scope is the config's too: a plan made for another one is refused
    const seq = makePlan("grouped", dimsFromConfig(cfg), { degree: 2, capacityScope: "sequence" });
    expect(() => checkPlanDims(seq, cfg, "p.json")).toThrow(
      /capacity_scope: the plan has "sequence", the config has "chunk" \(pipeline\.capacity_scope\)/);
    // and the planner writes the config's scope, with route[c] after route[c-1]
    const r = runPlan(config("s.yaml", "  degree: 2\n  capacity_scope: sequence", "  moe_token_drop_policy: position"), { out: join(dir, "s.json"), trace: false });
    expect(r.choice.plan.capacity_scope).toBe("sequence");
  });

  it("--calibration fits the model to an executed plan's op times", () => {
    const dims = dimsFromConfig(loadConfig(config("f.yaml", "  degree: auto")));
    const measured = makePlan("grouped", dims, { degree: 2 });
    const op_times_ms = Object.fromEntries([...measured.forward, ...measured.backward].map((o) => [o.id, o.kind.startsWith("attn") ? 2 + (o.chunk ?? 0) : 0.5]));
    const cal = join(dir, "cal.json");
    writeFileSync(cal, JSON.stringify({ runs: [{ plan: measured, op_times_ms }] }));
    const r = runPlan(join(dir, "f.yaml"), { out: join(dir, "f.json"), trace: false, calibration: cal });
    expect(r.model.calibration?.samples).toBe(measured.forward.length + measured.backward.length);
    expect(r.text).toMatch(/calibrated from \d+ op times/);
    expect(r.text).toMatch(/fit attn +n=2/);
  });

  it("rejects invalid configs and options with errors naming the field", () => {
    const ok = config("h.yaml", "  degree: auto");
    expect(() => runPlan(ok, { set: ["model.num_query_groups=3"] })).toThrow(/model\.num_query_groups/);
    expect(() => runPlan(ok, { set: ["pipeline.boundaries=[0,64,32,128]"] })).toThrow(/pipeline\.boundaries/);
    expect(() => runPlan(ok, { variant: "pipelined" })).toThrow(/--variant: must be one of/);
    expect(() => runPlan(ok, { degree: "0" })).toThrow(/--degree: must be "auto" or an integer/);
    expect(() => runPlan(ok, { profile: "tpu" })).toThrow(/--profile: unknown device profile "tpu"/);
    expect(() => runPlan(ok, { bandwidthGbps: "-1" })).toThrow(/--bandwidth-gbps: must be > 0/);
    expect(() => runPlan(ok, { granularity: "1.5" })).toThrow(/--granularity: must be a positive integer/);
    expect(() => runPlan(ok, { variant: "sequential", degree: "2" })).toThrow(/--degree: the sequential variant has one chunk/);
    expect(() => runPlan(ok, { calibration: join(dir, "missing.json") })).toThrow(/--calibration .*missing\.json: cannot read/);
  });

  it("runs from the command line (--json) and exits 2 with the field named on a bad config", () => {
    const out = join(dir, "cli.json");
    const r = spawnSync(process.execPath, [join(root, "bin", "ampipe.js"), "plan", config("cli.yaml", "  degree: auto"), "--out", out, "--json", "--no-trace"], { encoding: "utf8" });
    expect(r.stderr).toBe("");
    expect(r.status).toBe(0);
    const summary = JSON.parse(r.stdout);
    expect(summary).toMatchObject({ plan: out, trace: null, profile: "cpu" });
    expect(summary.predicted.speedup).toBeGreaterThanOrEqual(1);
    const bad = spawnSync(process.execPath, [join(root, "bin", "ampipe.js"), "plan", config("bad.yaml", "  degree: 500")], { encoding: "utf8" });
    expect(bad.status).toBe(2);
    expect(bad.stderr).toMatch(/pipeline\.degree/);
  });
});
