// `ampipe compare <config>`: does the pipelined block train like the baseline? Trains both arms
// (and, by default with dropless routing, a control arm: the baseline nudged by rounding) from one
// initialisation and data order over N seeds, or over seeds added until the comparison is decided
// (--seeds auto), steps interleaved on the same ranks; then reports the divergence from the
// baseline step by step against the control's noise envelope, equivalence tests of the eval-loss
// curves, throughput and speed-up: compare.json, summary.md, report.html (docs/compare.md).
import { existsSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { join, resolve } from "node:path";
import { Command, InvalidArgumentError } from "commander";
import { BridgeError, CommandError, RankFailure, RunClosedError, type RankEvent, type RankRun } from "../bridge/index.ts";
import { loadConfig, type ExperimentConfig } from "../config/index.ts";
import { evalCurve, finalEval } from "../compare/endpoints.ts";
import { writeCompareReport } from "../compare/report.ts";
import { CompareResultSchema } from "../compare/results.ts";
import { sequentialDecision, sequentialDesign, type SequentialDesign } from "../compare/sequential.ts";
import { fmtP } from "../compare/stats.ts";
import { ALL_ARMS, ARMS, seedsNeededSentence, summarize, tostSentence, type Arm, type CompareSummary, type MetricLine, type SeedRuns } from "../compare/summary.ts";
import { type Plan } from "../plan/ir.ts";
import { writeFileAtomic, writePlan } from "../plan/io.ts";
import { resolveDataset } from "../train/dataset.ts";
import { makeProgress, type Progress } from "../train/progress.ts";
import { MetricsLog, prepareRunDir } from "../train/rundir.ts";
import { stopOnSignals } from "../train/signals.ts";
import { chooseBlock, tuneOnRanks, TUNE_FILE, type ChooseOptions } from "../train/choose.ts";
import { lockRunDir } from "../train/lock.ts";
import { TRAIN_MODULE } from "../train/results.ts";
import type { TuneArm } from "../train/tune.ts";
import { startConfigRun } from "../bridge/start.ts";
import { addControllerOptions, addTuneOptions, positiveInt, reportFailure, type ControllerCliOptions } from "./options.ts";

export const COMPARE_MODULE = "ampipe.train.compare";
export const COMPARE_FORMAT = "ampipe.compare";
/** The rank-side test hook that makes the pipelined arm wrong on purpose (py/ampipe/train/compare.py). */
export const FAULT_ENV = "AMPIPE_TEST_GRAD_SCALE";
export const DEFAULT_MAX_SEEDS = 10;

export interface CompareOptions
  extends ControllerCliOptions, ChooseOptions {
  seeds: number | "auto";
  maxSeeds?: number;
  steps?: number;
  margin: number;
  lastEvals: number;
  /** The tail-mean endpoint: the last fraction of the steps. */
  tail: number;
  /** Train the control arm; default: with dropless routing. */
  control?: boolean;
  envelopeFactor: number;
  plan?: string;
  out?: string;
  fresh?: boolean;
  set: string[];
  calibration?: string;
  plain?: boolean;
}

export class CompareInputError extends Error {}

/** seed.json as read back: a seed's result (`SeedResultSchema`), or one written before the control arm. */
interface SeedResult {
  seed: number; stopped: boolean;
  arms: Partial<Record<Arm, { step: number; steps: number; median_tokens_per_s: number | null; final: unknown; last_eval: unknown }>>;
  parameter_distance: SeedRuns["parameter_distance"];
  fault?: string | null;
}

const armDir = (root: string, seed: number, arm: Arm) => join(root, `seed-${seed}`, arm);
const seedFile = (root: string, seed: number) => join(root, `seed-${seed}`, "seed.json");
const autoFile = (root: string) => join(root, "auto.json");

function checkOptions(o: CompareOptions): void {
  if (o.seeds !== "auto" && (!Number.isInteger(o.seeds) || o.seeds < 1)) throw new CompareInputError(`--seeds: must be an integer >= 1 or auto; got ${o.seeds}`);
  if (o.maxSeeds !== undefined && o.seeds !== "auto") throw new CompareInputError("--max-seeds: only with --seeds auto");
  if (o.seeds === "auto") {
    try {
      sequentialDesign(o.maxSeeds ?? DEFAULT_MAX_SEEDS);
    } catch (e) {
      throw new CompareInputError((e as Error).message);
    }
  }
  if (!(o.margin > 0)) throw new CompareInputError(`--margin: must be > 0 (a fraction of the baseline's final eval loss, e.g. 0.01); got ${o.margin}`);
  if (!Number.isInteger(o.lastEvals) || o.lastEvals < 1) throw new CompareInputError(`--last-evals: must be an integer >= 1; got ${o.lastEvals}`);
  if (!(o.tail > 0 && o.tail <= 1)) throw new CompareInputError(`--tail: must be a fraction in (0, 1] of the steps; got ${o.tail}`);
  if (!(o.envelopeFactor >= 1)) throw new CompareInputError(`--envelope-factor: must be >= 1; got ${o.envelopeFactor}`);
}

export interface CompareSetup {
  cfg: ExperimentConfig; root: string;
  /** The pipelined arm's plan; null while it is still to be chosen by timing on the ranks (`tune`). */
  plan: Plan | null; planSource: string; tune: TuneArm[] | null;
  /** The seeds to run now: all of them, or with --seeds auto those before the first look. */
  seeds: number[];
  /** The arms each seed trains. */
  arms: Arm[];
  design: SequentialDesign | null;
}

/** A pipelined arm that would run the baseline's schedule: refused, naming the choice. */
function checkPipelined(plan: Plan, source: string): void {
  if (plan.variant === "sequential" || plan.boundaries.length === 2 && plan.variant !== "moe-overlap")
    throw new CompareInputError(`the pipelined arm's plan (${source}) is ${plan.variant} with one chunk: ` +
      "it would run the baseline's schedule; nothing to compare (set pipeline.degree, or --plan)");
}

/** Everything checked and written before a rank starts. */
export function prepareCompare(configPath: string, o: CompareOptions): CompareSetup {
  checkOptions(o);
  const cfg = loadConfig(configPath, [...o.set, ...(o.steps !== undefined ? [`train.steps=${o.steps}`] : [])]);
  if (o.out !== undefined) cfg.run.output_dir = o.out;
  if (!o.plan && cfg.pipeline.degree === 1)
    throw new CompareInputError("pipeline.degree is 1: both arms would train the baseline block; nothing to compare (set a degree, auto, or --plan)");
  if (cfg.train.steps < 2)
    throw new CompareInputError(`train.steps: a comparison needs at least 2 steps (throughput leaves each run's first out); got ${cfg.train.steps}`);
  cfg.data.path = resolveDataset(cfg).prefix;
  const root = cfg.run.output_dir;
  lockRunDir(root, "ampipe compare"); // held until this process exits
  if (o.fresh) for (const f of ["compare.json", "summary.md", "report.html", "auto.json", TUNE_FILE, "calibration.json"]) rmSync(join(root, f), { force: true });
  // The root holds the config every run shares (more seeds later extend the same comparison).
  prepareRunDir(root, cfg as unknown as Record<string, unknown>, o.fresh ?? false);
  // The pipelined arm's block is chosen as `ampipe train` chooses it (degree auto: timed on the
  // ranks first, that decision kept in the root for reruns).
  const choice = chooseBlock(cfg, o, root, existsSync(join(root, TUNE_FILE)));
  if (choice.plan === null && choice.tune === null)
    throw new CompareInputError(`the pipelined arm would train the baseline block: ${choice.source}; nothing to compare (set pipeline.degree, or --plan)`);
  if (choice.plan) checkPipelined(choice.plan, choice.source);
  const design = o.seeds === "auto" ? sequentialDesign(o.maxSeeds ?? DEFAULT_MAX_SEEDS) : null;
  const seeds = [...Array(design ? design.first_look : o.seeds as number).keys()].map((i) => cfg.run.seed + i);
  if (o.fresh && existsSync(root)) for (const d of readdirSync(root).filter((f) => /^seed-\d+$/.test(f))) rmSync(join(root, d), { recursive: true, force: true });
  if (design) checkAutoDesign(root, design, o);
  const control = o.control ?? cfg.model.moe_expert_capacity_factor === null;
  const setup: CompareSetup = { cfg, root, plan: choice.plan, planSource: choice.source, tune: choice.tune, seeds,
    arms: control ? [...ALL_ARMS] : [...ARMS], design };
  for (const seed of seeds) prepareSeed(setup, seed);
  return setup;
}

/** A seed's arm directories, ready to start or resume; refuses to add the control arm to a seed begun without it. */
export function prepareSeed(setup: CompareSetup, seed: number): void {
  const { cfg, root } = setup;
  if (setup.arms.includes("control")) {
    const done = existsSync(seedFile(root, seed)) && !(JSON.parse(readFileSync(seedFile(root, seed), "utf8")) as SeedResult).arms.control;
    const begun = existsSync(join(armDir(root, seed, "baseline"), "checkpoints")) && !existsSync(join(armDir(root, seed, "control"), "checkpoints"));
    if (done || begun)
      throw new CompareInputError(`seed ${seed} was ${done ? "run" : "begun"} without the control arm: its divergences from the baseline were not recorded ` +
        "step by step; rerun with --no-control, or --fresh to start over");
  }
  for (const arm of setup.arms) {
    const dir = armDir(root, seed, arm);
    prepareRunDir(dir, { ...cfg, run: { ...cfg.run, seed, output_dir: dir } } as unknown as Record<string, unknown>, false);
    if (arm === "pipelined" && setup.plan) writePlan(join(dir, "plan.json"), setup.plan);
  }
}

/** --seeds auto: the design (and what the decision depends on) is fixed when the sequence starts. */
function checkAutoDesign(root: string, design: SequentialDesign, o: CompareOptions): void {
  const want = { max_seeds: design.max_seeds, margin: o.margin, last_evals: o.lastEvals, alpha: design.alpha, first_look: design.first_look };
  if (existsSync(autoFile(root))) {
    const had = JSON.parse(readFileSync(autoFile(root), "utf8")) as typeof want;
    const differ = (Object.keys(want) as Array<keyof typeof want>).filter((k) => had[k] !== want[k]);
    if (differ.length)
      throw new CompareInputError(`${autoFile(root)}: this --seeds auto sequence began with ${differ.map((k) => `${k} ${had[k]}`).join(", ")}; ` +
        `changing ${differ.join(", ")} mid-sequence would void its error rate: rerun with the same options, or --fresh to start over`);
  }
  writeFileAtomic(autoFile(root), JSON.stringify(want, null, 2) + "\n");
}

function finished(root: string, seed: number, steps: number, arms: Arm[]): boolean {
  if (!existsSync(seedFile(root, seed))) return false;
  const r = JSON.parse(readFileSync(seedFile(root, seed), "utf8")) as SeedResult;
  return !r.stopped && arms.every((a) => r.arms[a]?.step === steps);
}

const fmt = (v: number, d = 4) => v.toFixed(d);
const sci = (v: number) => v.toExponential(2);

export function summaryText(s: CompareSummary, emulated: string | null): string {
  const L: string[] = [];
  L.push(`seeds ${s.seeds.join(", ")}; ${s.steps} steps per run; arms ${s.arms_trained.join(", ")}`);
  L.push(`largest per-step |Δloss| pipelined vs baseline: ${sci(s.per_step_max_abs_delta.overall)} (seed ${s.per_step_max_abs_delta.at.seed}, step ${s.per_step_max_abs_delta.at.step})`);
  if (s.envelope) {
    for (const seed of s.seeds) {
      const d = s.divergence[seed];
      const max = (xs: number[] | null) => (xs && xs.length ? sci(Math.max(...xs)) : "-");
      L.push(`seed ${seed} largest divergence from the baseline, pipelined / control: |Δloss| ${max(d.loss.pipelined)} / ${max(d.loss.control)}, ` +
        `|Δgrad norm| ${max(d.grad_norm.pipelined)} / ${max(d.grad_norm.control)}, parameter distance ${max(d.param_distance.pipelined)} / ${max(d.param_distance.control)}`);
    }
  }
  for (const arm of s.arms_trained) {
    const a = s.arms[arm]!;
    const ci = a.final_eval.ci95 ? ` (95% CI ${fmt(a.final_eval.ci95[0])} .. ${fmt(a.final_eval.ci95[1])})` : "";
    const t = a.throughput.tokens_per_s;
    L.push(`${arm.padEnd(10)} final eval loss ${fmt(a.final_eval.mean)}${ci}; ${t.median.toFixed(0)} tokens/s (IQR ${t.q1.toFixed(0)} .. ${t.q3.toFixed(0)})`);
  }
  const d = s.difference;
  L.push(`difference (pipelined - baseline): ${sci(d.mean)}${d.ci95 ? ` (95% CI ${sci(d.ci95[0])} .. ${sci(d.ci95[1])})` : ""}`);
  L.push(tostSentence(s.tost) + (s.endpoints.final.decided === null ? seedsNeededSentence(s.endpoints.final) : ""));
  if (s.sequential) {
    const q = s.sequential;
    L.push(`--seeds auto (${q.design.rule}): ${q.decision}${q.decision === "continue" ? "" : ` at ${q.seeds} seeds`}; looks: ` +
      q.looks.map((l) => `n=${l.n} TOST p ${fmtP(l.p_equivalent)}, outside-margin p ${fmtP(l.p_different)}`).join("; "));
  }
  L.push(`speed-up (median of per-step ratios, step 1 of each run left out): ${s.speedup.median.toFixed(3)}x (IQR ${s.speedup.q1.toFixed(3)} .. ${s.speedup.q3.toFixed(3)}); ${emulated ? `comm EMULATED (${emulated})` : "real communication"}`);
  for (const g of s.goals) L.push(`goal ${g.met === null ? "n/a" : g.met ? "MET" : "MISSED"}: ${g.goal}: ${g.detail}`);
  return L.join("\n");
}

/** A seed's metric lines (and end-of-run parameter distances) as the summary reads them. */
function seedRuns(root: string, seed: number, arms: Arm[]): SeedRuns {
  const lines = Object.fromEntries(arms.map((a) => [a, new MetricsLog(armDir(root, seed, a)).read()])) as unknown as SeedRuns["lines"];
  const r = JSON.parse(readFileSync(seedFile(root, seed), "utf8")) as SeedResult;
  const pd = r.parameter_distance as unknown as Record<string, unknown> | null;
  // A seed.json of ampipe before the control arm held the pipelined arm's distance alone.
  const parameter_distance = pd && "relative" in pd ? { pipelined: pd as unknown as NonNullable<SeedRuns["parameter_distance"]>["pipelined"] } : r.parameter_distance;
  return { seed, lines, parameter_distance };
}

export async function compareCommand(configPath: string, o: CompareOptions): Promise<number> {
  const t0 = performance.now();
  const say = (s: string) => process.stdout.write(s + "\n");
  let setup: CompareSetup;
  try {
    setup = prepareCompare(configPath, o);
  } catch (e) {
    process.stderr.write(`${(e as Error).name === "ConfigError" ? "" : "ampipe compare: "}${(e as Error).message}\n`);
    return 2;
  }
  const { cfg, root, design, arms } = setup;
  let plan = setup.plan;
  const steps = cfg.train.steps;
  const emu = cfg.pipeline.emulated_comm;
  const emulated = emu ? `${emu.world_size}-way all-to-all, ${emu.latency_us} us + bytes / ${emu.bandwidth_gbps} GB/s` : null;
  const dropless = cfg.model.moe_expert_capacity_factor === null;
  const describeArms = (p: Plan) => say(`arms: ${arms.join(", ")} (pipelined: ${p.variant}, P=${p.boundaries.length - 1}, boundaries [${p.boundaries.join(", ")}], ${setup.planSource}` +
    `${arms.includes("control") ? "; control: the baseline with every initial weight moved by one ulp" : ""}); ` +
    `${design ? `seeds added until decided (${design.rule})` : `${setup.seeds.length} seed(s)`} x ${steps} steps; ` +
    `capacity ${dropless ? "dropless" : `factor ${cfg.model.moe_expert_capacity_factor}`}; ${cfg.model.dtype}` +
    (emulated ? `; comm EMULATED (${emulated})` : ""));
  if (plan) describeArms(plan);
  else say(`pipelined arm: pipeline.degree auto: timing the baseline and ${setup.tune!.length - 1} planned candidate(s) in training steps first`);
  if (process.env[FAULT_ENV]) say(`TEST HOOK ${FAULT_ENV}=${process.env[FAULT_ENV]}: the pipelined arm is made wrong on purpose`);
  const kept = setup.seeds.filter((s) => finished(root, s, steps, arms));
  if (kept.length) say(`kept the finished seed(s) ${kept.join(", ")}`);

  let run: RankRun | undefined;
  const signals = stopOnSignals(() => run, "ampipe compare");
  let progress: Progress | undefined;
  let done = 0;
  const logs = new Map<string, MetricsLog>();
  const logOf = (seed: number, arm: Arm) => {
    const k = `${seed}/${arm}`;
    if (!logs.has(k)) logs.set(k, new MetricsLog(armDir(root, seed, arm)));
    return logs.get(k)!;
  };
  const last: Record<Arm, string> = { baseline: "-", pipelined: "-", control: "-" };
  const onEvent = (ev: RankEvent) => {
    const seed = ev.seed as number;
    const arm = ev.arm as Arm;
    if (ev.kind === "progress" && ev.stage === "start" && ev.rank === 0 && arm) {
      const from = ev.resumed_from as number | null;
      logOf(seed, arm).truncateAfter(from ?? 0); // a killed run's later lines come again
      if (from !== null) (progress?.log ?? say)(`seed ${seed} ${arm}: resumed from the checkpoint of step ${from}`);
      done += ev.step as number;
    } else if (ev.kind === "metric" && ev.name === "param_distance" && arm) {
      logOf(seed, arm).append({ kind: "param_distance", step: ev.step, l2: ev.l2, relative: ev.relative, max_abs: ev.max_abs });
    } else if (arm && logOf(seed, arm).record(ev) === "train") {
      done++;
      last[arm] = (ev.loss as number).toFixed(4);
      progress?.update(done, { seed: String(seed), b: last.baseline, p: last.pipelined, c: last.control });
    } else if (ev.kind === "log") {
      (progress ? progress.log.bind(progress) : say)(`[rank ${ev.rank}] ${ev.arm ? `seed ${ev.seed} ${ev.arm}: ` : ""}${ev.message}`);
    }
  };
  /** Trains one seed's arms (resuming them); false when stopped by a signal. */
  const trainSeed = async (seed: number): Promise<boolean> => {
    if (signals.requested) return false; // a signal between two seeds: start no new one
    run ??= await startConfigRun(cfg.parallelism, o, { imports: [COMPARE_MODULE, TRAIN_MODULE], onEvent });
    done = 0;
    progress = makeProgress({ total: arms.length * steps, start: 0, tty: o.plain ? false : undefined, every: 20,
      format: `seed {seed} | baseline {b} | pipelined {p}${arms.includes("control") ? " | control {c}" : ""}` });
    const args = { config: cfg, plan, seeds: [seed], run_dir: resolve(root), control: arms.includes("control") };
    const results = await run.callAll("compare", args, CompareResultSchema);
    progress.stop();
    progress = undefined;
    for (const r of results[0].seeds) {
      writeFileAtomic(seedFile(root, r.seed), JSON.stringify(r, null, 2) + "\n");
      for (const arm of arms) writeFileAtomic(join(armDir(root, r.seed, arm), "train.json"), JSON.stringify({ format: "ampipe.train", version: 1, seed: r.seed, arm, ...r.arms[arm] }, null, 2) + "\n");
      if (r.fault) say(`TEST HOOK: ${r.fault}`);
    }
    return !results[0].stopped && !signals.requested;
  };
  const ensure = async (seeds: number[]): Promise<boolean> => {
    for (const seed of seeds) {
      if (finished(root, seed, steps, arms)) continue;
      if (!(await trainSeed(seed))) return false;
    }
    return true;
  };
  try {
    if (setup.tune) {
      // degree auto, first time on this directory: time the candidates on the ranks, as `ampipe train` does.
      run = await startConfigRun(cfg.parallelism, o, { imports: [COMPARE_MODULE, TRAIN_MODULE], onEvent });
      const tuned = await tuneOnRanks(run, cfg, setup.tune, root, o);
      if (signals.requested) throw new Error("stopped while timing the candidate blocks");
      for (const line of tuned.lines) say(line);
      if (tuned.plan === null) {
        say(`nothing to compare: the measured choice for the pipelined arm is the baseline block (${tuned.decision.reason}); ` +
          "set pipeline.degree (or --plan) to compare a given schedule");
        return 2;
      }
      plan = setup.plan = tuned.plan;
      setup.planSource = `${plan.variant} P=${plan.boundaries.length - 1}, chosen by timing training steps`;
      for (const seed of setup.seeds) writePlan(join(armDir(root, seed, "pipelined"), "plan.json"), plan);
      describeArms(plan);
    }
    let seeds = setup.seeds;
    if (!(await ensure(seeds))) {
      say("stopped with checkpoints; rerun the same command to continue (finished seeds are kept)");
      return signals.exitCode;
    }
    if (design) {
      // Add a seed, look, until a look decides or the last seed has been looked at (sequential.ts).
      for (;;) {
        const finals = (arm: Arm) => seeds.map((s) => finalEval(evalCurve(new MetricsLog(armDir(root, s, arm)).read() as unknown as MetricLine[]), o.lastEvals));
        const q = sequentialDecision(finals("baseline"), finals("pipelined"), o.margin, design);
        const l = q.looks[q.looks.length - 1];
        if (l) say(`look at ${l.n} seeds: TOST p ${fmtP(l.p_equivalent)}, outside-margin p ${fmtP(l.p_different)} (against ${design.alpha_per_look.toPrecision(3)} and ${(design.alpha_per_look / 2).toPrecision(3)}): ${q.decision}`);
        if (q.decision !== "continue") {
          seeds = seeds.slice(0, q.seeds);
          break;
        }
        const next = cfg.run.seed + seeds.length;
        prepareSeed(setup, next);
        seeds = [...seeds, next];
        if (!(await ensure([next]))) {
          say("stopped with checkpoints; rerun the same command to continue (finished seeds are kept, the sequence resumes where it stood)");
          return signals.exitCode;
        }
      }
    }
    const runs = seeds.map((seed) => seedRuns(root, seed, arms));
    const summary = summarize(runs, {
      steps, relativeMargin: o.margin, lastEvals: o.lastEvals, tailFraction: o.tail, dropless, envelopeFactor: o.envelopeFactor, emulated,
      sequential: design ?? undefined,
    });
    const faults = seeds.map((s) => (JSON.parse(readFileSync(seedFile(root, s), "utf8")) as SeedResult).fault).filter((f): f is string => !!f);
    const doc = {
      format: COMPARE_FORMAT, version: 2, created: new Date().toISOString(), config_path: resolve(configPath),
      plan: { variant: plan!.variant, degree: plan!.boundaries.length - 1, boundaries: plan!.boundaries, source: setup.planSource },
      capacity: dropless ? "dropless" : { factor: cfg.model.moe_expert_capacity_factor },
      dtype: cfg.model.dtype, emulated, margin: o.margin, last_evals: o.lastEvals,
      control: arms.includes("control") ? { perturbation: "every initial weight moved by one ulp (up at even flat indices, down at odd)" } : null,
      fault: faults.length ? [...new Set(faults)] : null,
      ...summary,
      tost: { ...summary.tost, margin: o.margin, margin_loss: summary.tost.margin, p_value: summary.tost.p_value, equivalent: summary.tost.equivalent },
      speedup: summary.speedup.median, speedup_spread: summary.speedup,
      runs: Object.fromEntries(seeds.map((s) => [s, Object.fromEntries(arms.map((a) => [a, join(`seed-${s}`, a)]))])),
      elapsed_s: (performance.now() - t0) / 1000,
    };
    writeFileAtomic(join(root, "compare.json"), JSON.stringify(doc, null, 2) + "\n");
    const files = writeCompareReport(root, doc, summary, cfg, runs);
    say("");
    say(summaryText(summary, emulated));
    say("");
    say(`wrote ${join(root, "compare.json")}, ${files.join(", ")}`);
    say(`done in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
    return 0;
  } catch (e) {
    progress?.stop();
    if (e instanceof CommandError && e.errors.every((x) => x.type === "ConfigError" || x.type === "DatasetError")) {
      process.stderr.write(`ampipe compare: ${e.errors[0].message}\n`);
      return 2;
    }
    if (e instanceof CompareInputError) {
      process.stderr.write(`ampipe compare: ${e.message}\n`);
      return 2;
    }
    if (!(e instanceof CommandError || e instanceof RankFailure || e instanceof BridgeError || e instanceof RunClosedError)) {
      process.stderr.write(`ampipe compare: ${(e as Error).message}\n`); // e.g. a run without the evaluations the summary needs
      return 1;
    }
    reportFailure(e, "ampipe compare");
    return signals.requested ? signals.exitCode : 1;
  } finally {
    await run?.close(); // a signal while the ranks close still reaches our handler (not the default exit)
    signals.off();
  }
}

const positiveNumber = (v: string) => {
  const n = Number(v);
  if (!Number.isFinite(n)) throw new InvalidArgumentError("expected a number");
  return n;
};
const integer = (v: string) => {
  const n = Number(v);
  if (!Number.isInteger(n)) throw new InvalidArgumentError("expected an integer");
  return n;
};

const seedsOption = (v: string): number | "auto" => {
  if (v === "auto") return "auto";
  const n = Number(v);
  if (!Number.isInteger(n)) throw new InvalidArgumentError("expected an integer or auto");
  return n;
};

export function register(program: Command): void {
  const cmd = program
    .command("compare")
    .description("train the baseline and the pipelined block (and a rounding-noise control) from one initialisation over seeds; divergence within the noise envelope, TOST equivalence of the eval curves, speed-up, report.html")
    .argument("<config>", "experiment config (.yaml, .yml or .json)")
    .option("--seeds <n|auto>", "seeds (run.seed, run.seed + 1, ...), or auto: add seeds until the final eval loss comparison is decided", seedsOption, 3)
    .option("--max-seeds <n>", `with --seeds auto: the most seeds (default ${DEFAULT_MAX_SEEDS})`, integer)
    .option("--steps <n>", "training steps per run (default: train.steps)", positiveInt)
    .option("--margin <m>", "TOST equivalence margin, a fraction of the baseline's eval loss", positiveNumber, 0.01)
    .option("--last-evals <k>", "a run's final eval loss is the mean of its last k evaluations", integer, 1)
    .option("--tail <fraction>", "the tail-mean endpoint: mean eval loss over this last fraction of the steps", positiveNumber, 0.5)
    .option("--control", "train the control arm (the baseline nudged by one ulp): the noise envelope (default with dropless routing)")
    .option("--no-control", "do not train the control arm")
    .option("--envelope-factor <k>", "dropless goal: the pipelined arm's divergence within k x the control's", positiveNumber, 10)
    .option("--plan <file>", "the pipelined arm's plan (default: planned from the config)")
    .option("--out <dir>", "output directory (default: run.output_dir)")
    .option("--fresh", "start over: remove earlier runs of the comparison in the output directory")
    .option("--calibration <file>", "measured op times for the planner's cost model")
    .option("--plain", "progress as plain lines, also on a terminal")
    .option("--set <field=value>", "override a config field (repeatable)", (v: string, acc: string[]) => [...acc, v], []);
  addControllerOptions(addTuneOptions(cmd)).action(async (config: string, opts: CompareOptions) => {
    process.exitCode = await compareCommand(config, opts);
  });
}
