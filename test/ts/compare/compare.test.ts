// `ampipe compare` end to end: a 20-step, 1-seed comparison on two ranks (its compare.json,
// summary.md and report.html), a rerun keeping the finished seed, and the ways it must refuse.
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { ampipe, tinyConfig, tinyDataset } from "../train/helpers.ts";

const dir = mkdtempSync(join(tmpdir(), "ampipe-compare-test-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
const dataPrefix = tinyDataset(dir);
const configPath = join(dir, "compare.yaml");
writeFileSync(configPath, tinyConfig(dataPrefix));

describe("ampipe compare", { timeout: 240_000 }, () => {
  const out = join(dir, "cmp");
  it("trains both arms from one initialisation and writes compare.json, summary.md and report.html", async () => {
    const ran = await ampipe(["compare", configPath, "--seeds", "1", "--steps", "20", "--out", out, "--plain", "--set", "train.eval_interval=5"]);
    expect(ran.stderr).toBe("");
    expect(ran.code).toBe(0);
    const c = JSON.parse(readFileSync(join(out, "compare.json"), "utf8"));
    expect(c.format).toBe("ampipe.compare");
    expect(Object.keys(c.arms).sort()).toEqual(["baseline", "pipelined"]);
    for (const arm of ["baseline", "pipelined"]) {
      expect(Object.keys(c.arms[arm].final_eval_loss)).toEqual(["3"]);
      expect(c.arms[arm].tokens_per_s["3"]).toBeGreaterThan(0);
      expect(existsSync(join(out, "seed-3", arm, "metrics.jsonl"))).toBe(true);
      expect(existsSync(join(out, "seed-3", arm, "tb"))).toBe(true);
    }
    // Dropless fp32: the arms compute the same function; only rounding separates them.
    expect(c.per_step_max_abs_delta.overall).toBeLessThanOrEqual(1e-4);
    expect(Object.keys(c.per_step_abs_delta["3"]).length).toBe(20);
    expect(c.tost).toMatchObject({ margin: 0.01, p_value: null, equivalent: null }); // one seed: not testable
    expect(typeof c.speedup).toBe("number");
    expect(c.goals.find((g: { goal: string }) => g.goal.startsWith("dropless")).met).toBe(true);
    const html = readFileSync(join(out, "report.html"), "utf8");
    expect(html).toContain("baseline");
    expect(html).toContain("pipelined");
    expect(html).toMatch(/vega-lite/); // the charting library is inlined
    expect(html).not.toMatch(/<script[^>]+src=/); // nothing loaded from elsewhere
    const md = readFileSync(join(out, "summary.md"), "utf8");
    expect(md).toMatch(/cannot be tested with 1 seed/);
    expect(ran.stdout).toMatch(/goal MET: dropless: largest per-step \|Δloss\| <= 1e-4/);
  });

  it("keeps a finished seed when rerun with more seeds", async () => {
    const ran = await ampipe(["compare", configPath, "--seeds", "2", "--steps", "20", "--out", out, "--plain", "--set", "train.eval_interval=5"]);
    expect(ran.code).toBe(0);
    expect(ran.stdout).toMatch(/kept the finished seed\(s\) 3/);
    const c = JSON.parse(readFileSync(join(out, "compare.json"), "utf8"));
    expect(c.seeds).toEqual([3, 4]);
    expect(c.tost.p_value).not.toBeNull();
  });

  it("refuses bad input, naming it (exit 2)", async () => {
    const seeds0 = await ampipe(["compare", configPath, "--seeds", "0", "--out", join(dir, "b1")]);
    expect(seeds0.code).toBe(2);
    expect(seeds0.stderr).toMatch(/--seeds: must be an integer >= 1; got 0/);
    const margin = await ampipe(["compare", configPath, "--margin", "0", "--out", join(dir, "b2")]);
    expect(margin.code).toBe(2);
    expect(margin.stderr).toMatch(/--margin: must be > 0/);
    const same = await ampipe(["compare", configPath, "--set", "pipeline.degree=1", "--out", join(dir, "b3")]);
    expect(same.code).toBe(2);
    expect(same.stderr).toMatch(/pipeline\.degree is 1: both arms would train the baseline block; nothing to compare/);
    for (const r of [seeds0, margin, same]) expect(r.stdout).not.toMatch(/ranks ready/);
  });

  it("with degree auto takes the block ampipe train would, and refuses when that is the baseline, naming why", async () => {
    // 20 ms of emulated latency per all-to-all: the timed candidates lose to the baseline block.
    const slow = ["--set", "pipeline.degree=auto", "--set", "pipeline.variant=auto",
      "--set", "pipeline.emulated_comm={latency_us: 20000, bandwidth_gbps: 100, world_size: 8}"];
    const ran = await ampipe(["compare", configPath, ...slow, "--out", join(dir, "auto"), "--tune-steps", "2", "--tune-candidates", "2"]);
    expect(ran.code).toBe(2);
    expect(ran.stdout).toMatch(/auto: timed 2 training steps per block/);
    expect(ran.stdout).toMatch(/nothing to compare: the measured choice for the pipelined arm is the baseline block \(no plan beats the baseline/);
    expect(JSON.parse(readFileSync(join(dir, "auto", "tune.json"), "utf8")).chosen).toBe("baseline");
    // a rerun keeps that decision, and says so before any rank starts
    const again = await ampipe(["compare", configPath, ...slow, "--out", join(dir, "auto")]);
    expect(again.code).toBe(2);
    expect(again.stderr).toMatch(/the pipelined arm would train the baseline block: baseline \(chosen by timing when the run started; tune\.json\)/);
    expect(again.stdout).not.toMatch(/ranks ready/);
  });
});
