// `ampipe bench` end to end on a tiny config (two ranks, EP=2 over gloo, emulated comm): the
// files of a sweep, resume after Ctrl-C and kill -9, and a case whose rank dies mid-sweep.
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { parseCalibration } from "../../../src/plan/calibration.ts";
import { readResults } from "../../../src/sweep/results.ts";
import { processesWithEnv } from "../processes.ts";

const root = join(import.meta.dirname, "..", "..", "..");
const dir = mkdtempSync(join(tmpdir(), "ampipe-bench-test-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const config = (seqLengths: number[]) => `
model: { num_layers: 1, hidden_size: 32, num_attention_heads: 4, seq_length: 64, micro_batch_size: 2, vocab_size: 64,
         ffn_hidden_size: 64, num_experts: 4, moe_router_topk: 2, moe_ffn_hidden_size: 32 }
parallelism: { world_size: 2, expert_model_parallel_size: 2, device: cpu, backend: gloo }
pipeline: { emulated_comm: { latency_us: 50, bandwidth_gbps: 1.0, world_size: 8 } }
run: { seed: 5, output_dir: ${JSON.stringify(join(dir, "unused"))} }
bench: { seq_lengths: ${JSON.stringify(seqLengths)}, comm_compute_ratios: [0.5], variants: [grouped], degrees: [2],
         moe_overlap_degrees: [2], planner: true, steps: 2, warmup: 0 }
`;
const small = join(dir, "small.yaml");
writeFileSync(small, config([48]));
const longer = join(dir, "longer.yaml");
writeFileSync(longer, config([32, 48]));

interface Ran { code: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string; pid: number }

function ampipe(args: string[], onLine?: (line: string, pid: number, kill: (s: NodeJS.Signals) => void) => void): Promise<Ran> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [join(root, "bin", "ampipe.js"), ...args], { cwd: root, stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    let partial = "";
    child.stdout.setEncoding("utf8").on("data", (d: string) => {
      stdout += d;
      const lines = (partial + d).split("\n");
      partial = lines.pop()!;
      for (const l of lines) onLine?.(l, child.pid!, (s) => child.kill(s));
    });
    child.stderr.setEncoding("utf8").on("data", (d: string) => (stderr += d));
    child.on("error", reject);
    child.on("close", (code, signal) => resolve({ code, signal, stdout, stderr, pid: child.pid! }));
  });
}

const ranksOf = (pid: number) => processesWithEnv(`AMPIPE_PARENT_PID=${pid}`);
async function noRanksLeft(pid: number): Promise<number[]> {
  for (let i = 0; i < 50 && ranksOf(pid).length; i++) await new Promise((r) => setTimeout(r, 100));
  return ranksOf(pid);
}

describe("ampipe bench", () => {
  const out = join(dir, "sweep");

  it("calibrates, runs every case against the sequential block and writes results, calibration and traces", async () => {
    const ran = await ampipe(["bench", small, "--out", out]);
    expect(ran.code, ran.stderr).toBe(0);
    expect(ran.stdout).toMatch(/^bench: 3 cases over 1 group \(seq_length 48; comm\/compute 0\.5\); 3 to run; 2 steps each/m);
    expect(ran.stdout).toMatch(/s48-r0\.5: compute [\d.]+ ms, emulated 8-way all-to-all .* — EMULATED/);
    expect(ran.stdout).toMatch(/^\[1\/3\] s48-r0\.5-moe-overlap-p2: [\d.]+ ms, [\d.]+x vs sequential/m);
    expect(ran.stdout).toMatch(/^\[3\/3\] s48-r0\.5-planner: /m);
    expect(ran.stdout).toMatch(/report: ampipe report /);
    expect(ranksOf(ran.pid)).toEqual([]);

    const rs = readResults(join(out, "results.jsonl"));
    expect(rs.map((r) => r.case)).toEqual(["s48-r0.5-moe-overlap-p2", "s48-r0.5-grouped-p2", "s48-r0.5-planner"]);
    for (const r of rs) {
      expect(r.status).toBe("ok");
      for (const k of ["seq_length", "variant", "degree", "boundaries", "measured_ms", "predicted_ms", "baseline_ms", "speedup", "speedup_vs_moe_overlap", "overlap_efficiency", "emulated"])
        expect(r, k).toHaveProperty(k);
      expect(r.interconnect).toBe("emulated");
      expect(r.emulated).toMatch(/^emulated 8-way all-to-all \(50 us \+ bytes \/ [\d.e+-]+ GB\/s\)$/); // %g: 0.0312, 9.99e-05
      expect(r.equivalence_ok).toBe(true);
      expect(r.samples).toHaveLength(2);
      expect(r.speedup).toBeCloseTo([...r.samples.map((s) => s.baseline_ms / s.pipelined_ms)].reduce((a, b) => a + b) / 2, 10); // median of 2
      expect(existsSync(join(out, r.trace!))).toBe(true);
    }
    expect(rs[0].variant).toBe("moe-overlap");
    expect(rs[0].speedup_vs_moe_overlap).toBe(1);
    expect(rs[1].speedup_vs_moe_overlap).toBeCloseTo(rs[1].speedup! / rs[0].speedup!, 10);
    const csv = readFileSync(join(out, "results.csv"), "utf8").trim().split("\n");
    expect(csv).toHaveLength(4);
    // calibration.json is a calibration file the planner reads (ampipe plan --calibration)
    const cal = JSON.parse(readFileSync(join(out, "calibration.json"), "utf8"));
    expect(cal.format).toBe("ampipe.calibration");
    expect(parseCalibration(cal).runs).toHaveLength(4); // sequential and grouped P=2, two ranks each
    expect(readdirSync(out).filter((f) => f.includes(".tmp-"))).toEqual([]);

    const again = await ampipe(["bench", small, "--out", out]);
    expect(again.code, again.stderr).toBe(0);
    expect(again.stdout).toContain("3 already done in");
    expect(again.stdout).toContain("0 to run");
    expect(readFileSync(join(out, "results.jsonl"), "utf8").trim().split("\n")).toHaveLength(3);

    const rep = await ampipe(["report", out]);
    expect(rep.code, rep.stderr).toBe(0);
    expect(rep.stdout).toMatch(/wrote .*summary\.md and .*report\.html \(opens offline\)\n.*speed-up of the planner's choice.*\n.*prediction after calibration.*\n.*3 of 3 cases finished/);
  }, 180_000);

  it("refuses to resume a directory made from another config", async () => {
    const ran = await ampipe(["bench", small, "--out", out, "--set", "bench.steps=3"]);
    expect(ran.code).toBe(2);
    expect(ran.stderr).toMatch(/holds a sweep of another config or grid/);
  });

  it("keeps finished cases through Ctrl-C and kill -9, and a rerun resumes after them", async () => {
    const o = join(dir, "interrupted");
    const first = await ampipe(["bench", longer, "--out", o], (line, _pid, kill) => { if (line.startsWith("[2/6]")) kill("SIGINT"); });
    expect(first.code).toBe(130);
    expect(first.stdout).toMatch(/interrupted: \d of 6 cases finished and kept in .*; rerun the same command to resume/);
    expect(first.stderr).toContain("SIGINT: stopping");
    expect(await noRanksLeft(first.pid)).toEqual([]);
    const afterInt = readResults(join(o, "results.jsonl"));
    expect(afterInt.length).toBeGreaterThanOrEqual(2);

    const second = await ampipe(["bench", longer, "--out", o], (line, _pid, kill) => { if (/^\[4\/6\]/.test(line)) kill("SIGKILL"); });
    expect(second.signal).toBe("SIGKILL");
    expect(second.stdout).toContain(`${afterInt.length} already done`);
    expect(await noRanksLeft(second.pid)).toEqual([]); // the ranks notice their controller is gone
    const afterKill = readResults(join(o, "results.jsonl"));
    expect(afterKill.length).toBeGreaterThanOrEqual(4);

    const third = await ampipe(["bench", longer, "--out", o]);
    expect(third.code, third.stderr).toBe(0);
    expect(third.stdout).toContain(`${afterKill.length} already done`);
    const final = readResults(join(o, "results.jsonl"));
    expect(final.map((r) => r.case)).toHaveLength(6);
    expect(final.every((r) => r.status === "ok")).toBe(true);
    // each finished case ran once: no line was written twice
    expect(readFileSync(join(o, "results.jsonl"), "utf8").trim().split("\n")).toHaveLength(6);
  }, 300_000);

  it("records a case whose rank dies, restarts the ranks and goes on", async () => {
    const o = join(dir, "rank-killed");
    let victim = 0;
    const ran = await ampipe(["bench", longer, "--out", o, "--cases", "4"], (line, pid) => {
      if (line.startsWith("[1/4]") && !victim) {
        victim = ranksOf(pid)[0];
        process.kill(victim, "SIGKILL");
      }
    });
    expect(victim).toBeGreaterThan(0);
    expect(ran.code).toBe(1);
    const rs = readResults(join(o, "results.jsonl"));
    expect(rs).toHaveLength(4);
    const failed = rs.filter((r) => r.status === "error");
    expect(failed).toHaveLength(1);
    expect(failed[0].error).toMatch(new RegExp(`rank failure: rank \\d \\(pid ${victim}\\) was killed by SIGKILL`));
    expect(ran.stdout).toMatch(/FAILED: rank failure/);
    expect(ran.stdout).toMatch(/1 case\(s\) failed: s\S+ \(errors in results\.jsonl; rerun to retry them\)/);
    expect(rs.filter((r) => r.status === "ok").length).toBe(3); // the cases after it ran on fresh ranks
    expect(await noRanksLeft(ran.pid)).toEqual([]);
  }, 300_000);
});
