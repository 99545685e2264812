// `ampipe train <config>`: train the config's GPT-MoE on its ranks, with the baseline block
// (pipeline.degree 1) or the pipelined block (the planner's plan, or --plan), and watch it:
// a live progress bar, metrics.jsonl, TensorBoard events, checkpoints (docs/train.md).
// Rerunning the same command resumes from the newest complete checkpoint; --fresh starts over;
// Ctrl-C (SIGTERM) stops every rank after the current step, with a checkpoint, and exits 130 (143).
import { join, resolve } from "node:path";
import { Command } from "commander";
import { CommandError, type RankEvent, type RankRun } from "../bridge/index.ts";
import { ConfigError, loadConfig, type ExperimentConfig } from "../config/index.ts";
import { type Plan } from "../plan/ir.ts";
import { writeFileAtomic } from "../plan/io.ts";
import { resolveDataset } from "../train/dataset.ts";
import { makeProgress, type Progress } from "../train/progress.ts";
import { stopOnSignals } from "../train/signals.ts";
import { MetricsLog, prepareRunDir } from "../train/rundir.ts";
import { lockRunDir } from "../train/lock.ts";
import { prepareRunPlan } from "./run.ts";
import { addControllerOptions, positiveInt, reportFailure, startConfigRun, type ControllerCliOptions } from "./ping.ts";

export const TRAIN_MODULE = "ampipe.train.worker_commands";
export const TRAIN_FORMAT = "ampipe.train";

export interface TrainOptions
  extends ControllerCliOptions {
  plan?: string;
  steps?: number;
  out?: string;
  fresh?: boolean;
  set: string[];
  calibration?: string;
  /** Progress as plain lines even on a terminal. */
  plain?: boolean;
}

/** What each rank's `train` command returns (py/ampipe/train/loop.py Trainer.run). */
export interface TrainResult {
  rank: number; step: number; steps: number; stopped: boolean; resumed_from: number | null;
  last_checkpoint: number | null; pipelined: boolean; steps_run: number;
  final: Record<string, number | boolean | null> | null;
  last_eval: { step: number; loss: number; ppl: number } | null;
  median_step_ms: number | null; median_tokens_per_s: number | null;
}

export interface TrainSetup {
  cfg: ExperimentConfig;
  outDir: string;
  plan: Plan | null;
  planSource: string;
  resuming: boolean;
}

const fmt = (v: unknown, digits = 4) => (typeof v === "number" ? (Math.abs(v) >= 1000 ? v.toFixed(0) : v.toFixed(digits)) : String(v));

/** Everything checked and written before a rank starts: config, dataset, plan, run directory. */
export function prepareTraining(configPath: string, o: TrainOptions): TrainSetup {
  // The options are overrides like any --set, so the schema checks them with the rest.
  const set = [...o.set, ...(o.steps !== undefined ? [`train.steps=${o.steps}`] : [])];
  const cfg = loadConfig(configPath, set);
  if (o.out !== undefined) cfg.run.output_dir = o.out;
  const data = resolveDataset(cfg);
  cfg.data.path = data.prefix;
  if (data.built) process.stdout.write(`built the default dataset ${data.prefix} (Brown Corpus, ${cfg.data.tokenizer} tokenizer) in ${data.seconds.toFixed(1)} s\n`);
  const outDir = cfg.run.output_dir;
  lockRunDir(outDir, "ampipe train"); // held until this process exits
  const resuming = prepareRunDir(outDir, cfg as unknown as Record<string, unknown>, o.fresh ?? false);
  let plan: Plan | null = null;
  let planSource = "baseline (pipeline.degree 1)";
  if (o.plan || cfg.pipeline.degree !== 1) {
    const planned = prepareRunPlan(configPath, cfg, { set: o.set, plan: o.plan, calibration: o.calibration }, outDir);
    if (planned.source === "planner" && planned.plan.variant === "sequential") {
      // Nothing to pipeline: the plain layer does the same without the executor's overhead.
      planSource = "baseline (the planner chose the sequential schedule for these dims)";
    } else {
      plan = planned.plan;
      planSource = planned.source === "planner" ? "planned" : `from ${planned.source}`;
    }
  }
  return { cfg, outDir, plan, planSource, resuming };
}

/** Runs `ampipe train`; returns the exit code (0 done, 1 failed, 2 bad input, 130/143 stopped by Ctrl-C/SIGTERM). */
export async function trainCommand(configPath: string, o: TrainOptions): Promise<number> {
  const t0 = performance.now();
  const say = (s: string) => process.stdout.write(s + "\n");
  let setup: TrainSetup;
  try {
    setup = prepareTraining(configPath, o);
  } catch (e) {
    // Everything here is input: the config, the dataset, the run directory, the plan file.
    process.stderr.write(`${e instanceof ConfigError ? "" : "ampipe train: "}${(e as Error).message}\n`);
    return 2;
  }
  const { cfg, outDir, plan } = setup;
  const P = plan ? plan.boundaries.length - 1 : 1;
  say(`block: ${plan ? `pipelined, ${plan.variant} P=${P}, boundaries [${plan.boundaries.join(", ")}] (${setup.planSource})` : setup.planSource}` +
    (cfg.pipeline.emulated_comm ? `; comm EMULATED (${cfg.pipeline.emulated_comm.world_size}-way, ${cfg.pipeline.emulated_comm.bandwidth_gbps} GB/s)` : ""));
  say(`data: ${cfg.data.path} (split ${cfg.data.split}); ${cfg.train.steps} steps of ${cfg.train.global_batch_size} x ${cfg.model.seq_length} tokens; model dtype ${cfg.model.dtype}`);
  say(`run directory: ${outDir}${setup.resuming ? " (resuming)" : ""}`);

  const metrics = new MetricsLog(outDir);
  let progress: Progress | undefined;
  let lastEval = "";
  const onEvent = (ev: RankEvent) => {
    if (ev.kind === "progress" && ev.stage === "start" && ev.rank === 0) {
      // Lines of steps after the run's starting point are a killed run's: they come again.
      const from = ev.resumed_from as number | null;
      const dropped = metrics.truncateAfter(from ?? 0);
      if (from !== null || dropped)
        say(`${from !== null ? `resumed from the checkpoint of step ${from}` : "no complete checkpoint: starting from step 0"}` +
          (dropped ? ` (dropped ${dropped} metrics.jsonl lines of later steps)` : ""));
      progress = makeProgress({
        total: ev.steps as number, start: ev.step as number, tty: o.plain ? false : undefined, every: 10,
        format: "loss {loss} | eval {eval} | {tps} tok/s | lr {lr}",
      });
    } else if (metrics.record(ev) === "train") {
      progress?.update(ev.step as number, { loss: fmt(ev.loss), eval: lastEval || "-", tps: fmt(ev.tokens_per_s, 0), lr: (ev.lr as number).toExponential(2) });
    } else if (ev.kind === "metric" && ev.name === "eval") {
      lastEval = fmt(ev.loss);
      progress?.log(`eval at step ${ev.step}: loss ${fmt(ev.loss)}, perplexity ${fmt(ev.ppl, 2)}`);
    } else if (ev.kind === "checkpoint" && ev.rank === 0) {
      progress?.log(`checkpoint: step ${ev.step} -> ${ev.path}`);
    } else if (ev.kind === "log") {
      (progress ? progress.log.bind(progress) : say)(`[rank ${ev.rank}] ${ev.message}`);
    }
  };

  let run: RankRun | undefined;
  const signals = stopOnSignals(() => run, "ampipe train");
  try {
    const par = cfg.parallelism;
    run = await startConfigRun(par, o, { imports: [TRAIN_MODULE], onEvent },
    );
    const r0 = run.ranks[0];
    say(`${run.worldSize} ranks ready (torch ${r0.torch}, ${r0.backend ?? "no dist"} on ${r0.device}; expert-parallel size ${par.expert_model_parallel_size})`);
    const args = { config: cfg, plan, run_dir: resolve(outDir) };
    const results = (await Promise.all([...Array(run.worldSize).keys()].map((r) => run!.request(r, "train", args)))) as TrainResult[];
    progress?.stop();
    const r = results[0];
    const doc = {
      format: TRAIN_FORMAT, version: 1, created: new Date().toISOString(), config_path: resolve(configPath),
      block: plan ? { pipelined: true, variant: plan.variant, degree: P, boundaries: plan.boundaries, plan: "plan.json" } : { pipelined: false },
      emulated: cfg.pipeline.emulated_comm ? { ...cfg.pipeline.emulated_comm } : null,
      device: r0.device, backend: r0.backend, torch: r0.torch, world_size: run.worldSize,
      ...r, elapsed_s: (performance.now() - t0) / 1000,
    };
    writeFileAtomic(join(outDir, "train.json"), JSON.stringify(doc, null, 2) + "\n");
    const f = r.final;
    if (f) say(`step ${r.step}/${r.steps}: loss ${fmt(f.loss)} (lm ${fmt(f.lm_loss)}, aux ${fmt(f.aux_loss)}, z ${fmt(f.z_loss)}), ` +
      `median ${fmt(r.median_tokens_per_s, 0)} tokens/s${cfg.pipeline.emulated_comm ? " (EMULATED comm)" : ""}`);
    if (r.last_eval) say(`eval loss ${fmt(r.last_eval.loss)}, perplexity ${fmt(r.last_eval.ppl, 2)} (step ${r.last_eval.step})`);
    say(`wrote ${join(outDir, "metrics.jsonl")}, ${join(outDir, "tb")}/, ${join(outDir, "checkpoints")}/ and ${join(outDir, "train.json")}`);
    if (r.stopped) {
      say(`stopped at step ${r.step} with a checkpoint; rerun the same command to continue`);
      return signals.exitCode;
    }
    say(`done in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
    return 0;
  } catch (e) {
    progress?.stop();
    if (e instanceof CommandError && e.errors.every((x) => x.type === "ConfigError")) {
      process.stderr.write(`ampipe train: ${e.errors[0].message}\n`);
      return 2;
    }
    reportFailure(e, "ampipe train");
    return signals.requested ? signals.exitCode : 1;
  } finally {
    signals.off();
    await run?.close();
  }
}

export function register(program: Command): void {
  const cmd = program
    .command("train")
    .description("train the config's GPT-MoE on its ranks, baseline (pipeline.degree 1) or pipelined; resumes a run directory")
    .argument("<config>", "experiment config (.yaml, .yml or .json)")
    .option("--plan <file>", "pipelined block with this plan (its dims must match the config)")
    .option("--steps <n>", "training steps (default: train.steps)", positiveInt)
    .option("--out <dir>", "run directory (default: run.output_dir)")
    .option("--fresh", "start over: remove the run directory's checkpoints, metrics and TensorBoard events first")
    .option("--calibration <file>", "measured op times for the planner's cost model")
    .option("--plain", "progress as plain lines, also on a terminal")
    .option("--set <field=value>", "override a config field, e.g. --set train.lr=3e-4 (repeatable)", (v: string, acc: string[]) => [...acc, v], []);
  addControllerOptions(cmd).action(async (config: string, opts: TrainOptions) => {
    process.exitCode = await trainCommand(config, opts);
  });
}

