// Which block a training run (or a comparison's pipelined arm) uses: the baseline, a given or
// configured plan, or with `pipeline.degree: auto` the block timed fastest in training steps on
// the run's own ranks (src/train/tune.ts). `ampipe train` and `ampipe compare` share this.
//
//   before any rank starts: `chooseBlock`  (config, --plan, a kept tune.json, the planner's candidates)
//   once the ranks are up:  `tuneOnRanks`  (train_tune on every rank, the decision, the step model)
import { existsSync, readFileSync, rmSync } from "node:fs";
import { join, resolve } from "node:path";
import type { RankRun } from "../bridge/index.ts";
import type { ExperimentConfig } from "../config/index.ts";
import type { Plan } from "../plan/ir.ts";
import { readPlan, writeFileAtomic, writePlan } from "../plan/io.ts";
import { prepareRunPlan } from "../run/run-block.ts";
import { costModelFor } from "../plan/for-config.ts";
import { describePredictions, modelTrainingStep, type TrainingStepModel } from "./predict.ts";
import { TuneResultSchema } from "./results.ts";
import { decide, describeDecision, tuneArms, type TuneArm, type TuneDecision } from "./tune.ts";

export const TUNE_FILE = "tune.json";

export interface ChooseOptions {
  set: string[];
  plan?: string;
  calibration?: string;
  /** `--no-tune`: with degree auto, take the cost model's plan untimed. */
  tune?: boolean;
  tuneSteps?: number;
  tuneCandidates?: number;
}

export interface BlockChoice {
  /** The plan, or null for the baseline block (also while `tune` is still to run). */
  plan: Plan | null;
  /** Why, in words, for the first output line. */
  source: string;
  /** Arms to time on the ranks first (degree auto, no kept decision), else null. */
  tune: TuneArm[] | null;
  /** The best pipelined candidate (a profile's second arm when the baseline is chosen). */
  bestCandidate: Plan | null;
}

/**
 * Everything decided before a rank starts. `dir` holds plan.json (written here for a fixed plan)
 * and tune.json; a `resuming` run with a kept tune.json gets the block it started with.
 */
export function chooseBlock(cfg: ExperimentConfig, o: ChooseOptions, dir: string, resuming: boolean): BlockChoice {
  const tunePath = join(dir, TUNE_FILE);
  if (resuming && !o.plan && cfg.pipeline.degree === "auto" && existsSync(tunePath)) {
    // A resumed run keeps the block its first invocation measured and chose (its checkpoints are of that block).
    const d = JSON.parse(readFileSync(tunePath, "utf8")) as TuneDecision;
    const plan = d.chosen === "baseline" ? null : readPlan(join(dir, "plan.json"));
    return { plan, source: `${plan ? "pipelined" : "baseline"} (chosen by timing when the run started; ${TUNE_FILE})`, tune: null, bestCandidate: null };
  }
  let choice: BlockChoice = { plan: null, source: "baseline (pipeline.degree 1)", tune: null, bestCandidate: null };
  if (o.plan || cfg.pipeline.degree !== 1) {
    const planned = prepareRunPlan(cfg, { plan: o.plan, calibration: o.calibration }, dir);
    const fromPlanner = planned.source === "planner";
    if (fromPlanner && cfg.pipeline.degree === "auto" && o.tune !== false && planned.choice) {
      const tune = tuneArms(planned.choice, o.tuneCandidates ?? 3, cfg.pipeline.chunk_qkv, cfg.pipeline.capacity_scope);
      choice = tune.length > 1
        ? { plan: null, source: "chosen by timing training steps", tune, bestCandidate: tune[1].plan }
        : { plan: null, source: "baseline (no pipelined plan fits these dims)", tune: null, bestCandidate: null };
    } else if (fromPlanner && planned.plan.variant === "sequential") {
      // Nothing to pipeline: the plain layer does the same without the executor's overhead.
      choice = { plan: null, source: "baseline (the planner chose the sequential schedule for these dims)", tune: null, bestCandidate: null };
    } else {
      const source = !fromPlanner ? `from ${planned.source}` : cfg.pipeline.degree === "auto" ? "planned (the cost model's choice, not timed: --no-tune)" : "planned";
      choice = { plan: planned.plan, source, tune: null, bestCandidate: null };
    }
  }
  if (!choice.plan) rmSync(join(dir, "plan.json"), { force: true });
  return choice;
}

export interface Tuned {
  decision: TuneDecision;
  plan: Plan | null;
  stepModel: TrainingStepModel | null;
  /** What to print: the decision, and the step model's prediction. */
  lines: string[];
}

/**
 * Times `arms` on every rank of `run` (rank command `train_tune`), decides, and writes tune.json
 * (with the step model's predictions), calibration.json and, for a pipelined choice, plan.json in `dir`.
 */
export async function tuneOnRanks(run: RankRun, cfg: ExperimentConfig, arms: TuneArm[], dir: string, o: ChooseOptions): Promise<Tuned> {
  const byName = Object.fromEntries(arms.map((a) => [a.name, a.plan]));
  const res = await run.callAll("train_tune", {
    config: cfg, arms: byName, run_dir: resolve(dir), steps: o.tuneSteps ?? 4, warmup: 1,
  }, TuneResultSchema);
  const decision = decide(arms, res.map((r) => r.step_ms), 1);
  const plan = arms.find((a) => a.name === decision.chosen)!.plan;
  if (plan) writePlan(join(dir, "plan.json"), plan);
  const stepModel = modelTrainingStep(costModelFor(cfg, o.calibration).model, arms, res.map((r) => r.arms), decision, run.ranks[0].device);
  if (stepModel) writeFileAtomic(join(dir, "calibration.json"), JSON.stringify(stepModel.calibrationDoc) + "\n");
  writeFileAtomic(join(dir, TUNE_FILE), JSON.stringify({
    ...decision, predicted: stepModel ? { outside_ms: stepModel.outsideMs, blocks_per_step: stepModel.blocksPerStep, arms: stepModel.predictions } : null,
  }, null, 2) + "\n");
  const lines = [describeDecision(decision), ...(stepModel ? [describePredictions(stepModel, decision.chosen)] : [])];
  return { decision, plan, stepModel, lines };
}

