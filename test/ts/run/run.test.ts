// `ampipe run` end to end on a tiny config: two ranks (EP=2 over gloo), the planner, the
// rank command run_block, result.json and calibration.json; and the ways it must fail.
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { createServer, type AddressInfo } from "node:net";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { runPlan } from "../../../src/commands/plan.ts";
import { ampipe, type Ran } from "../cli.ts";
import { processesWithEnv } from "../processes.ts";

const dir = mkdtempSync(join(tmpdir(), "ampipe-run-test-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const CONFIG = `
model:
  num_layers: 1
  hidden_size: 32
  num_attention_heads: 4
  seq_length: 48
  micro_batch_size: 2
  vocab_size: 64
  ffn_hidden_size: 64
  num_experts: 4
  moe_router_topk: 2
  moe_ffn_hidden_size: 32
parallelism:
  world_size: 2
  expert_model_parallel_size: 2
  device: cpu
  backend: gloo
pipeline:
  degree: 2
  variant: interleaved
  emulated_comm: { latency_us: 50, bandwidth_gbps: 1.0, world_size: 8 }
run:
  steps: 2
  warmup: 0
  seed: 5
  output_dir: ${JSON.stringify(join(dir, "unused"))}
`;
const configPath = join(dir, "tiny.yaml");
writeFileSync(configPath, CONFIG);

/** Live processes started by the CLI with this pid (ranks carry AMPIPE_PARENT_PID). */
const ranksOf = (pid: number): number[] => processesWithEnv(`AMPIPE_PARENT_PID=${pid}`);

describe("ampipe run", () => {
  const outDir = join(dir, "run-ok");
  let first: Ran;

  it("plans, runs both blocks on two ranks, prints PASS and writes result.json", async () => {
    first = await ampipe(["run", configPath, "--out", outDir]);
    expect(first.code, first.stderr).toBe(0);
    expect(first.stdout).toMatch(/^plan: interleaved, P=2, boundaries \[0, \d+, 48\] \(planned\)/m);
    expect(first.stdout).toMatch(/2 ranks ready .*gloo on cpu; expert-parallel size 2/);
    expect(first.stdout).toMatch(/step 2\/2: baseline [\d.]+ ms, pipelined [\d.]+ ms/);
    expect(first.stdout).toMatch(/^equivalence .*tolerance 1e-5 for fp32\): PASS$/m);
    expect(first.stdout).toContain("emulated 8-way all-to-all");
    expect(first.stdout).toContain("EMULATED figures");
    expect(first.stdout).toMatch(/overlap efficiency/);
    expect(ranksOf(first.pid)).toEqual([]);

    for (const f of ["plan.json", "plan.trace.json", "result.json", "calibration.json", "measured.trace.json"])
      expect(existsSync(join(outDir, f)), f).toBe(true);
    expect(readdirSync(outDir).filter((f) => f.includes(".tmp-"))).toEqual([]); // atomic writes left no temp file

    const r = JSON.parse(readFileSync(join(outDir, "result.json"), "utf8"));
    expect(r.format).toBe("ampipe.run");
    expect(r.version).toBe(1);
    expect(r.config.model.hidden_size).toBe(32);
    expect(r.config.run.output_dir).toBe(outDir);
    expect(r.plan).toMatchObject({ path: "plan.json", source: "planner", variant: "interleaved", degree: 2 });
    expect(r.world_size).toBe(2);
    expect(r.expert_model_parallel_size).toBe(2);
    expect(r.device).toBe("cpu");
    expect(r.emulated).toMatch(/^emulated 8-way all-to-all \(50 us \+ bytes \/ 1 GB\/s\)$/);
    expect(r.equivalence.ok).toBe(true);
    expect(r.equivalence.tolerance).toBe(1e-5);
    const diffs = r.equivalence.largest_relative_differences as Record<string, number>;
    for (const k of ["y", "dx", "aux_loss", "z_loss"]) expect(diffs[k]).toBeLessThanOrEqual(1e-5);
    expect(Object.keys(diffs).filter((k) => k.startsWith("grad.")).length).toBeGreaterThan(5);
    expect(r.timing.steps).toHaveLength(2);
    for (const k of ["baseline_ms", "pipelined_ms", "ideal_bound_ms", "speedup", "ideal_speedup"]) expect(r.timing[k]).toBeGreaterThan(0);
    expect(r.timing.speedup).toBeCloseTo(r.timing.baseline_ms / r.timing.pipelined_ms, 10);
    expect(r.predicted.total_ms).toBeGreaterThan(0);
    expect(r.predicted.sequential_total_ms).toBeGreaterThan(0);
    expect(r.ranks.map((x: { rank: number; ep_rank: number }) => [x.rank, x.ep_rank])).toEqual([[0, 0], [1, 1]]);
    const plan = JSON.parse(readFileSync(join(outDir, "plan.json"), "utf8"));
    expect(Object.keys(r.ranks[0].op_times_ms.forward).sort()).toEqual(plan.forward.map((o: { id: string }) => o.id).sort());
  });

  it("writes calibration.json in the format the planner accepts", () => {
    const cal = JSON.parse(readFileSync(join(outDir, "calibration.json"), "utf8"));
    expect(cal.format).toBe("ampipe.calibration");
    expect(cal.runs).toHaveLength(2);
    const replanned = runPlan(configPath, { calibration: join(outDir, "calibration.json"), out: join(dir, "replanned.json"), trace: false });
    expect(replanned.model.calibration?.source).toBe(join(outDir, "calibration.json"));
    expect(replanned.calibration!.kinds.map((k) => k.kind)).toContain("attn_bwd");
    expect(replanned.calibration!.makespans.length).toBeGreaterThan(0); // the measured totals were read
  });

  it("executes a given plan file and prints result.json with --json", async () => {
    const ran = await ampipe(["run", configPath, "--plan", join(outDir, "plan.json"), "--out", join(dir, "run-plan"), "--json", "--steps", "1"]);
    expect(ran.code, ran.stderr).toBe(0);
    const r = JSON.parse(ran.stdout);
    expect(r.plan.source).toBe(join(outDir, "plan.json"));
    expect(r.steps).toBe(1);
    expect(r.equivalence.ok).toBe(true);
    expect(JSON.parse(readFileSync(join(dir, "run-plan", "result.json"), "utf8"))).toEqual(r);
  });

  it("rejects a plan made for another block, naming the field, before starting ranks", async () => {
    const other = join(dir, "other-plan.json");
    runPlan(configPath, { set: ["model.hidden_size=64"], out: other, trace: false });
    const ran = await ampipe(["run", configPath, "--plan", other, "--out", join(dir, "run-bad")]);
    expect(ran.code).toBe(2);
    expect(ran.stderr).toContain("the plan does not fit the config's block");
    expect(ran.stderr).toMatch(/dims\.hidden_size: the plan has 64, the config has 32 \(model\.hidden_size\)/);
    expect(ran.stdout).not.toContain("ranks ready");
    expect(existsSync(join(dir, "run-bad", "result.json"))).toBe(false);
    expect(ranksOf(ran.pid)).toEqual([]);
  });

  it("reports a config error naming the field", async () => {
    const ran = await ampipe(["run", configPath, "--set", "model.moe_router_topk=9", "--out", join(dir, "run-cfg")]);
    expect(ran.code).toBe(2);
    expect(ran.stderr).toMatch(/model\.moe_router_topk/);
  });

  it("rejects a non-loopback --bind in one line before writing the plan or starting a rank", async () => {
    const out = join(dir, "run-bind");
    const ran = await ampipe(["run", configPath, "--bind", "tcp://10.0.0.1:0", "--out", out]);
    expect(ran.code).toBe(2);
    expect(ran.stderr).toMatch(/^ampipe run: --bind: refusing to bind tcp:\/\/10\.0\.0\.1:0: it is not a loopback address.*--allow-remote.*\n$/);
    expect(ran.stderr.trimEnd().split("\n")).toHaveLength(1);
    expect(ran.stdout).toBe("");
    expect(existsSync(out)).toBe(false);
    expect(ranksOf(ran.pid)).toEqual([]);
  });

  it("rejects a heartbeat timeout that does not exceed the interval, naming both options", async () => {
    const out = join(dir, "run-heartbeat");
    const ran = await ampipe(["run", configPath, "--heartbeat-interval", "2000", "--heartbeat-timeout", "2000", "--out", out]);
    expect(ran.code).toBe(2);
    expect(ran.stderr).toBe("ampipe run: --heartbeat-timeout: 2000 ms must exceed --heartbeat-interval (2000 ms)\n");
    expect(existsSync(out)).toBe(false);
  });

  it("reports a controller that cannot bind (port taken) in one line, exit 1, no rank left", async () => {
    const taken = createServer();
    await new Promise<void>((ok) => taken.listen(0, "127.0.0.1", ok));
    try {
      const port = (taken.address() as AddressInfo).port;
      const ran = await ampipe(["run", configPath, "--bind", `tcp://127.0.0.1:${port}`, "--out", join(dir, "run-taken")]);
      expect(ran.code).toBe(1);
      expect(ran.stderr).toMatch(new RegExp(`^ampipe run: cannot bind tcp://127\\.0\\.0\\.1:${port}: .+\n$`));
      expect(ran.stdout).not.toContain("ranks ready");
      expect(ranksOf(ran.pid)).toEqual([]);
    } finally {
      await new Promise((ok) => taken.close(ok));
    }
  });

  it.skipIf(existsSync("/dev/nvidia0"))("exits non-zero and leaves no rank behind when the ranks cannot start", async () => {
    const ran = await ampipe(["run", configPath, "--set", "parallelism.device=cuda", "--out", join(dir, "run-cuda")]);
    expect(ran.code).toBe(1);
    expect(ran.stderr).toMatch(/ampipe run: rank \d/);
    expect(existsSync(join(dir, "run-cuda", "result.json"))).toBe(false);
    expect(ranksOf(ran.pid)).toEqual([]);
  });

  it("exits non-zero and stops the other rank when a rank dies mid-run", async () => {
    let killed = 0;
    let poll: NodeJS.Timeout | undefined;
    const ran = await ampipe(["run", configPath, "--steps", "100000", "--out", join(dir, "run-killed")], (pid, stdout) => {
      poll = setInterval(() => {
        const ranks = ranksOf(pid);
        if (ranks.length === 2 && stdout().includes("running:")) {
          clearInterval(poll);
          killed = ranks[0];
          process.kill(killed, "SIGKILL");
        }
      }, 100);
    });
    clearInterval(poll);
    expect(killed).toBeGreaterThan(0);
    expect(ran.code).toBe(1);
    expect(ran.stderr).toMatch(new RegExp(`ampipe run: rank \\d \\(pid ${killed}\\) was killed by SIGKILL while running 'run_block'`));
    expect(existsSync(join(dir, "run-killed", "result.json"))).toBe(false);
    expect(ranksOf(ran.pid)).toEqual([]);
  });
});
