// `ampipe run <config>`: plan the config's block, launch its ranks, run the baseline and the
// pipelined block side by side on every rank (`run_block`, py/ampipe/pipeline/worker_commands.py)
// and report the equivalence check, the measured speed-up next to the ideal bound and the
// planner's prediction. Writes plan.json, its trace, result.json and calibration.json into the
// run's output directory (docs/run.md). Its library is src/run/run-block.ts.
import { mkdirSync } from "node:fs";
import { join, relative, resolve } from "node:path";
import { Command, InvalidArgumentError } from "commander";
import { checkBindAddress, closeOnSignals, type RankEvent, type RankRun } from "../bridge/index.ts";
import { ConfigError, loadConfig, type ExperimentConfig } from "../config/index.ts";
import { writeFileAtomic } from "../plan/io.ts";
import {
  RANK_MODULE, RESULT_FORMAT, RankResultSchema, calibrationDoc, prepareRunPlan, replayTrace, summarizeRanks,
  type PlannedBlock, type RankResult, type RunSummary,
} from "../run/run-block.ts";
import { startConfigRun } from "../bridge/start.ts";
import { addControllerOptions, nonNegative, positiveInt, reportFailure, type ControllerCliOptions } from "./options.ts";

// ---- the command ------------------------------------------------------------------------------

/** The options of `ampipe run`; the controller's are the ones every rank-launching command takes. */
export interface RunCommandOptions
  extends ControllerCliOptions {
  plan?: string;
  steps?: number;
  warmup?: number;
  out?: string;
  json?: boolean;
  set: string[];
  calibration?: string;
  tolerance?: number;
}

/**
 * The controller options, checked before anything is written: the controller checks them again
 * when it starts, but by then the plan would be on disk and the error would not be an input error.
 */
function checkControllerOptions(o: RunCommandOptions): void {
  try {
    checkBindAddress(o.bind, o.allowRemote ?? false);
  } catch (e) {
    throw new Error(`--bind: ${(e as Error).message}`);
  }
  if (o.heartbeatTimeout <= o.heartbeatInterval)
    throw new Error(`--heartbeat-timeout: ${o.heartbeatTimeout} ms must exceed --heartbeat-interval (${o.heartbeatInterval} ms)`);
}

const fmtMs = (ms: number) => (ms >= 100 ? ms.toFixed(1) : ms >= 1 ? ms.toFixed(2) : ms.toPrecision(3));
const fmtDiff = (v: number | null) => (v === null ? "missing" : v === 0 ? "0" : v.toExponential(2));

/** Renders the equivalence and timing report. */
export function reportText(s: RunSummary, planned: PlannedBlock, results: RankResult[]): string {
  const L: string[] = [];
  const e = s.equivalence;
  L.push(`equivalence (largest relative difference max|pipelined - baseline| / max|baseline| over ranks and steps; tolerance ${e.tolerance.toExponential(0)} for ${e.dtype}): ${e.ok ? "PASS" : "FAIL"}`);
  const entries = Object.entries(e.largest_relative_differences);
  const grads = entries.filter(([k]) => k.startsWith("grad."));
  for (const [k, v] of entries.filter(([k]) => !k.startsWith("grad."))) L.push(`  ${k.padEnd(34)} ${fmtDiff(v)}`);
  if (grads.length) {
    const sorted = [...grads].sort((a, b) => (b[1] ?? Infinity) - (a[1] ?? Infinity));
    for (const [k, v] of sorted.slice(0, 3)) L.push(`  ${k.padEnd(34)} ${fmtDiff(v)}`);
    if (sorted.length > 3) L.push(`  (${sorted.length - 3} more parameter gradients, all <= ${fmtDiff(sorted[3][1])})`);
  }
  if (!e.ok) L.push(`  worst: ${e.worst.name} on rank ${e.worst.rank}: ${fmtDiff(e.worst.value)} > ${e.tolerance.toExponential(0)}`);
  const r0 = results[0];
  if (r0?.precision) L.push(`  computed in: ${r0.precision === "fp32" ? "fp32" : `${r0.precision} autocast (fp32 parameters)`}, both arms`);
  if (r0?.capacity) L.push(`  routing: ${r0.capacity}`);
  L.push("");
  const t = s.timing;
  const label = s.emulated ? `comm: ${s.emulated} — EMULATED figures` : "comm: real (no emulation)";
  L.push(`timing, forward+backward per step (median of ${t.steps.length} steps, slowest rank per step; ${label}):`);
  L.push(`  ${"".padEnd(20)} ${"measured".padStart(10)} ${"predicted".padStart(10)}`);
  const p = planned.predicted;
  L.push(`  ${"baseline".padEnd(20)} ${fmtMs(t.baseline_ms).padStart(7)} ms ${fmtMs(p.sequential_total_ms).padStart(7)} ms  (predicted: the sequential plan)`);
  L.push(`  ${"pipelined".padEnd(20)} ${fmtMs(t.pipelined_ms).padStart(7)} ms ${fmtMs(p.total_ms).padStart(7)} ms  (fwd ${fmtMs(p.forward_ms)} + bwd ${fmtMs(p.backward_ms)} predicted)`);
  if (t.replayed_ms !== null)
    L.push(`  ${"replayed schedule".padEnd(20)} ${fmtMs(t.replayed_ms).padStart(7)} ms  (the plan with the measured op times, no executor overhead)`);
  L.push(`  ${"ideal bound".padEnd(20)} ${fmtMs(t.ideal_bound_ms).padStart(7)} ms  (per pass the largest of fill+compute+drain, fill+comm+drain and the longest dependency chain; measured op times)`);
  L.push(`  ${"speed-up".padEnd(20)} ${t.speedup.toFixed(3).padStart(8)}x ${p.speedup.toFixed(3).padStart(9)}x`);
  L.push(`  ${"ideal speed-up".padEnd(20)} ${t.ideal_speedup.toFixed(3).padStart(8)}x`);
  L.push(`  ${"overlap efficiency".padEnd(20)} ${t.overlap_efficiency === null ? "n/a (the bound is not below the baseline)" : t.overlap_efficiency.toFixed(2).padStart(9)}`);
  L.push(`  (cost model: profile ${p.profile}, ${p.calibrated ? "calibrated" : "uncalibrated"}; ranks: ${results.map((r) => `${r.rank}: ${fmtMs(r.baseline_ms)}/${fmtMs(r.pipelined_ms)} ms`).join(", ")})`);
  return L.join("\n") + "\n";
}

interface Printer { line(s: string): void }

/** Runs the whole experiment; returns the process exit code (0 ok, 1 failed, 2 bad input). */
export async function runCommand(configPath: string, o: RunCommandOptions, out: Printer = { line: (s) => process.stdout.write(s + "\n") }): Promise<number> {
  const say = (s: string) => { if (!o.json) out.line(s); };
  const t0 = performance.now();
  let cfg: ExperimentConfig;
  let planned: PlannedBlock;
  let outDir: string;
  try {
    checkControllerOptions(o);
    cfg = loadConfig(configPath, o.set);
    if (o.steps !== undefined) cfg.run.steps = o.steps;
    if (o.warmup !== undefined) cfg.run.warmup = o.warmup;
    if (o.out !== undefined) cfg.run.output_dir = o.out;
    outDir = cfg.run.output_dir;
    mkdirSync(outDir, { recursive: true });
    planned = prepareRunPlan(cfg, o, outDir);
  } catch (e) {
    process.stderr.write(`${e instanceof ConfigError ? "" : "ampipe run: "}${(e as Error).message}\n`);
    return 2;
  }
  const plan = planned.plan;
  const P = plan.boundaries.length - 1;
  say(`plan: ${plan.variant}, P=${P}, boundaries [${plan.boundaries.join(", ")}] (${planned.source === "planner" ? "planned" : `from ${planned.source}`}); ` +
    `predicted ${fmtMs(planned.predicted.total_ms)} ms vs sequential ${fmtMs(planned.predicted.sequential_total_ms)} ms (${planned.predicted.speedup.toFixed(3)}x)`);
  say(`wrote ${planned.planPath} and ${planned.tracePath}`);
  if (cfg.model.moe_expert_capacity_factor !== null)
    say(`note: model.moe_expert_capacity_factor is set: the blocks agree only while no expert reaches its capacity`);

  const par = cfg.parallelism;
  let run: RankRun | undefined;
  let stopSignals: (() => void) | undefined;
  const stepsSeen = new Map<number, Map<number, { b: number; p: number }>>();
  const onEvent = (ev: RankEvent) => {
    if (ev.kind === "progress" && ev.stage === "start" && ev.rank === 0)
      say(`running: ${ev.warmup} warm-up + ${ev.steps} measured steps on each rank, baseline and pipelined block alternating ...`);
    if (ev.kind === "metric" && ev.name === "block_step") {
      const step = ev.step as number;
      const m = stepsSeen.get(step) ?? new Map();
      m.set(ev.rank, { b: ev.baseline_ms as number, p: ev.pipelined_ms as number });
      stepsSeen.set(step, m);
      if (m.size === par.world_size) {
        const b = Math.max(...[...m.values()].map((x) => x.b));
        const p = Math.max(...[...m.values()].map((x) => x.p));
        say(`  step ${step + 1}/${ev.steps}: baseline ${fmtMs(b)} ms, pipelined ${fmtMs(p)} ms (slowest rank)`);
      }
    }
  };
  try {
    const tl = performance.now();
    run = await startConfigRun(par, o, { imports: [RANK_MODULE], onEvent },
    );
    stopSignals = closeOnSignals(run);
    const r0 = run.ranks[0];
    say(`${run.worldSize} ranks ready in ${((performance.now() - tl) / 1000).toFixed(1)} s (torch ${r0.torch}, ${r0.backend ?? "no dist"} on ${r0.device}; ` +
      `expert-parallel size ${par.expert_model_parallel_size})`);
    const args: Record<string, unknown> = {
      config: cfg, plan, steps: cfg.run.steps, warmup: cfg.run.warmup, seed: cfg.run.seed,
      ...(o.tolerance !== undefined ? { tolerance: o.tolerance } : {}),
    };
    // Fail fast: one rank's error must not wait for the others (they may sit in a collective).
    const results = await run.callAll("run_block", args, RankResultSchema);

    const summary = summarizeRanks(results, cfg.model.dtype);
    const calibrationPath = join(outDir, "calibration.json");
    const resultPath = join(outDir, "result.json");
    const measuredTracePath = join(outDir, "measured.trace.json");
    writeFileAtomic(calibrationPath, JSON.stringify(calibrationDoc(results, "plan.json", outDir, r0.device), null, 2) + "\n");
    writeFileAtomic(measuredTracePath, JSON.stringify(replayTrace(plan, results[0])) + "\n");
    const doc = {
      format: RESULT_FORMAT,
      version: 1,
      created: new Date().toISOString(),
      config_path: resolve(configPath),
      config: cfg,
      plan: { path: "plan.json", trace: "plan.trace.json", source: planned.source, variant: plan.variant, degree: P, boundaries: plan.boundaries, chunk_qkv: plan.chunk_qkv },
      device: r0.device,
      backend: r0.backend,
      torch: r0.torch,
      world_size: run.worldSize,
      expert_model_parallel_size: par.expert_model_parallel_size,
      steps: cfg.run.steps,
      warmup: cfg.run.warmup,
      seed: cfg.run.seed,
      emulated: summary.emulated,
      equivalence: summary.equivalence,
      timing: summary.timing,
      predicted: planned.predicted,
      calibration: "calibration.json",
      measured_trace: "measured.trace.json",
      ranks: results.map((r) => ({ ...r, equivalence: { ...r.equivalence, largest_relative_differences: finite(r.equivalence.largest_relative_differences) } })),
      elapsed_s: (performance.now() - t0) / 1000,
    };
    writeFileAtomic(resultPath, JSON.stringify(doc, null, 2) + "\n");
    if (o.json) out.line(JSON.stringify(doc, null, 2));
    else {
      out.line("");
      out.line(reportText(summary, planned, results).trimEnd());
      out.line("");
      out.line(`wrote ${resultPath}, ${measuredTracePath} and ${calibrationPath}`);
      out.line(`  refit the cost model and replan: ampipe plan ${configPath} --calibration ${shortPath(calibrationPath)}`);
      out.line(`done in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
    }
    if (!summary.equivalence.ok) {
      process.stderr.write(`ampipe run: equivalence FAILED: ${summary.equivalence.worst.name} differs by ${fmtDiff(summary.equivalence.worst.value)} ` +
        `(rank ${summary.equivalence.worst.rank}), tolerance ${summary.equivalence.tolerance}\n`);
      return 1;
    }
    return 0;
  } catch (e) {
    reportFailure(e, "ampipe run"); // a rank, command or controller failure, or a run closed by a signal
    return 1;
  } finally {
    stopSignals?.();
    await run?.close();
  }
}

/** The path relative to the working directory when it lies below it, else absolute. */
function shortPath(p: string): string {
  const r = relative(process.cwd(), p);
  return r && !r.startsWith("..") ? r : resolve(p);
}

function finite(d: Record<string, number>): Record<string, number | null> {
  return Object.fromEntries(Object.entries(d).map(([k, v]) => [k, Number.isFinite(v) ? v : null]));
}

const nonNegInt = (v: string) => {
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0) throw new InvalidArgumentError("expected an integer >= 0");
  return n;
};

export function register(program: Command): void {
  const cmd = program
    .command("run")
    .description("plan a config, run the baseline and the pipelined block side by side on its ranks, report equivalence and speed-up")
    .argument("<config>", "experiment config (.yaml, .yml or .json)")
    .option("--plan <file>", "execute this plan instead of planning (its dims must match the config)")
    .option("--steps <n>", "measured steps (default: run.steps)", positiveInt)
    .option("--warmup <n>", "warm-up steps before measuring (default: run.warmup)", nonNegInt)
    .option("--out <dir>", "output directory (default: run.output_dir)")
    .option("--calibration <file>", "measured op times for the planner's cost model (e.g. a previous run's calibration.json)")
    .option("--tolerance <x>", "largest relative difference accepted (default: fp32 1e-5 on CPU and 1e-4 on CUDA, fp16 1e-2, bf16 3e-2)", nonNegative)
    .option("--set <field=value>", "override a config field, e.g. --set model.seq_length=512 (repeatable)", (v: string, acc: string[]) => [...acc, v], [])
    .option("--json", "print result.json instead of the report");
  // The world size, device and backend come from the config's parallelism section (--set them).
  addControllerOptions(cmd)
    .action(async (config: string, opts: RunCommandOptions) => {
      process.exitCode = await runCommand(config, opts);
    });
}
