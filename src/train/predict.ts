// The planner's model of a training step, calibrated on the run's own timed steps.
//
// A training step is the work around the MoE layers (embedding, dense layers, head and loss,
// gradient sync, clipping, optimizer: measured on the baseline arm as its step time minus its
// MoE-layer time) plus `blocks_per_step` forward+backward passes of the MoE block (layers x
// micro-batches per rank). The block's time comes from the cost model, fitted (calibration.ts)
// to the op times the ranks measured while timing the candidate plans (`train_tune`: compute ops
// on the training thread, comm ops' time on their modelled stream, and each pass's makespan for
// the schedule terms). So the model sees what the step really costs here: the executor's per-op
// cost, the real collectives, the emulated delays.
import type { z } from "zod";
import type { ArmSummarySchema } from "./results.ts";
import { parseCalibration, calibrate, type CalibrationReport } from "../plan/calibration.ts";
import { predict, type CostModel } from "../plan/costs.ts";
import type { TuneArm, TuneDecision } from "./tune.ts";

/** What a rank measured of one arm while timing (py/ampipe/train/profile.py `arm_summaries`). */
/** One arm's figures from `train_tune` (its `arms`): steps, step and MoE-layer times, op and pass times. */
export type ArmSummary = z.output<typeof ArmSummarySchema>;

export interface StepPrediction {
  name: string;
  predictedBlockMs: number;
  predictedStepMs: number;
  measuredStepMs: number;
  /** (predicted - measured) / measured */
  relError: number;
  /** Calibrated on the other timed plans' steps only (a prediction), or on all of them (one plan timed). */
  heldOut: boolean;
}

export interface TrainingStepModel {
  outsideMs: number;
  blocksPerStep: number;
  model: CostModel;
  report: CalibrationReport;
  predictions: StepPrediction[];
  /** The calibration input (docs/plan.md format), for `ampipe plan --calibration`. */
  calibrationDoc: Record<string, unknown>;
}

const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;

/** The calibration runs of the pipelined arms, one per rank. */
export function calibrationDoc(arms: TuneArm[], ranks: Record<string, ArmSummary>[], device: string): Record<string, unknown> {
  const runs = arms.flatMap((a) => (a.plan === null ? [] : ranks.flatMap((r, rank) => {
    const s = r[a.name];
    if (!s || s.steps === 0) return [];
    return [{
      plan: a.plan,
      op_times_ms: s.op_ms,
      makespan_ms: { ...(s.pass_ms.forward !== undefined ? { forward: s.pass_ms.forward } : {}), ...(s.pass_ms.backward !== undefined ? { backward: s.pass_ms.backward } : {}) },
      source: `ampipe train: timed training steps of ${a.name}, rank ${rank}`,
    }];
  })));
  return { format: "ampipe.calibration", version: 1, device, runs };
}

/**
 * Fits `base` to the timed pipelined arms and predicts each one's step time from a model fitted
 * to the *other* arms' steps (leave-one-out: a prediction, not a replay; with one timed plan,
 * from its own). The baseline is measured in every tuning, so it is not predicted. Null when no
 * pipelined arm or no baseline was timed.
 */
export function modelTrainingStep(base: CostModel, arms: TuneArm[], ranks: Record<string, ArmSummary>[],
  decision: TuneDecision, device: string): TrainingStepModel | null {
  const doc = calibrationDoc(arms, ranks, device);
  if ((doc.runs as unknown[]).length === 0) return null;
  const baseline = ranks.map((r) => r.baseline).filter((s) => s && s.step_ms !== null && s.moe_layers_ms !== null);
  if (baseline.length === 0) return null;
  const outsideMs = mean(baseline.map((s) => s.step_ms! - s.moe_layers_ms!));
  const blocksPerStep = baseline[0].blocks_per_step;
  const fit = (docArms: TuneArm[]) => calibrate(base, parseCalibration(calibrationDoc(docArms, ranks, device), ".", "timed training steps"), "timed training steps");
  const { model, report } = fit(arms);
  const pipelined = arms.filter((a) => a.plan !== null && (calibrationDoc([a], ranks, device).runs as unknown[]).length > 0);
  const predictions = pipelined.map((a) => {
    const others = pipelined.filter((b) => b !== a);
    const m = others.length > 0 ? fit(others).model : model;
    const blockMs = predict(m, a.plan!).totalMs;
    const stepMs = outsideMs + blocksPerStep * blockMs;
    const measured = decision.arms.find((t) => t.name === a.name)!.medianMs;
    return { name: a.name, predictedBlockMs: blockMs, predictedStepMs: stepMs, measuredStepMs: measured, relError: (stepMs - measured) / measured, heldOut: others.length > 0 };
  });
  return { outsideMs, blocksPerStep, model, report, predictions, calibrationDoc: doc };
}

export function describePredictions(m: TrainingStepModel, chosen: string): string {
  const held = m.predictions.every((p) => p.heldOut);
  const c = m.predictions.find((p) => p.name === chosen);
  const worst = m.predictions.reduce((a, p) => (Math.abs(p.relError) > Math.abs(a.relError) ? p : a));
  const fmt = (p: StepPrediction) => `${p.predictedStepMs.toFixed(1)} ms predicted, ${p.measuredStepMs.toFixed(1)} ms measured (${p.relError >= 0 ? "+" : ""}${(100 * p.relError).toFixed(1)}%)`;
  return `training step model (${m.outsideMs.toFixed(1)} ms around the MoE layers + ${m.blocksPerStep} x the block, the block's cost model ` +
    `calibrated on ${held ? "the other timed plans' steps" : "these steps"}): ` +
    (c ? `${chosen}: ${fmt(c)}; ` : "") + `largest error over ${m.predictions.length} timed plan(s): ${worst.name}, ${(100 * worst.relError).toFixed(1)}%`;
}
