// `ampipe bench train` end to end on a tiny config (two CPU ranks, EP 2, emulated comm): a sweep
// interrupted by Ctrl-C and resumed, the fields of results.jsonl, bad input, and the report's chart.
// No speed-up or timing is asserted: only what the command computes from what it measured.
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as vega from "vega";
import { compile } from "vega-lite";
import { afterAll, describe, expect, it, vi } from "vitest";
import { trainBenchCommand, type TrainBenchOptions } from "../../../src/commands/bench/train.ts";
import { reportCommand } from "../../../src/commands/report.ts";
import { bandwidthForRatio, baselineDelayMs } from "../../../src/sweep/emulation.ts";
import { readResults } from "../../../src/sweep/results.ts";
import { breakEven, type TrainBenchCase } from "../../../src/sweep/train.ts";
import { loadConfig } from "../../../src/config/index.ts";
import { buildTrainBenchReport, trainGoals } from "../../../src/report/train-bench.ts";
import { ampipe, tinyConfig, tinyDataset } from "./helpers.ts";

const dir = mkdtempSync(join(tmpdir(), "ampipe-bench-train-test-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
const data = tinyDataset(dir);
const emulated = "emulated_comm: { latency_us: 50, bandwidth_gbps: 1.0, world_size: 8 }";
const config = join(dir, "tiny.yaml");
writeFileSync(config, tinyConfig(data, "bench: { steps: 1, warmup: 0 }").replace("emulated_comm: null", emulated).replace("num_layers: 2", "num_layers: 1"));
const out = join(dir, "sweep");
// comm/compute 1e-6 cannot be emulated (the latency alone exceeds it): those cases fail, the sweep goes on
const args = ["bench", "train", config, "--seq-lengths", "32,48", "--ratios", "0.000001,0.5", "--steps", "1", "--tune-steps", "1", "--tune-candidates", "2", "--out", out];

/** Runs the command in this process; returns its exit code and what it wrote to stderr. */
async function inProcess(cfgPath: string, o: Record<string, unknown>): Promise<{ code: number; stderr: string }> {
  const err = vi.spyOn(process.stderr, "write").mockImplementation(() => true);
  try {
    const code = await trainBenchCommand(cfgPath, { set: [], ...o } as unknown as TrainBenchOptions, { line: () => {} });
    return { code, stderr: err.mock.calls.map((c) => String(c[0])).join("") };
  } finally {
    err.mockRestore();
  }
}

describe("ampipe bench train", () => {
  let first: TrainBenchCase;
  let all: TrainBenchCase[] = [];

  it("records a failing case and goes on; stops on Ctrl-C after the current step, keeping the finished cases (exit 130)", async () => {
    let sent = false;
    const ran = await ampipe(args, (pid, stdout) => {
      const poll = setInterval(() => {
        if (!sent && /^\[2\/4\] s32-r0\.5: /m.test(stdout())) {
          sent = true;
          process.kill(pid, "SIGINT");
        }
        if (sent) clearInterval(poll);
      }, 50);
    });
    expect(sent, ran.stdout + ran.stderr).toBe(true);
    expect(ran.code, ran.stderr).toBe(130);
    expect(ran.stdout).toMatch(/^bench train: 4 case\(s\) \(seq_length 32, 48; comm\/compute 0\.000001, 0\.5\); 4 to run;/m);
    expect(ran.stdout).toMatch(/^\[1\/4\] s32-r0\.000001: FAILED \(recorded; the sweep goes on\): comm\/compute 0\.000001 cannot be emulated at seq_length 32: at 0\.000001 the latency alone \(4 x 50 us\) exceeds/m);
    expect(ran.stdout).toMatch(/^interrupted: 1 of 4 cases finished and kept in .*; rerun the same command to resume$/m);
    const rs = readResults<TrainBenchCase>(join(out, "results.jsonl"));
    expect(rs.map((r) => [r.case, r.status])).toEqual([["s32-r0.000001", "error"], ["s32-r0.5", "ok"]]);
    expect(rs[0].error).toMatch(/cannot be emulated/);
    first = rs[1];
  }, 120_000);

  it("resumes after the finished case (retrying the failed ones), and records baseline, the planner's choice and moe-overlap per case", async () => {
    const ran = await ampipe(args);
    expect(ran.code, ran.stderr).toBe(1); // a case failed
    expect(ran.stdout).toMatch(/; 1 already done in .*, 3 to run;/);
    expect(ran.stdout).not.toMatch(/^s32-r0\.5:/m);
    expect(ran.stdout).toMatch(/^incomplete: 2 case\(s\) failed: s32-r0\.000001 \(comm\/compute 0\.000001 cannot be emulated/m);
    expect(ran.stdout).toMatch(/^s48-r0\.5: emulated 8-way all-to-all \(50 us \+ bytes \/ [\d.e+-]+ GB\/s\), comm\/compute 0\.5 — EMULATED$/m);
    expect(ran.stdout).toMatch(/^s48-r0\.5: auto: timed 1 training steps per block/m);
    expect(ran.stdout).toMatch(/^\[4\/4\] s48-r0\.5: baseline [\d.]+ ms\/step, \d+ tokens\/s; choice /m);
    expect(ran.stdout).toMatch(/wrote .*summary\.md and .*report\.html/);

    const rs = readResults<TrainBenchCase>(join(out, "results.jsonl"));
    expect(rs.map((r) => [r.case, r.status])).toEqual([["s32-r0.5", "ok"], ["s32-r0.000001", "error"], ["s48-r0.000001", "error"], ["s48-r0.5", "ok"]]);
    all = rs.filter((r) => r.status === "ok");
    expect(all[0]).toEqual(first); // kept as it was
    const cfg = loadConfig(config);
    for (const r of all) {
      expect(r.status, r.error ?? "").toBe("ok");
      expect(r.interconnect).toBe("emulated");
      expect(r.emulated).toMatch(/^emulated 8-way all-to-all \(50 us \+ bytes \/ [\d.e+-]+ GB\/s\), comm\/compute 0\.5$/);
      expect([r.latency_us, r.emulated_world_size, r.comm_compute_ratio]).toEqual([50, 8, 0.5]);
      expect(r.tokens_per_step).toBe(8 * r.seq_length);
      // the bandwidth makes the baseline's modelled delay per step r x its MoE layers' time without emulation
      const c = r.compute!;
      const at = { ...cfg, model: { ...cfg.model, seq_length: r.seq_length } };
      const emu = { latency_us: 50, bandwidth_gbps: r.bandwidth_gbps!, world_size: 8 };
      expect(r.bandwidth_gbps).toBeCloseTo(bandwidthForRatio(at, r.seq_length, 0.5, c.moe_layers_ms / c.blocks_per_step, emu), 12);
      expect(r.delay_per_step_ms).toBeCloseTo(0.5 * c.moe_layers_ms, 6);
      expect(r.delay_per_step_ms).toBeCloseTo(c.blocks_per_step * baselineDelayMs(at, emu), 9);
      expect(c.blocks_per_step).toBe(2); // 1 MoE layer x 2 micro-batches per rank

      // the choice is the tuning's, and the arms are measured in the same rounds
      expect(r.tune!.chosen).toBe(r.chosen);
      expect(r.tune!.arms[0].name).toBe("baseline");
      expect(r.tune!.arms.length).toBe(3); // the baseline and --tune-candidates 2
      expect(r.arms.map((a) => a.role)).toEqual(["baseline", "planned", "moe-overlap"]);
      const [base, planned, moe] = r.arms;
      expect(base.speedup).toEqual({ median: 1, q1: 1, q3: 1 });
      expect(moe.variant).toBe("moe-overlap");
      expect(moe.degree).toBeGreaterThanOrEqual(2);
      expect(planned.variant).not.toBe("moe-overlap");
      if (r.chosen !== "baseline") expect(planned.name).toBe(r.chosen);
      else expect(planned.name).toBe(r.tune!.arms.filter((a) => a.name !== "baseline").reduce((a, b) => (b.speedup > a.speedup ? b : a)).name);
      for (const a of r.arms) {
        expect(a.samples_ms).toHaveLength(1);
        expect(a.step_ms.median).toBe(a.samples_ms[0]);
        expect(a.tokens_per_s.median).toBeCloseTo(r.tokens_per_step / (a.samples_ms[0] / 1e3), 6);
        expect(a.speedup.median).toBeCloseTo(base.samples_ms[0] / a.samples_ms[0], 12); // paired, one round
      }
      const chosen = r.arms.find((a) => a.name === r.chosen)!;
      expect(r.speedup).toEqual(chosen.speedup);
      expect(r.moe_overlap_speedup).toEqual(moe.speedup);
      expect(r.chosen_vs_moe_overlap!.median).toBeCloseTo(moe.samples_ms[0] / chosen.samples_ms[0], 12);
      expect(r.beats_baseline).toBe(r.chosen !== "baseline" && r.speedup!.median > 1 + r.noise!);
      // the training-step model predicts the chosen plan (not the baseline: it models plans)
      expect(r.measured_step_ms).toBe(chosen.step_ms.median);
      if (r.chosen === "baseline") expect(r.predicted_step_ms).toBeNull();
      else expect(r.prediction_error).toBeCloseTo(r.predicted_step_ms! / r.measured_step_ms! - 1, 12);
      expect(moe.predicted_step_ms).not.toBeNull();
    }
    expect(JSON.parse(readFileSync(join(out, "plans", "s48-r0.5.moe-overlap.json"), "utf8")).variant).toBe("moe-overlap");
    expect(readFileSync(join(out, "summary.md"), "utf8")).toMatch(/## Break-even[\s\S]*\| 0\.5 \|/);
  }, 120_000);

  it("draws the speed-up against sequence length, one line per schedule per ratio, from the results", async () => {
    const r = buildTrainBenchReport(out);
    const chart = r.doc.sections.flatMap((s) => s.charts ?? []).find((c) => c.title.startsWith("Training speed-up"))!;
    const rows = (chart.spec.data as { values: Array<Record<string, unknown>> }).values;
    const want = all.flatMap((c) => [
      { seq_length: c.seq_length, ratio: "0.5", schedule: "planner's choice", speedup: c.speedup!.median },
      { seq_length: c.seq_length, ratio: "0.5", schedule: "planner's best timed plan", speedup: c.arms[1].speedup.median },
      { seq_length: c.seq_length, ratio: "0.5", schedule: "moe-overlap", speedup: c.arms[2].speedup.median },
    ]);
    expect(rows.map(({ seq_length, ratio, schedule, speedup }) => ({ seq_length, ratio, schedule, speedup }))).toEqual(want);
    expect(chart.caption).toMatch(/EMULATED \(s32-r0\.5: emulated 8-way all-to-all .*comm\/compute 0\.5/);
    // Vega-Lite compiles it and Vega renders it (headless, to SVG) without a warning: a line per schedule
    const warnings: unknown[] = [];
    const logger = { level() { return this; }, warn: (...a: unknown[]) => warnings.push(a), error: (...a: unknown[]) => warnings.push(a), info() {}, debug() {} };
    const spec = compile({ $schema: "https://vega.github.io/schema/vega-lite/v6.json", ...chart.spec } as never, { logger: logger as never }).spec;
    const svg = await new vega.View(vega.parse(spec), { renderer: "none" }).toSVG();
    expect(warnings).toEqual([]);
    // one line per schedule (one ratio), and the legend names each schedule whole
    expect(svg.match(/aria-roledescription="line mark"/g)?.length).toBe(3);
    for (const name of ["planner's choice", "planner's best timed plan", "moe-overlap"]) expect(svg).toContain(`>${name}</text>`);
    expect(reportCommand(out, {}, { line: () => {} })).toBe(0);
    expect(readFileSync(join(out, "report.html"), "utf8")).toContain("ampipe bench train: where does pipelining pay in training?");
  });

  it("refuses bad options and configs with exit 2, naming them, before any rank starts", async () => {
    const bad = async (cfgPath: string, o: Record<string, unknown>, msg: RegExp) => {
      const r = await inProcess(cfgPath, { out: join(dir, "never"), ...o });
      expect(r.code).toBe(2);
      expect(r.stderr).toMatch(msg);
    };
    await bad(config, { seqLengths: "32,0" }, /--seq-lengths: "0" is not an integer >= 2/);
    await bad(config, { seqLengths: "32,32" }, /--seq-lengths: a value is given twice/);
    await bad(config, { ratios: "0.5,x" }, /--ratios: "x" is not a number > 0/);
    await bad(config, { steps: "0" }, /--steps: expected a positive integer, got "0"/);
    await bad(config, { seqLengths: "100000" }, /data\.split: the train split of .* fewer than one sample of model\.seq_length \+ 1 = 100001/);
    await bad(config, { set: ["model.hidden_size=-1"] }, /model\.hidden_size/);
    const real = join(dir, "real.yaml");
    writeFileSync(real, tinyConfig(data));
    await bad(real, { ratios: "0.5" }, /--ratios: needs pipeline\.emulated_comm/);
    // another measuring setting on a finished sweep's directory: refused, naming --out
    const other = await inProcess(config, { out, seqLengths: "32", ratios: "0.5", steps: "2", tuneSteps: "1", tuneCandidates: "2" });
    expect(other.code).toBe(2);
    expect(other.stderr).toMatch(/--out .*: it holds a sweep of another config or other --steps\/--tune-steps\/--tune-candidates/);
    // and from the command line: a bad option exits 2 too (not commander's 1)
    const ran = await ampipe(["bench", "train", config, "--tune-steps", "x", "--out", join(dir, "never")]);
    expect(ran.code).toBe(2);
    expect(ran.stderr).toMatch(/--tune-steps: expected a positive integer, got "x"/);
  }, 60_000);
});

describe("break-even and goals", () => {
  const c = (s: number, chosen: string, choice: number, planned: number, noise = 0.02): TrainBenchCase => ({
    case: `s${s}-r1`, seq_length: s, comm_compute_ratio: 1, status: "ok", beats_baseline: chosen !== "baseline" && choice > 1 + noise, noise, chosen,
    speedup: { median: choice, q1: choice, q3: choice },
    arms: [{ role: "planned", speedup: { median: planned, q1: planned, q3: planned } }],
  }) as unknown as TrainBenchCase;

  it("is the smallest length from which the choice beats the baseline at every longer one, and interpolates the crossing in log2", () => {
    const [b] = breakEven([c(256, "baseline", 1, 0.8), c(512, "g", 1.01, 1.01), c(1024, "g", 1.1, 1.1), c(2048, "g", 1.3, 1.3)]);
    expect(b.seq_length).toBe(1024); // 512 is above 1 but within the noise
    // 0.8 at 256 and 1.01 at 512: 2^(8 + 0.2/0.21)
    expect(b.interpolated).toBeCloseTo(2 ** (8 + 0.2 / 0.21), 9);
    // a dip at a longer length resets it; no crossing when the longest length loses
    const [d] = breakEven([c(256, "g", 1.2, 1.2), c(512, "baseline", 1, 0.97), c(1024, "g", 1.2, 1.2)]);
    expect(d.seq_length).toBe(1024);
    expect(d.interpolated).toBeCloseTo(2 ** (9 + 0.03 / 0.23), 9);
    const [n] = breakEven([c(256, "baseline", 1, 0.9), c(512, "baseline", 1, 0.95)]);
    expect([n.seq_length, n.interpolated]).toEqual([null, null]);
    expect(n.note).toMatch(/no crossing in the sweep/);
    const [all] = breakEven([c(256, "g", 1.2, 1.2), c(512, "g", 1.3, 1.3)]);
    expect([all.seq_length, all.interpolated]).toEqual([256, null]);
    expect(all.note).toMatch(/below the sweep/);
  });

  it("judges the training goals with their numbers, and says which it cannot judge", () => {
    const g = (s: number, choice: number, vsMoe: number, err: number | null) => ({
      ...c(s, "g", choice, choice), chosen_vs_moe_overlap: { median: vsMoe, q1: vsMoe, q3: vsMoe }, prediction_error: err,
    }) as TrainBenchCase;
    const goals = trainGoals([g(512, 0.97, 1, null), g(1024, 1.2, 1.12, 0.05), g(2048, 1.3, 1.05, -0.12)]);
    expect(goals.map((x) => x.met)).toEqual([false, true, true, false, false]);
    expect(goals[0].detail).toBe("lowest s512-r1 0.970x");
    expect(goals[3].detail).toBe("s1024-r1 1.120x, s2048-r1 1.050x");
    expect(goals[4].detail).toBe("s1024-r1 +5.0%, s2048-r1 -12.0%");
    expect(trainGoals([g(256, 1.1, 1.1, null)]).map((x) => x.met)).toEqual([true, null, null, null, null]);
  });
});
