// `ampipe compare <config>`: does the pipelined block train like the baseline? Trains both arms
// from one initialisation and data order over N seeds (steps interleaved ABBA on the same ranks),
// then reports per-step loss differences, final eval losses with intervals, a TOST equivalence
// test, throughput and speed-up: compare.json, summary.md, report.html (docs/compare.md).
import { existsSync, readFileSync, rmSync } from "node:fs";
import { join, resolve } from "node:path";
import { Command, InvalidArgumentError } from "commander";
import { BridgeError, CommandError, RankFailure, RunClosedError, type RankEvent, type RankRun } from "../bridge/index.ts";
import { loadConfig, type ExperimentConfig } from "../config/index.ts";
import { ARMS, summarize, tostSentence, type Arm, type CompareSummary, type SeedRuns } from "../compare/summary.ts";
import { writeCompareReport } from "../compare/report.ts";
import { type Plan } from "../plan/ir.ts";
import { readPlan, writeFileAtomic, writePlan } from "../plan/io.ts";
import { resolveDataset } from "../train/dataset.ts";
import { makeProgress, type Progress } from "../train/progress.ts";
import { MetricsLog, prepareRunDir } from "../train/rundir.ts";
import { stopOnSignals } from "../train/signals.ts";
import { chooseBlock, tuneOnRanks, TUNE_FILE, type ChooseOptions } from "../train/choose.ts";
import { TRAIN_MODULE } from "../train/results.ts";
import type { TuneArm } from "../train/tune.ts";
import { startConfigRun } from "../bridge/start.ts";
import { addControllerOptions, addTuneOptions, positiveInt, reportFailure, type ControllerCliOptions } from "./options.ts";
import { lockRunDir } from "../train/lock.ts";

export const COMPARE_MODULE = "ampipe.train.compare";
export const COMPARE_FORMAT = "ampipe.compare";
/** The issue's goal for dropless fp32 on CPU: the arms compute the same function. */
export const GOAL_MAX_DELTA = 1e-4;

export interface CompareOptions
  extends ControllerCliOptions, ChooseOptions {
  seeds: number;
  steps?: number;
  margin: number;
  lastEvals: number;
  plan?: string;
  out?: string;
  fresh?: boolean;
  set: string[];
  calibration?: string;
  plain?: boolean;
}

export class CompareInputError extends Error {}

interface SeedResult {
  seed: number; stopped: boolean;
  arms: Record<Arm, { step: number; steps: number; median_tokens_per_s: number | null; final: unknown; last_eval: unknown }>;
  parameter_distance: SeedRuns["parameter_distance"];
}

const armDir = (root: string, seed: number, arm: Arm) => join(root, `seed-${seed}`, arm);
const seedFile = (root: string, seed: number) => join(root, `seed-${seed}`, "seed.json");

function checkOptions(o: CompareOptions): void {
  if (!Number.isInteger(o.seeds) || o.seeds < 1) throw new CompareInputError(`--seeds: must be an integer >= 1; got ${o.seeds}`);
  if (!(o.margin > 0)) throw new CompareInputError(`--margin: must be > 0 (a fraction of the baseline's final eval loss, e.g. 0.01); got ${o.margin}`);
  if (!Number.isInteger(o.lastEvals) || o.lastEvals < 1) throw new CompareInputError(`--last-evals: must be an integer >= 1; got ${o.lastEvals}`);
}

export interface CompareSetup {
  cfg: ExperimentConfig; root: string;
  /** The pipelined arm's plan; null while it is still to be chosen by timing on the ranks (`tune`). */
  plan: Plan | null; planSource: string; seeds: number[]; tune: TuneArm[] | null;
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
  if (o.fresh) for (const f of ["compare.json", "summary.md", "report.html", TUNE_FILE, "calibration.json"]) rmSync(join(root, f), { force: true });
  // The root holds the config every run shares (more seeds later extend the same comparison).
  prepareRunDir(root, cfg as unknown as Record<string, unknown>, o.fresh ?? false);
  // The pipelined arm's block is chosen as `ampipe train` chooses it (degree auto: timed on the
  // ranks first, that decision kept in the root for reruns).
  const choice = chooseBlock(cfg, o, root, existsSync(join(root, TUNE_FILE)));
  if (choice.plan === null && choice.tune === null)
    throw new CompareInputError(`the pipelined arm would train the baseline block: ${choice.source}; nothing to compare (set pipeline.degree, or --plan)`);
  if (choice.plan) checkPipelined(choice.plan, choice.source);
  const seeds = [...Array(o.seeds).keys()].map((i) => cfg.run.seed + i);
  if (o.fresh) for (const s of seeds) rmSync(join(root, `seed-${s}`), { recursive: true, force: true });
  for (const seed of seeds) {
    for (const arm of ARMS) {
      const dir = armDir(root, seed, arm);
      prepareRunDir(dir, { ...cfg, run: { ...cfg.run, seed, output_dir: dir } } as unknown as Record<string, unknown>, false);
    }
  }
  const setup = { cfg, root, plan: choice.plan, planSource: choice.source, seeds, tune: choice.tune };
  if (choice.plan) writeArmPlans(setup, choice.plan);
  return setup;
}

function writeArmPlans(setup: CompareSetup, plan: Plan): void {
  for (const seed of setup.seeds) writePlan(join(armDir(setup.root, seed, "pipelined"), "plan.json"), plan);
}

function finished(root: string, seed: number, steps: number): boolean {
  if (!existsSync(seedFile(root, seed))) return false;
  const r = JSON.parse(readFileSync(seedFile(root, seed), "utf8")) as SeedResult;
  return !r.stopped && ARMS.every((a) => r.arms[a].step === steps);
}

const fmt = (v: number, d = 4) => v.toFixed(d);

export function summaryText(s: CompareSummary, emulated: string | null): string {
  const L: string[] = [];
  L.push(`seeds ${s.seeds.join(", ")}; ${s.steps} steps per run`);
  L.push(`largest per-step |Δloss|: ${s.per_step_max_abs_delta.overall.toExponential(2)} (seed ${s.per_step_max_abs_delta.at.seed}, step ${s.per_step_max_abs_delta.at.step})`);
  for (const arm of ARMS) {
    const a = s.arms[arm];
    const ci = a.final_eval.ci95 ? ` (95% CI ${fmt(a.final_eval.ci95[0])} .. ${fmt(a.final_eval.ci95[1])})` : "";
    const t = a.throughput.tokens_per_s;
    L.push(`${arm.padEnd(10)} final eval loss ${fmt(a.final_eval.mean)}${ci}; ${t.median.toFixed(0)} tokens/s (IQR ${t.q1.toFixed(0)} .. ${t.q3.toFixed(0)})`);
  }
  const d = s.difference;
  L.push(`difference (pipelined - baseline): ${d.mean.toExponential(2)}${d.ci95 ? ` (95% CI ${d.ci95[0].toExponential(2)} .. ${d.ci95[1].toExponential(2)})` : ""}`);
  L.push(tostSentence(s.tost));
  L.push(`speed-up (median of per-step ratios, step 1 of each run left out): ${s.speedup.median.toFixed(3)}x (IQR ${s.speedup.q1.toFixed(3)} .. ${s.speedup.q3.toFixed(3)}); ${emulated ? `comm EMULATED (${emulated})` : "real communication"}`);
  for (const g of s.goals) L.push(`goal ${g.met === null ? "n/a" : g.met ? "MET" : "MISSED"}: ${g.goal}: ${g.detail}`);
  return L.join("\n");
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
  const { cfg, root, seeds } = setup;
  let plan = setup.plan;
  const steps = cfg.train.steps;
  const emu = cfg.pipeline.emulated_comm;
  const emulated = emu ? `${emu.world_size}-way all-to-all, ${emu.latency_us} us + bytes / ${emu.bandwidth_gbps} GB/s` : null;
  const describeArms = (p: Plan) => say(`arms: baseline vs pipelined (${p.variant}, P=${p.boundaries.length - 1}, boundaries [${p.boundaries.join(", ")}], ${setup.planSource}); ` +
    `${seeds.length} seed(s) x ${steps} steps; capacity ${cfg.model.moe_expert_capacity_factor === null ? "dropless" : `factor ${cfg.model.moe_expert_capacity_factor}`}; ${cfg.model.dtype}` +
    (emulated ? `; comm EMULATED (${emulated})` : ""));
  if (plan) describeArms(plan);
  else say(`pipelined arm: pipeline.degree auto: timing the baseline and ${setup.tune!.length - 1} planned candidate(s) in training steps first`);
  const todo = seeds.filter((s) => !finished(root, s, steps));
  if (todo.length < seeds.length) say(`kept the finished seed(s) ${seeds.filter((s) => !todo.includes(s)).join(", ")}`);

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
  const last: Record<Arm, string> = { baseline: "-", pipelined: "-" };
  const onEvent = (ev: RankEvent) => {
    const seed = ev.seed as number;
    const arm = ev.arm as Arm;
    if (ev.kind === "progress" && ev.stage === "start" && ev.rank === 0 && arm) {
      const from = ev.resumed_from as number | null;
      logOf(seed, arm).truncateAfter(from ?? 0); // a killed run's later lines come again
      if (from !== null) (progress?.log ?? say)(`seed ${seed} ${arm}: resumed from the checkpoint of step ${from}`);
      done += ev.step as number;
      progress ??= makeProgress({ total: todo.length * 2 * steps, start: 0, tty: o.plain ? false : undefined, every: 20,
        format: "seed {seed} | baseline {b} | pipelined {p}" });
    } else if (arm && logOf(seed, arm).record(ev) === "train") {
      done++;
      last[arm] = (ev.loss as number).toFixed(4);
      progress?.update(done, { seed: String(seed), b: last.baseline, p: last.pipelined });
    } else if (ev.kind === "log") {
      (progress ? progress.log.bind(progress) : say)(`[rank ${ev.rank}] ${ev.arm ? `seed ${ev.seed} ${ev.arm}: ` : ""}${ev.message}`);
    }
  };
  try {
    if (todo.length) {
      const par = cfg.parallelism;
      run = await startConfigRun(par, o, { imports: [COMPARE_MODULE, TRAIN_MODULE], onEvent },
      );
      if (setup.tune) {
        const tuned = await tuneOnRanks(run, cfg, setup.tune, root, o);
        if (signals.requested) throw new Error("stopped while timing the candidate blocks");
        for (const line of tuned.lines) say(line);
        if (tuned.plan === null) {
          say(`nothing to compare: the measured choice for the pipelined arm is the baseline block (${tuned.decision.reason}); ` +
            "set pipeline.degree (or --plan) to compare a given schedule");
          return 2;
        }
        plan = tuned.plan;
        setup.planSource = `${plan.variant} P=${plan.boundaries.length - 1}, chosen by timing training steps`;
        writeArmPlans(setup, plan);
        describeArms(plan);
      }
      const args = { config: cfg, plan, seeds: todo, run_dir: resolve(root) };
      const results = (await Promise.all([...Array(run.worldSize).keys()].map((r) => run!.request(r, "compare", args)))) as Array<{ seeds: SeedResult[]; stopped: boolean }>;
      progress?.stop();
      for (const r of results[0].seeds) {
        writeFileAtomic(seedFile(root, r.seed), JSON.stringify(r, null, 2) + "\n");
        for (const arm of ARMS) writeFileAtomic(join(armDir(root, r.seed, arm), "train.json"), JSON.stringify({ format: "ampipe.train", version: 1, seed: r.seed, arm, ...r.arms[arm] }, null, 2) + "\n");
      }
      if (results[0].stopped) {
        say(`stopped with checkpoints; rerun the same command to continue (finished seeds are kept)`);
        return signals.exitCode;
      }
    }
    const runs: SeedRuns[] = seeds.map((seed) => ({
      seed,
      lines: Object.fromEntries(ARMS.map((a) => [a, logOf(seed, a).read()])) as unknown as SeedRuns["lines"],
      parameter_distance: (JSON.parse(readFileSync(seedFile(root, seed), "utf8")) as SeedResult).parameter_distance,
    }));
    const dropless = cfg.model.moe_expert_capacity_factor === null;
    const summary = summarize(runs, {
      steps, relativeMargin: o.margin, lastEvals: o.lastEvals, dropless: dropless && cfg.model.dtype === "fp32" && cfg.parallelism.device === "cpu",
      goalMaxDelta: GOAL_MAX_DELTA, emulated,
    });
    const ran = plan ?? readPlan(join(armDir(root, seeds[0], "pipelined"), "plan.json")); // every seed had run before
    const doc = {
      format: COMPARE_FORMAT, version: 1, created: new Date().toISOString(), config_path: resolve(configPath),
      plan: { variant: ran.variant, degree: ran.boundaries.length - 1, boundaries: ran.boundaries, source: setup.planSource },
      capacity: dropless ? "dropless" : { factor: cfg.model.moe_expert_capacity_factor },
      dtype: cfg.model.dtype, emulated, margin: o.margin, last_evals: o.lastEvals,
      ...summary,
      tost: { ...summary.tost, margin: o.margin, margin_loss: summary.tost.margin, p_value: summary.tost.p_value, equivalent: summary.tost.equivalent },
      speedup: summary.speedup.median, speedup_spread: summary.speedup,
      runs: Object.fromEntries(seeds.map((s) => [s, Object.fromEntries(ARMS.map((a) => [a, join(`seed-${s}`, a)]))])),
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
    if (!(e instanceof CommandError || e instanceof RankFailure || e instanceof BridgeError || e instanceof RunClosedError)) {
      process.stderr.write(`ampipe compare: ${(e as Error).message}\n`); // e.g. a run without the evaluations the summary needs
      return 1;
    }
    reportFailure(e, "ampipe compare");
    return signals.requested ? signals.exitCode : 1;
  } finally {
    signals.off();
    await run?.close();
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

export function register(program: Command): void {
  const cmd = program
    .command("compare")
    .description("train the baseline and the pipelined block from one initialisation over seeds; loss differences, TOST equivalence, speed-up, report.html")
    .argument("<config>", "experiment config (.yaml, .yml or .json)")
    .option("--seeds <n>", "seeds (run.seed, run.seed + 1, ...)", integer, 3)
    .option("--steps <n>", "training steps per run (default: train.steps)", positiveInt)
    .option("--margin <m>", "TOST equivalence margin, a fraction of the baseline's final eval loss", positiveNumber, 0.01)
    .option("--last-evals <k>", "a run's final eval loss is the mean of its last k evaluations", integer, 1)
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
