// `ampipe train <config>`: train the config's GPT-MoE on its ranks, with the baseline block
// (pipeline.degree 1) or the pipelined block (the planner's plan, or --plan), and watch it:
// a live progress bar, metrics.jsonl, TensorBoard events, checkpoints (docs/train.md).
// Rerunning the same command resumes from the newest complete checkpoint; --fresh starts over;
// Ctrl-C (SIGTERM) stops every rank after the current step, with a checkpoint, and exits 130 (143).
import { join, resolve } from "node:path";
import { Command } from "commander";
import { CommandError, type RankEvent, type RankRun } from "../bridge/index.ts";
import { ConfigError } from "../config/index.ts";
import { type Plan } from "../plan/ir.ts";
import { writeFileAtomic } from "../plan/io.ts";
import { mergeTraces, writeBreakdown } from "../train/profile.ts";
import { prepareTraining, type TrainSetup } from "../train/prepare.ts";
import { ProfileResultSchema, TRAIN_MODULE, TrainResultSchema } from "../train/results.ts";
import { armName, type TuneDecision } from "../train/tune.ts";
import { tuneOnRanks, type ChooseOptions } from "../train/choose.ts";
import { makeProgress, type Progress } from "../train/progress.ts";
import { stopOnSignals } from "../train/signals.ts";
import { MetricsLog } from "../train/rundir.ts";
import { startConfigRun } from "../bridge/start.ts";
import { addControllerOptions, addTuneOptions, positiveInt, reportFailure, type ControllerCliOptions } from "./options.ts";

export const TRAIN_FORMAT = "ampipe.train";

export interface TrainOptions
  extends ControllerCliOptions, ChooseOptions {
  plan?: string;
  steps?: number;
  out?: string;
  fresh?: boolean;
  set: string[];
  calibration?: string;
  /** Progress as plain lines even on a terminal. */
  plain?: boolean;
  /** `--profile[=STEPS]`: profile this many steps of the baseline and the pipelined block first. */
  profile?: number | boolean;
  /** Stop after the profile. */
  profileOnly?: boolean;
}

const DEFAULT_PROFILE_STEPS = 3;

const fmt = (v: unknown, digits = 4) => (typeof v === "number" ? (Math.abs(v) >= 1000 ? v.toFixed(0) : v.toFixed(digits)) : String(v));

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
  const { cfg, outDir } = setup;
  let plan = setup.plan;
  const describeBlock = () => {
    const P = plan ? plan.boundaries.length - 1 : 1;
    return `block: ${plan ? `pipelined, ${plan.variant} P=${P}, boundaries [${plan.boundaries.join(", ")}] (${setup.planSource})` : setup.planSource}` +
      (cfg.pipeline.emulated_comm ? `; comm EMULATED (${cfg.pipeline.emulated_comm.world_size}-way, ${cfg.pipeline.emulated_comm.bandwidth_gbps} GB/s)` : "");
  };
  if (setup.tune) say(`block: pipeline.degree auto: timing the baseline and ${setup.tune.length - 1} planned candidate(s) in training steps first`);
  else say(describeBlock());
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
    let decision: TuneDecision | null = null;
    if (setup.tune) {
      const tuned = await tuneOnRanks(run, cfg, setup.tune, outDir, o);
      if (signals.requested) throw new Error("stopped while timing the candidate blocks");
      decision = tuned.decision;
      plan = tuned.plan;
      for (const line of tuned.lines) say(line);
      say(describeBlock());
    }
    if (o.profileOnly && o.profile === undefined) o.profile = true;
    if (o.profile !== undefined && o.profile !== false) {
      const steps = o.profile === true ? DEFAULT_PROFILE_STEPS : o.profile;
      const other = plan ?? setup.bestCandidate;
      const arms: Record<string, Plan | null> = { baseline: null, ...(other ? { [armName(other)]: other } : {}) };
      say(`profile: ${steps} step(s) of ${Object.keys(arms).join(" and ")}, then ${steps} more under torch.profiler`);
      const res = await run.callAll("train_profile", { config: cfg, arms, run_dir: resolve(outDir), steps }, ProfileResultSchema);
      const dir = join(outDir, "profile");
      const trace = mergeTraces(dir, res);
      const note = `${steps} step(s) per block after one warm-up, on ${run.worldSize} rank(s); ms per step, the median over ` +
        `the steps without torch.profiler, averaged over the ranks${cfg.pipeline.emulated_comm ? "; communication EMULATED" : ""}.`;
      say(writeBreakdown(dir, res, Object.keys(arms), note));
      say(`wrote ${trace} (open in https://ui.perfetto.dev), ${join(dir, "breakdown.md")} and ${join(dir, "breakdown.json")}`);
      if (o.profileOnly) return 0;
    }
    const args = { config: cfg, plan, run_dir: resolve(outDir) };
    const results = await run.callAll("train", args, TrainResultSchema);
    progress?.stop();
    const r = results[0];
    const doc = {
      format: TRAIN_FORMAT, version: 1, created: new Date().toISOString(), config_path: resolve(configPath),
      block: plan ? { pipelined: true, variant: plan.variant, degree: plan.boundaries.length - 1, boundaries: plan.boundaries, plan: "plan.json" } : { pipelined: false },
      tune: decision,
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
    await run?.close(); // a signal while the ranks close still reaches our handler (not the default exit)
    signals.off();
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
    .option("--profile [steps]", `profile STEPS (default ${DEFAULT_PROFILE_STEPS}) training steps of the baseline and the pipelined block before training: a Chrome/Perfetto trace of every rank and a breakdown (profile/ in the run directory)`, (v: string) => positiveInt(v))
    .option("--profile-only", "stop after the profile (with --profile)")

    .option("--set <field=value>", "override a config field, e.g. --set train.lr=3e-4 (repeatable)", (v: string, acc: string[]) => [...acc, v], []);
  addControllerOptions(addTuneOptions(cmd)).action(async (config: string, opts: TrainOptions) => {
    process.exitCode = await trainCommand(config, opts);
  });
}

