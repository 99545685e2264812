// `ampipe train --profile` and `pipeline.degree: auto` end to end on two CPU ranks (EP 2, gloo):
// the trace and breakdown of both blocks, and the measured choice of the block (kept on resume).
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { root } from "../cli.ts";
import { ampipe, tinyConfig, tinyDataset } from "./helpers.ts";

const dir = mkdtempSync(join(tmpdir(), "ampipe-auto-test-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
const dataPrefix = tinyDataset(dir);
const write = (name: string, text: string) => { const p = join(dir, name); writeFileSync(p, text); return p; };

type Ev = { ph: string; name: string; cat?: string; pid: number | string; tid: number; ts?: number; dur?: number; args?: Record<string, unknown> };

describe("ampipe train --profile and degree auto", { timeout: 240_000 }, () => {
  it("profiles both blocks on every rank: one Chrome trace, the breakdown covering each step", async () => {
    const cfg = write("profile.yaml", tinyConfig(dataPrefix).replace("emulated_comm: null", "emulated_comm: { latency_us: 50, bandwidth_gbps: 1, world_size: 8 }"));
    const out = join(dir, "profile");
    const ran = await ampipe(["train", cfg, "--out", out, "--profile", "1", "--profile-only"]);
    expect(ran.code).toBe(0);
    expect(ran.stdout).toMatch(/profile: 1 step\(s\) of baseline and interleaved P=2 \[0,24,48\]/);
    expect(ran.stdout).toMatch(/\| step \| [\d.]+ \| [\d.]+ \|/);
    expect(existsSync(join(out, "checkpoints"))).toBe(false); // --profile-only trains nothing
    const trace = JSON.parse(readFileSync(join(out, "profile", "trace.json"), "utf8")) as { traceEvents: Ev[] };
    const ev = trace.traceEvents;
    for (const rank of [0, 1]) {
      const mine = ev.filter((e) => e.pid === rank);
      const spans = mine.filter((e) => e.ph === "X");
      // the step's phases outside the blocks, and the blocks' ops, on this rank
      for (const phase of ["forward", "backward", "grad_sync", "clip", "optimizer"])
        expect(spans.some((e) => e.cat === "phase" && e.name === phase), `rank ${rank} ${phase}`).toBe(true);
      expect(spans.some((e) => e.cat === "op" && e.name === "f.attn.0")).toBe(true);
      expect(new Set(spans.filter((e) => e.cat === "arm").map((e) => e.args!.arm))).toEqual(new Set(["baseline", "interleaved P=2 [0,24,48]"]));
      const threads = mine.filter((e) => e.ph === "M" && e.name === "thread_name").map((e) => e.args!.name);
      expect(threads).toContain("compute thread (ampipe-command)");
      expect(threads).toContain("comm stream (modelled)");
      expect(mine.some((e) => e.ph === "M" && e.name === "process_name" && e.args!.name === `rank ${rank}`)).toBe(true);
      // torch.profiler's aten events, merged onto the same clock
      expect(spans.some((e) => e.name.startsWith("aten::"))).toBe(true);
    }
    const bd = JSON.parse(readFileSync(join(out, "profile", "breakdown.json"), "utf8"));
    expect(bd.ranks.map((r: { rank: number }) => r.rank).sort()).toEqual([0, 1]);
    for (const r of bd.ranks)
      for (const arm of bd.arms) {
        const b = r.breakdown[arm];
        expect(b.coverage, `rank ${r.rank} ${arm}`).toBeGreaterThanOrEqual(0.95); // the phases sum to the step within 5%
        expect(b.coverage).toBeLessThanOrEqual(1);
        expect(b.moe_layers).toBeGreaterThan(0);
      }
    expect(readFileSync(join(out, "profile", "breakdown.md"), "utf8")).toMatch(/\| ms per step \| baseline \| interleaved P=2/);
  });

  it("trains the plan the timing chose: the decision, plan.json, the block and the step model", async () => {
    // Step times from the test hook (AMPIPE_TEST_STEP_MS: the steps run, their times are these),
    // so the plumbing is tested without depending on this machine's timing: grouped plans 1.25x.
    const cfg = write("auto.yaml", tinyConfig(dataPrefix)
      .replace("pipeline: { degree: 2, variant: interleaved, emulated_comm: null }", "pipeline: { degree: auto, variant: auto, emulated_comm: null }")
      .replace("steps: 24", "steps: 2").replace("warmup_steps: 2", "warmup_steps: 0"));
    const out = join(dir, "auto");
    const ran = await ampipe(["train", cfg, "--out", out, "--tune-steps", "2", "--tune-candidates", "3"], undefined,
      { AMPIPE_TEST_STEP_MS: "baseline=100,grouped=80,interleaved=95" });
    expect(ran.code).toBe(0);
    expect(ran.stdout).toMatch(/chose grouped P=\d+ \[[\d,]+\]: grouped P=\d+ \[[\d,]+\] is 1\.250x the baseline, above the noise \(±1\.0%\)/);
    expect(ran.stdout).toMatch(/training step model \(.*\): grouped P=\d+ \[[\d,]+\]: [\d.]+ ms predicted, 80\.0 ms measured/);
    const summary = JSON.parse(readFileSync(join(out, "train.json"), "utf8"));
    expect(summary.block.pipelined).toBe(true);
    expect(summary.block.variant).toBe("grouped");
    expect(summary.tune.chosen).toBe(`grouped P=${summary.block.degree} [${summary.block.boundaries.join(",")}]`);
    expect(JSON.parse(readFileSync(join(out, "plan.json"), "utf8")).boundaries).toEqual(summary.block.boundaries);
    expect(existsSync(join(out, "calibration.json"))).toBe(true);
  });

  it("keeps the baseline for the shipped short-sequence config (configs/train-short.yaml)", async () => {
    const out = join(dir, "short");
    const ran = await ampipe(["train", join(root, "configs", "train-short.yaml"), "--out", out, "--steps", "1", "--set", "train.warmup_steps=0", "--tune-steps", "3"]);
    expect(ran.code).toBe(0);
    expect(ran.stdout).toMatch(/chose baseline: no plan beats the baseline by more than the noise/);
    expect(JSON.parse(readFileSync(join(out, "train.json"), "utf8")).block).toEqual({ pipelined: false });
  });

  it("keeps the baseline when a per-op cost makes pipelining lose, says so, and keeps that choice on resume", async () => {
    // 20 ms of emulated latency per all-to-all: a pipelined block issues P times as many.
    const cfg = write("slow-ops.yaml", tinyConfig(dataPrefix)
      .replace("pipeline: { degree: 2, variant: interleaved, emulated_comm: null }",
        "pipeline: { degree: auto, variant: auto, emulated_comm: { latency_us: 20000, bandwidth_gbps: 100, world_size: 8 } }")
      .replace("steps: 24", "steps: 2").replace("checkpoint_interval: 4", "checkpoint_interval: 1"));
    const out = join(dir, "slow-ops");
    const ran = await ampipe(["train", cfg, "--out", out, "--tune-steps", "2", "--tune-candidates", "2"]);
    expect(ran.code).toBe(0);
    expect(ran.stdout).toMatch(/auto: timed 2 training steps per block in ABBA order after 1 warm-up: baseline [\d.]+ ms, /);
    expect(ran.stdout).toMatch(/chose baseline: no plan beats the baseline by more than the noise/);
    const tune = JSON.parse(readFileSync(join(out, "tune.json"), "utf8"));
    expect(tune.chosen).toBe("baseline");
    expect(tune.arms.length).toBe(3);
    expect(JSON.parse(readFileSync(join(out, "train.json"), "utf8")).block).toEqual({ pipelined: false });
    expect(existsSync(join(out, "plan.json"))).toBe(false);
    // a rerun resumes with the block the run started with, without timing again
    const resumed = await ampipe(["train", cfg, "--out", out, "--tune-steps", "2", "--tune-candidates", "2"]);
    expect(resumed.code).toBe(0);
    expect(resumed.stdout).not.toMatch(/auto: timed/);
    expect(resumed.stdout).toMatch(/block: baseline \(chosen by timing when the run started; tune\.json\)/);
    expect(resumed.stdout).toMatch(/resumed from the checkpoint of step 2/);
  });
});
