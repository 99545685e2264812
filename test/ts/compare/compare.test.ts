// `ampipe compare` end to end on two ranks: a 20-step, 1-seed comparison with the control arm
// (compare.json, summary.md, report.html), a rerun keeping the finished seed, a deliberately
// wrong pipelined arm reported outside the envelope, --seeds auto interrupted and resumed to the
// same decision, and the ways it must refuse.
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
const capacityPath = join(dir, "compare-capacity.yaml");
writeFileSync(capacityPath, tinyConfig(dataPrefix).replace("moe_ffn_hidden_size: 32", "moe_ffn_hidden_size: 32\n  moe_expert_capacity_factor: 0.5")
  .replace("variant: interleaved,", "variant: interleaved, capacity_scope: chunk,"));
const json = (p: string) => JSON.parse(readFileSync(p, "utf8"));

describe("ampipe compare", { timeout: 300_000 }, () => {
  const out = join(dir, "cmp");
  it("trains the baseline, the pipelined and the control arm from one initialisation; the envelope, compare.json, summary.md, report.html", async () => {
    const ran = await ampipe(["compare", configPath, "--seeds", "1", "--steps", "12", "--out", out, "--plain", "--set", "train.eval_interval=4"]);
    expect(ran.stderr).toBe("");
    expect(ran.code).toBe(0);
    const c = json(join(out, "compare.json"));
    expect(c.format).toBe("ampipe.compare");
    expect(c.arms_trained).toEqual(["baseline", "pipelined", "control"]); // dropless: the control arm by default
    for (const arm of ["baseline", "pipelined", "control"]) {
      expect(Object.keys(c.arms[arm].final_eval_loss)).toEqual(["3"]);
      expect(c.arms[arm].tokens_per_s["3"]).toBeGreaterThan(0);
      expect(existsSync(join(out, "seed-3", arm, "metrics.jsonl"))).toBe(true);
    }
    // Per step |Δloss| and |Δgrad norm| of both arms against the baseline; the parameter distance at each eval.
    const d = c.divergence["3"];
    for (const k of ["loss", "grad_norm"]) {
      expect(d[k].steps).toEqual([...Array(12).keys()].map((i) => i + 1));
      expect(d[k].pipelined.length).toBe(12);
      expect(d[k].control.length).toBe(12);
    }
    expect(d.param_distance.steps).toEqual([4, 8, 12]);
    expect(d.param_distance.control.every((x: number) => x > 0)).toBe(true); // one ulp away from the start
    // Dropless fp32: the pipelined arm within the envelope of rounding noise.
    expect(c.envelope).toMatchObject({ factor: 10, met: true });
    expect(c.goals.find((g: { goal: string }) => g.goal.startsWith("dropless, seed 3")).met).toBe(true);
    expect(ran.stdout).toMatch(/goal MET: dropless, seed 3: the pipelined arm within the noise envelope \(10x the control's\)/);
    expect(ran.stdout).not.toMatch(/1e-4/); // the old per-step goal is gone
    expect(c.tost).toMatchObject({ margin: 0.01, p_value: null, equivalent: null }); // one seed: not testable
    expect(Object.keys(c.endpoints)).toEqual(["final", "tail_mean", "curve_mean"]);
    expect(c.per_eval.map((e: { step: number }) => e.step)).toEqual([4, 8, 12]);
    const html = readFileSync(join(out, "report.html"), "utf8");
    expect(html).toContain("against the noise envelope (log scale)");
    expect(html).toContain("Eval loss difference pipelined − baseline at each evaluation");
    expect(html).toMatch(/vega-lite/); // the charting library is inlined
    expect(html).not.toMatch(/<script[^>]+src=/); // nothing loaded from elsewhere
    const md = readFileSync(join(out, "summary.md"), "utf8");
    expect(md).toMatch(/cannot be tested with 1 seed/);
    expect(md).toMatch(/\| 3 \| .* \| MET \|/);
  });

  it("keeps a finished seed when rerun with more seeds; tests the whole curve", async () => {
    const ran = await ampipe(["compare", configPath, "--seeds", "2", "--steps", "12", "--out", out, "--plain", "--set", "train.eval_interval=4"]);
    expect(ran.code).toBe(0);
    expect(ran.stdout).toMatch(/kept the finished seed\(s\) 3/);
    const c = json(join(out, "compare.json"));
    expect(c.seeds).toEqual([3, 4]);
    expect(c.tost.p_value).not.toBeNull();
    for (const e of Object.values(c.endpoints) as Array<{ tost: { p_value: number }; decided: string | null; seeds_needed: unknown }>) {
      expect(e.tost.p_value).not.toBeNull();
      if (e.decided === null) expect(e.seeds_needed).not.toBeNull(); // undecided: the seeds that would decide it
    }
    expect(c.per_eval[0].difference.ci95).not.toBeNull();
  });

  it("reports a deliberately wrong pipelined arm (one gradient scaled by 1.01) outside the envelope: MISSED", async () => {
    const wrong = join(dir, "wrong");
    const ran = await ampipe(["compare", configPath, "--seeds", "1", "--steps", "6", "--out", wrong, "--plain", "--set", "train.eval_interval=3"],
      undefined, { AMPIPE_TEST_GRAD_SCALE: "decoder.layers.0.self_attention.linear_qkv.weight=1.01" });
    expect(ran.code).toBe(0);
    expect(ran.stdout).toMatch(/TEST HOOK: gradient of decoder\.layers\.0\.self_attention\.linear_qkv\.weight scaled by 1\.01 in the pipelined arm/);
    expect(ran.stdout).toMatch(/goal MISSED: dropless, seed 3: the pipelined arm within the noise envelope \(10x the control's\): left it at step 1: \|Δgrad norm\|/);
    const c = json(join(wrong, "compare.json"));
    expect(c.envelope.met).toBe(false);
    expect(c.envelope.per_seed["3"].checks.grad_norm.first_outside.step).toBe(1);
    expect(c.fault).toHaveLength(1);
    expect(readFileSync(join(wrong, "report.html"), "utf8")).toContain("TEST HOOK");
  });

  it("--seeds auto interrupted (Ctrl-C) resumes and reaches the uninterrupted run's decision", async () => {
    // Capacity per chunk (different functions) and a margin as narrow as their difference: several looks.
    const args = (o: string, maxSeeds = "4") => ["compare", capacityPath, "--seeds", "auto", "--max-seeds", maxSeeds, "--margin", "0.00001", "--steps", "6", "--out", o, "--plain", "--set", "train.eval_interval=3"];
    const whole = await ampipe(args(join(dir, "auto-whole")));
    expect(whole.stderr).toBe("");
    expect(whole.code).toBe(0);
    expect(whole.stdout).toMatch(/arms: baseline, pipelined \(/); // capacity: no control arm unless asked
    const want = json(join(dir, "auto-whole", "compare.json")).sequential;
    expect(want.design).toMatchObject({ first_look: 3, max_seeds: 4, looks: 2, alpha_per_look: 0.025 });
    expect(["equivalent", "different", "undecided"]).toContain(want.decision);
    // Interrupt during the last seed the uninterrupted run trained, after two of its steps.
    const lastSeed = 3 + want.seeds - 1;
    const cut = join(dir, "auto-cut");
    const metrics = join(cut, `seed-${lastSeed}`, "pipelined", "metrics.jsonl");
    const first = await ampipe(args(cut), (pid) => {
      const timer = setInterval(() => {
        if (!existsSync(metrics) || readFileSync(metrics, "utf8").split("\n").filter((l) => l.includes('"train"')).length < 2) return;
        clearInterval(timer);
        process.kill(pid, "SIGINT");
      }, 50);
    }, { AMPIPE_TEST_COMPARE_PACE_S: "0.3" }); // a round of these tiny steps takes milliseconds: the signal lands mid-seed
    expect(first.code, first.stderr).toBe(130);
    expect(existsSync(join(cut, "compare.json"))).toBe(false);
    const again = await ampipe(args(cut));
    expect(again.code).toBe(0);
    expect(again.stdout).toMatch(new RegExp(`seed ${lastSeed} (baseline|pipelined): resumed from the checkpoint of step \\d`));
    const got = json(join(cut, "compare.json")).sequential;
    expect(got.decision).toBe(want.decision);
    expect(got.seeds).toBe(want.seeds);
    expect(got.looks).toEqual(want.looks); // CPU fp32 and an exact resume: the same numbers
    // Another --max-seeds mid-sequence would change its error rate: refused.
    const changed = await ampipe(args(cut, "5"));
    expect(changed.code).toBe(2);
    expect(changed.stderr).toMatch(/this --seeds auto sequence began with max_seeds 4/);
  });

  it("refuses bad input, naming it (exit 2)", async () => {
    const bad = async (extra: string[], pattern: RegExp, cfg = configPath) => {
      const r = await ampipe(["compare", cfg, "--out", join(dir, `bad-${Math.random().toString(36).slice(2)}`), ...extra]);
      expect(r.code, extra.join(" ")).toBe(2);
      expect(r.stderr).toMatch(pattern);
      expect(r.stdout).not.toMatch(/ranks ready/);
    };
    await bad(["--seeds", "0"], /--seeds: must be an integer >= 1 or auto; got 0/);
    await bad(["--margin", "0"], /--margin: must be > 0/);
    await bad(["--set", "pipeline.degree=1"], /pipeline\.degree is 1: both arms would train the baseline block; nothing to compare/);
    await bad(["--max-seeds", "5"], /--max-seeds: only with --seeds auto/);
    await bad(["--seeds", "auto", "--max-seeds", "2"], /--max-seeds: must be an integer >= 3/);
    await bad(["--tail", "1.5"], /--tail: must be a fraction in \(0, 1\]/);
    await bad(["--envelope-factor", "0.5"], /--envelope-factor: must be >= 1/);
    // The control arm cannot join a seed that ran without it (its divergences were never recorded).
    const noControl = join(dir, "no-control");
    const ran = await ampipe(["compare", configPath, "--seeds", "1", "--steps", "4", "--out", noControl, "--plain", "--no-control", "--set", "train.eval_interval=2"]);
    expect(ran.code).toBe(0);
    expect(json(join(noControl, "compare.json")).arms_trained).toEqual(["baseline", "pipelined"]);
    const added = await ampipe(["compare", configPath, "--seeds", "1", "--steps", "4", "--out", noControl, "--plain", "--set", "train.eval_interval=2"]);
    expect(added.code).toBe(2);
    expect(added.stderr).toMatch(/seed 3 was run without the control arm/);
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
