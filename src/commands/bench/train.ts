// `ampipe bench train <config>`: where does pipelining pay in training? Over sequence lengths and
// emulated comm/compute ratios, on the config's model and ranks: the baseline block, the planner's
// measured choice (tuned as `ampipe train` with `pipeline.degree: auto` tunes it) and the
// Tutel-style moe-overlap schedule, timed in the same ABBA rounds of real training steps; the
// break-even sequence length per ratio; results.jsonl, then report.html and summary.md through
// `ampipe report` (docs/bench.md#ampipe-bench-train-config).
//
// Per case (S, r): (1) once per S, a calibration: a few baseline steps without emulated delay,
// whose MoE-layer time C is what the ratio is of; (2) the bandwidth of the emulated interconnect
// set so that the baseline's modelled all-to-all delay per step is r x C (the bench sweep's bytes
// model, src/sweep/emulation.ts bandwidthForRatio, per block, x blocks per step); (3) the planner's
// candidates timed against the baseline and the decision (src/train/tune.ts); (4) fresh rounds of
// the three arms. Faults as in `ampipe bench <config>`: results.jsonl is appended and fsynced per
// case, a rerun resumes after the finished cases, a failing case is recorded and the sweep goes on.
import { existsSync, mkdirSync, readFileSync, rmSync } from "node:fs";
import { join, resolve } from "node:path";
import type { Command } from "commander";
import { CommandError, RankFailure, RunClosedError, type RankRun } from "../../bridge/index.ts";
import { ExperimentSchema, loadConfig, type EmulatedCommConfig, type ExperimentConfig } from "../../config/index.ts";
import { predict } from "../../plan/costs.ts";
import type { Plan } from "../../plan/ir.ts";
import { writeFileAtomic, writePlan } from "../../plan/io.ts";
import { planBlock } from "../../plan/planner.ts";
import { dimsFromConfig } from "../../plan/dims.ts";
import { costModelFor } from "../../plan/for-config.ts";
import { startConfigRun } from "../../bridge/start.ts";
import { addControllerOptions, type ControllerCliOptions } from "../options.ts";
import { REPORT_FILE, SUMMARY_FILE, reportCommand } from "../report.ts";
import { TRAIN_MODULE, TuneResultSchema, type TuneResult } from "../../train/results.ts";
import { RESULTS_FILE, appendResult, readResults } from "../../sweep/results.ts";
import { bandwidthForRatio, baselineDelayMs, emulatedLabel } from "../../sweep/emulation.ts";
import { fingerprint } from "../../sweep/sweep.ts";
import { withModel } from "../../sweep/grid.ts";
import {
  DEFAULT_SEQ_LENGTHS, TRAIN_BENCH_FORMAT, TRAIN_MANIFEST_FILE, armResult, caseId, pairedRatio,
  type ArmResult, type TrainBenchCase,
} from "../../sweep/train.ts";
import { resolveDataset } from "../../train/dataset.ts";
import { modelTrainingStep } from "../../train/predict.ts";
import { lockRunDir } from "../../train/lock.ts";
import { stopOnSignals } from "../../train/signals.ts";
import { armName, decide, describeDecision, tuneArms, type TuneArm, type TuneDecision } from "../../train/tune.ts";

/** Baseline steps of the calibration (after one warm-up step). */
const CALIBRATION_STEPS = 2;
/** The degrees moe-overlap's planner searches (P = 1 would overlap nothing). */
const MOE_OVERLAP_DEGREES = Array.from({ length: 15 }, (_, i) => i + 2);

export interface TrainBenchOptions extends ControllerCliOptions {
  seqLengths?: string;
  ratios?: string;
  steps?: string;
  tuneSteps?: string;
  tuneCandidates?: string;
  out?: string;
  fresh?: boolean;
  set: string[];
}

export interface TrainBenchSettings {
  seq_lengths: number[];
  /** [null]: pipeline.emulated_comm as given (or real comm). */
  ratios: Array<number | null>;
  steps: number;
  warmup: number;
  tune_steps: number;
  tune_candidates: number;
}

/** The baseline without emulated delay at one sequence length: what the ratio is of. */
interface Compute { step_ms: number; moe_layers_ms: number; blocks_per_step: number }

interface Manifest {
  format: typeof TRAIN_BENCH_FORMAT;
  version: 1;
  fingerprint: string;
  config_path: string;
  config: ExperimentConfig;
  settings: TrainBenchSettings;
  /** Case ids in run order (the union over the invocations on this directory). */
  cases: string[];
  /** Per sequence length, the calibration (kept, so a resumed sweep does not repeat it). */
  compute: Record<string, Compute>;
  created: string;
  device?: string;
  torch?: string;
}

/** What a rank's `train_tune` returns (py/ampipe/train/worker_commands.py). */
type TuneReply = TuneResult;

class InputError extends Error {}

function list(flag: string, text: string, check: (x: number) => boolean, rule: string): number[] {
  const parts = text.split(",").map((s) => s.trim());
  const xs = parts.map(Number);
  const bad = parts.findIndex((p, i) => p === "" || !check(xs[i]));
  if (bad >= 0) throw new InputError(`${flag}: "${parts[bad]}" is not ${rule} (got "${text}")`);
  if (new Set(xs).size !== xs.length) throw new InputError(`${flag}: a value is given twice (got "${text}")`);
  return xs;
}

function count(flag: string, text: string | undefined, fallback: number): number {
  if (text === undefined) return fallback;
  const n = Number(text);
  if (!Number.isInteger(n) || n < 1) throw new InputError(`${flag}: expected a positive integer, got "${text}"`);
  return n;
}

/** The settings from the options, else the config's bench section, else the defaults (docs/bench.md). */
export function trainBenchSettings(cfg: ExperimentConfig, o: TrainBenchOptions): TrainBenchSettings {
  const seqs = o.seqLengths !== undefined
    ? list("--seq-lengths", o.seqLengths, (x) => Number.isInteger(x) && x >= 2, "an integer >= 2")
    : cfg.bench.seq_lengths ?? DEFAULT_SEQ_LENGTHS;
  const ratios: Array<number | null> = o.ratios !== undefined
    ? list("--ratios", o.ratios, (x) => Number.isFinite(x) && x > 0, "a number > 0")
    : cfg.bench.comm_compute_ratios ?? [null];
  if (ratios[0] !== null && cfg.pipeline.emulated_comm === null)
    throw new InputError(`${o.ratios !== undefined ? "--ratios" : "bench.comm_compute_ratios"}: needs pipeline.emulated_comm (its latency_us and world_size; the bandwidth is set per case)`);
  return {
    seq_lengths: [...seqs].sort((a, b) => a - b), ratios,
    steps: count("--steps", o.steps, cfg.bench.steps), warmup: cfg.bench.warmup,
    tune_steps: count("--tune-steps", o.tuneSteps, 4), tune_candidates: count("--tune-candidates", o.tuneCandidates, 3),
  };
}

/** The config at one sequence length; the planner searches degree and variant (`ampipe train` with degree auto). */
function configAt(cfg: ExperimentConfig, seqLength: number, emu: EmulatedCommConfig | null): ExperimentConfig {
  const c = withModel(cfg, null, seqLength);
  c.pipeline = { ...c.pipeline, degree: "auto", variant: "auto", boundaries: null, emulated_comm: emu };
  return c;
}

const errorText = (e: unknown) => (e instanceof Error ? e.message : String(e));
const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;
const fmtMs = (ms: number) => (ms >= 100 ? ms.toFixed(1) : ms.toFixed(2));
const fmtX = (x: number) => `${x.toFixed(3)}x`;

interface Printer { line(s: string): void }

/** The sweep; returns the exit code (0 every case ran, 1 a case failed, 2 bad input, 130 interrupted). */
export async function trainBenchCommand(configPath: string, o: TrainBenchOptions, out: Printer = { line: (s) => process.stdout.write(s + "\n") }): Promise<number> {
  const t0 = performance.now();
  const say = out.line;
  let cfg: ExperimentConfig;
  let settings: TrainBenchSettings;
  let outDir: string;
  let manifest: Manifest;
  let done: Set<string>;
  try {
    cfg = loadConfig(configPath, o.set);
    settings = trainBenchSettings(cfg, o);
    for (const S of settings.seq_lengths) {
      const r = ExperimentSchema.safeParse(configAt(cfg, S, cfg.pipeline.emulated_comm));
      if (!r.success) throw new InputError(`--seq-lengths: at ${S}: ${r.error.issues.map((x) => `${x.path.join(".")}: ${x.message}`).join("; ")}`);
    }
    // The dataset must hold a sample of the longest sequence (+1) in each split.
    const data = resolveDataset(configAt(cfg, Math.max(...settings.seq_lengths), null));
    cfg.data.path = data.prefix;
    if (data.built) say(`built the default dataset ${data.prefix} in ${data.seconds.toFixed(1)} s`);
    outDir = o.out ?? join(cfg.run.output_dir, "bench-train");
    lockRunDir(outDir, "ampipe bench train"); // held until this process exits
    if (o.fresh) for (const f of [TRAIN_MANIFEST_FILE, RESULTS_FILE, "plans", REPORT_FILE, SUMMARY_FILE]) rmSync(join(outDir, f), { recursive: true, force: true });
    mkdirSync(join(outDir, "plans"), { recursive: true });
    // The grid (sequence lengths, ratios) may grow between invocations; what a case measures may not change.
    const { seq_lengths: _s, ratios: _r, ...measuring } = settings;
    const fp = fingerprint(cfg, measuring);
    const ids = settings.seq_lengths.flatMap((S) => settings.ratios.map((r) => caseId(S, r)));
    const mPath = join(outDir, TRAIN_MANIFEST_FILE);
    if (existsSync(mPath)) {
      const old = JSON.parse(readFileSync(mPath, "utf8")) as Manifest;
      if (old.fingerprint !== fp)
        throw new InputError(`--out ${outDir}: it holds a sweep of another config or other --steps/--tune-steps/--tune-candidates (fingerprint ${old.fingerprint}, this one ${fp}); choose another --out, or --fresh to start over`);
      manifest = { ...old, settings, cases: [...new Set([...old.cases, ...ids])] };
    } else {
      manifest = { format: TRAIN_BENCH_FORMAT, version: 1, fingerprint: fp, config_path: configPath, config: cfg, settings, cases: ids, compute: {}, created: new Date().toISOString() };
    }
    done = new Set(readResults<TrainBenchCase>(join(outDir, RESULTS_FILE)).filter((r) => r.status === "ok").map((r) => r.case));
  } catch (e) {
    process.stderr.write(`ampipe bench train: ${errorText(e)}\n`);
    return 2;
  }
  const saveManifest = () => writeFileAtomic(join(outDir, TRAIN_MANIFEST_FILE), JSON.stringify(manifest, null, 2) + "\n");
  saveManifest();

  const cases = settings.seq_lengths.flatMap((S) => settings.ratios.map((ratio) => ({ id: caseId(S, ratio), S, ratio })));
  const pending = cases.filter((c) => !done.has(c.id));
  const emu0 = cfg.pipeline.emulated_comm;
  say(`bench train: ${cases.length} case(s) (seq_length ${settings.seq_lengths.join(", ")}; ` +
    `comm/compute ${settings.ratios[0] === null ? "as configured" : settings.ratios.join(", ")}); ` +
    `${cases.length - pending.length ? `${cases.length - pending.length} already done in ${outDir}, ` : ""}${pending.length} to run; ` +
    `per case: the planner's ${settings.tune_candidates} best candidate(s) timed ${settings.tune_steps} step(s) each against the baseline, then ${settings.steps} ABBA rounds (after ${settings.warmup} warm-up) of the baseline, the planner's choice and moe-overlap; ` +
    `interconnect: ${emu0 ? `EMULATED ${emu0.world_size}-way all-to-all, latency ${emu0.latency_us} us${settings.ratios[0] !== null ? ", bandwidth set per case" : `, ${emu0.bandwidth_gbps} GB/s`}` : "real"}`);

  // ---- ranks, restarted after a failed case ----
  let run: RankRun | undefined;
  const signals = stopOnSignals(() => run, "ampipe bench train");
  const ensureRun = async (): Promise<RankRun> => {
    if (run && !run.closing && !run.failure) return run;
    await run?.close();
    run = await startConfigRun(cfg.parallelism, o, { imports: [TRAIN_MODULE] });
    manifest.device = run.ranks[0].device;
    manifest.torch = run.ranks[0].torch;
    return run;
  };
  const dropRun = async () => {
    const r = run;
    run = undefined;
    await r?.close();
  };
  /** `train_tune` on every rank: `warmup` + `steps` ABBA rounds of the arms. */
  const timeArms = async (c: ExperimentConfig, arms: TuneArm[], steps: number, warmup: number): Promise<TuneReply[]> => {
    const r = await ensureRun();
    const res = await r.broadcastAs("train_tune", {
      config: c, arms: Object.fromEntries(arms.map((a) => [a.name, a.plan])), run_dir: resolve(outDir), steps, warmup,
    }, TuneResultSchema);
    if (signals.requested) throw new RunClosedError("train_tune"); // cancelled: the rounds are cut short
    return res;
  };

  const calibrate = async (S: number): Promise<Compute> => {
    const known = manifest.compute[String(S)];
    if (known) return known;
    const res = await timeArms(configAt(cfg, S, null), [{ name: "baseline", plan: null }], CALIBRATION_STEPS, 1);
    const s = res.map((r) => r.arms.baseline);
    if (s.some((x) => !x || x.step_ms === null || x.moe_layers_ms === null))
      throw new Error(`calibration at seq_length ${S}: a rank measured no MoE-layer time`);
    const c = { step_ms: mean(s.map((x) => x.step_ms!)), moe_layers_ms: mean(s.map((x) => x.moe_layers_ms!)), blocks_per_step: s[0].blocks_per_step };
    manifest.compute[String(S)] = c;
    saveManifest();
    return c;
  };

  const runCase = async (id: string, S: number, ratio: number | null, tc: number): Promise<TrainBenchCase> => {
    const compute = await calibrate(S);
    say(`${id}: calibration: the baseline's step ${fmtMs(compute.step_ms)} ms, its ${compute.blocks_per_step} MoE-layer passes ${fmtMs(compute.moe_layers_ms)} ms (no emulated delay)`);
    let emu = emu0;
    if (ratio !== null) {
      let bw: number;
      try {
        bw = bandwidthForRatio(configAt(cfg, S, null), S, ratio, compute.moe_layers_ms / compute.blocks_per_step, emu0!);
      } catch (e) {
        throw new Error(`comm/compute ${ratio} cannot be emulated at seq_length ${S}: ${errorText(e).replace(/^bench\.comm_compute_ratios: /, "")}`);
      }
      emu = { ...emu0!, bandwidth_gbps: bw };
    }
    const c = configAt(cfg, S, emu);
    const label = emu ? `${emulatedLabel(emu)}${ratio !== null ? `, comm/compute ${ratio}` : ""}` : null;
    if (label) say(`${id}: ${label} — EMULATED`);
    const dims = dimsFromConfig(c);
    const opts = { chunkQkv: c.pipeline.chunk_qkv, capacityScope: c.pipeline.capacity_scope };
    const baseModel = costModelFor(c).model;

    // The choice, as `ampipe train` makes it.
    const candidates = tuneArms(planBlock(dims, baseModel, opts), settings.tune_candidates, opts.chunkQkv, opts.capacityScope);
    let decision: TuneDecision | null = null;
    let stepModel: ReturnType<typeof modelTrainingStep> = null;
    if (candidates.length > 1) {
      const res = await timeArms(c, candidates, settings.tune_steps, 1);
      decision = decide(candidates, res.map((r) => r.step_ms), 1);
      stepModel = modelTrainingStep(baseModel, candidates, res.map((r) => r.arms), decision, manifest.device ?? c.parallelism.device);
      say(`${id}: ${describeDecision(decision)}`);
    } else say(`${id}: no pipelined plan fits these dims: the choice is the baseline`);
    const chosen = decision?.chosen ?? "baseline";
    const fastest = decision?.arms.filter((a) => a.name !== "baseline").reduce((a, b) => (b.speedup > a.speedup ? b : a));
    const planned = candidates.find((a) => a.name === (chosen !== "baseline" ? chosen : fastest?.name))?.plan ?? null;

    // moe-overlap: the planner restricted to that variant, under the model calibrated on the tuning's steps.
    let moe: Plan | null = null;
    let moeBy: string | null = null;
    try {
      moe = planBlock(dims, stepModel?.model ?? baseModel, { ...opts, variants: ["moe-overlap"], degrees: MOE_OVERLAP_DEGREES }).plan;
      moeBy = `the planner restricted to moe-overlap (P >= 2), ${stepModel ? "its cost model calibrated on the tuning's steps" : "uncalibrated cost model"}`;
    } catch (e) {
      moeBy = `none: ${errorText(e)}`;
    }
    if (planned) writePlan(join(outDir, "plans", `${id}.planned.json`), planned);
    if (moe) writePlan(join(outDir, "plans", `${id}.moe-overlap.json`), moe);

    // Fresh rounds of the three arms.
    const arms: TuneArm[] = [{ name: "baseline", plan: null }, ...[planned, moe].filter((p): p is Plan => p !== null).map((p) => ({ name: armName(p), plan: p }))];
    const res = await timeArms(c, arms, settings.steps, settings.warmup);
    const m = decide(arms, res.map((r) => r.step_ms), settings.warmup);
    const timing = (name: string) => m.arms.find((a) => a.name === name)!;
    const base = timing("baseline");
    const tokensPerStep = c.train.global_batch_size * S;
    const predictedPlanned = planned ? stepModel?.predictions.find((p) => p.name === armName(planned))?.predictedStepMs ?? null : null;
    const predictedMoe = moe && stepModel ? stepModel.outsideMs + stepModel.blocksPerStep * predict(stepModel.model, moe).totalMs : null;
    const armResults: ArmResult[] = [
      armResult("baseline", null, base, base, tokensPerStep, null),
      ...(planned ? [armResult("planned", planned, timing(armName(planned)), base, tokensPerStep, predictedPlanned)] : []),
      ...(moe ? [armResult("moe-overlap", moe, timing(armName(moe)), base, tokensPerStep, predictedMoe)] : []),
    ];
    const chosenArm = armResults.find((a) => a.name === chosen)!;
    const moeArm = armResults.find((a) => a.role === "moe-overlap");
    const moeBase = res.map((r) => r.arms.baseline?.moe_layers_ms).filter((x): x is number => typeof x === "number");
    const delay = emu ? compute.blocks_per_step * baselineDelayMs(c, emu) : null;
    const measuredMoe = moeBase.length ? mean(moeBase) : null;
    return {
      case: id, seq_length: S, comm_compute_ratio: ratio, status: "ok", error: null,
      interconnect: emu ? "emulated" : "real", emulated: label,
      latency_us: emu?.latency_us ?? null, bandwidth_gbps: emu?.bandwidth_gbps ?? null, emulated_world_size: emu?.world_size ?? null,
      compute, delay_per_step_ms: delay,
      comm_compute_measured: delay !== null && measuredMoe !== null && measuredMoe > delay ? delay / (measuredMoe - delay) : null,
      tokens_per_step: tokensPerStep,
      tune: decision ? { chosen: decision.chosen, reason: decision.reason, noise: decision.noise, rounds: decision.rounds, arms: decision.arms.map((a) => ({ name: a.name, median_ms: a.medianMs, speedup: a.speedup })) } : null,
      chosen, moe_overlap_by: moeBy, arms: armResults,
      speedup: chosenArm.speedup,
      moe_overlap_speedup: moeArm?.speedup ?? null,
      chosen_vs_moe_overlap: moeArm ? pairedRatio(moeArm.samples_ms, chosenArm.samples_ms) : null,
      noise: m.noise,
      beats_baseline: chosen !== "baseline" && chosenArm.speedup.median > 1 + m.noise,
      predicted_step_ms: chosenArm.predicted_step_ms, measured_step_ms: chosenArm.step_ms.median, prediction_error: chosenArm.prediction_error,
      steps: m.rounds, warmup: settings.warmup, tune_steps: settings.tune_steps,
      elapsed_s: (performance.now() - tc) / 1000, finished: new Date().toISOString(),
    };
  };

  let failed = 0;
  let externalLost = false;
  let doneCount = cases.length - pending.length;
  try {
    for (const { id, S, ratio } of pending) {
      if (signals.requested) break;
      const tc = performance.now();
      let result: TrainBenchCase;
      try {
        result = await runCase(id, S, ratio, tc);
      } catch (e) {
        if (signals.requested || e instanceof RunClosedError) break;
        result = errorCase(id, S, ratio, cfg, e, (performance.now() - tc) / 1000);
        failed++;
        // Ranks started by torchrun/Slurm cannot be restarted from here: keep the record, stop.
        externalLost = o.external === true && e instanceof RankFailure;
        // A failed rank, or one left inside a collective by another's error, is not trusted with
        // the next case; an error of this side (the interconnect cannot be emulated) leaves them idle.
        if (e instanceof RankFailure || e instanceof CommandError || run?.failure || run?.closing) await dropRun();
      }
      appendResult(join(outDir, RESULTS_FILE), result);
      doneCount++;
      say(`[${doneCount}/${cases.length}] ${caseLine(result)}`);
      if (externalLost) {
        say("the external ranks are gone; stopping (restart them and rerun to resume)");
        break;
      }
    }
  } finally {
    await run?.close(); // a signal while the ranks close still reaches our handler (not the default exit)
    signals.off();
    saveManifest();
  }
  if (signals.requested) {
    say(`interrupted: ${readResults<TrainBenchCase>(join(outDir, RESULTS_FILE)).filter((r) => r.status === "ok").length} of ${cases.length} cases finished and kept in ${outDir}; rerun the same command to resume`);
    return 130;
  }
  const code = reportCommand(outDir, {}, out);
  say(`done in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
  return failed > 0 || code !== 0 ? 1 : 0;
}

/** One line per finished case. */
export function caseLine(r: TrainBenchCase): string {
  if (r.status === "error") return `${r.case}: FAILED (recorded; the sweep goes on): ${(r.error ?? "").split("\n")[0]}`;
  const base = r.arms.find((a) => a.role === "baseline")!;
  const moe = r.arms.find((a) => a.role === "moe-overlap");
  const pred = r.prediction_error !== null ? `; predicted ${fmtMs(r.predicted_step_ms!)} ms vs measured ${fmtMs(r.measured_step_ms!)} ms (${(100 * r.prediction_error).toFixed(1)}%)` : "";
  return `${r.case}: baseline ${fmtMs(base.step_ms.median)} ms/step, ${Math.round(base.tokens_per_s.median)} tokens/s; ` +
    `choice ${r.chosen}${r.chosen === "baseline" ? "" : ` ${fmtX(r.speedup!.median)} [${r.speedup!.q1.toFixed(3)}, ${r.speedup!.q3.toFixed(3)}]`}` +
    `${r.beats_baseline ? ", beats the baseline" : ", does not beat the baseline"} (noise ±${(100 * r.noise!).toFixed(1)}%)` +
    `${moe ? `; ${moe.name} ${fmtX(moe.speedup.median)}; choice vs moe-overlap ${fmtX(r.chosen_vs_moe_overlap!.median)}` : ""}${pred}` +
    `${r.emulated ? ` — EMULATED: ${r.emulated}` : ""}`;
}

function errorCase(id: string, S: number, ratio: number | null, cfg: ExperimentConfig, e: unknown, elapsed: number): TrainBenchCase {
  let msg = errorText(e);
  if (e instanceof RankFailure) msg = `rank failure: ${msg}`;
  else if (e instanceof CommandError) msg = `rank error: ${msg}`;
  const emu = cfg.pipeline.emulated_comm;
  return {
    case: id, seq_length: S, comm_compute_ratio: ratio, status: "error", error: msg,
    interconnect: emu ? "emulated" : "real", emulated: null, latency_us: emu?.latency_us ?? null, bandwidth_gbps: null, emulated_world_size: emu?.world_size ?? null,
    compute: null, delay_per_step_ms: null, comm_compute_measured: null, tokens_per_step: cfg.train.global_batch_size * S,
    tune: null, chosen: "baseline", moe_overlap_by: null, arms: [], speedup: null, moe_overlap_speedup: null, chosen_vs_moe_overlap: null,
    noise: null, beats_baseline: null, predicted_step_ms: null, measured_step_ms: null, prediction_error: null,
    steps: 0, warmup: 0, tune_steps: 0, elapsed_s: elapsed, finished: new Date().toISOString(),
  };
}

export function register(bench: Command): void {
  const cmd = bench
    .command("train")
    .description("where does pipelining pay in training? baseline vs the planner's measured choice vs moe-overlap, over sequence lengths and emulated comm/compute ratios; the break-even sequence length")
    .argument("<config>", "experiment config (.yaml, .yml or .json): its model, ranks, data and pipeline.emulated_comm")
    .option("--seq-lengths <list>", `sequence lengths, e.g. 256,512,1024 (default: bench.seq_lengths, else ${DEFAULT_SEQ_LENGTHS.join(",")})`)
    .option("--ratios <list>", "emulated comm/compute ratios, e.g. 0.5,1 (default: bench.comm_compute_ratios, else pipeline.emulated_comm as given)")
    .option("--steps <n>", "measured ABBA rounds per case, after bench.warmup warm-up rounds (default: bench.steps)")
    .option("--tune-steps <n>", "measured training steps per candidate when the planner's candidates are timed (default 4, as ampipe train)")
    .option("--tune-candidates <n>", "the planner's candidates timed against the baseline (default 3, as ampipe train)")
    .option("--out <dir>", "output directory (default: <run.output_dir>/bench-train); a rerun on it resumes after the finished cases")
    .option("--fresh", "discard what an earlier sweep left in the output directory and start over (default: resume)")
    .option("--set <field=value>", "override a config field, e.g. --set train.global_batch_size=4 (repeatable)", (v: string, acc: string[]) => [...acc, v], []);
  addControllerOptions(cmd).action(async (config: string, opts: TrainBenchOptions) => {
    process.exitCode = await trainBenchCommand(config, opts);
  });
}
