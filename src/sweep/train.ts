// What `ampipe bench train` records (docs/bench.md#ampipe-bench-train-config): one case per
// (sequence length, comm/compute ratio), each with the training step of the baseline block, the
// planner's measured choice and the Tutel-style moe-overlap schedule timed in the same ABBA
// rounds; and the break-even sequence length per ratio. Pure: no I/O, so it can be tested alone.
import type { Plan } from "../plan/ir.ts";
import type { ArmTiming } from "../train/tune.ts";
import { quartiles } from "./results.ts";

export const TRAIN_BENCH_FORMAT = "ampipe.bench-train";
export const TRAIN_MANIFEST_FILE = "bench-train.json";
/** The sequence lengths swept when neither --seq-lengths nor bench.seq_lengths says. */
export const DEFAULT_SEQ_LENGTHS = [256, 512, 1024, 2048];

/** The arms measured in a case's rounds. "planned": the planner's choice, or, when it chose the baseline, its fastest timed plan. */
export type ArmRole = "baseline" | "planned" | "moe-overlap";

export interface Spread { median: number; q1: number; q3: number }

export interface ArmResult {
  role: ArmRole;
  /** tune.ts armName: "baseline" or "<variant> P=<n> [boundaries]". */
  name: string;
  variant: string | null;
  degree: number;
  boundaries: number[] | null;
  /** Training step (ms), per round the slowest rank's; median and quartiles over rounds. */
  step_ms: Spread;
  /** Tokens of the global batch per second of step, per round; median and quartiles. */
  tokens_per_s: Spread;
  /** Paired over the baseline: per round baseline / arm, median and quartiles (1 for the baseline). */
  speedup: Spread;
  /** The training-step model's prediction (src/train/predict.ts); null where it has none. */
  predicted_step_ms: number | null;
  /** predicted / measured median - 1. */
  prediction_error: number | null;
  samples_ms: number[];
}

export interface TrainBenchCase {
  /** `s1024-r0.75` (or `s1024` when the ratio is not set): the resume key. */
  case: string;
  seq_length: number;
  /** The emulated comm/compute ratio the bandwidth was set for; null: pipeline.emulated_comm as given (or real comm). */
  comm_compute_ratio: number | null;
  status: "ok" | "error";
  error: string | null;
  interconnect: "emulated" | "real";
  /** The emulated interconnect's label, with the ratio: every figure of an emulated case is EMULATED. */
  emulated: string | null;
  latency_us: number | null;
  bandwidth_gbps: number | null;
  emulated_world_size: number | null;
  /** The baseline's training step without emulated delay (the calibration), mean over ranks of each rank's median. */
  compute: { step_ms: number; moe_layers_ms: number; blocks_per_step: number } | null;
  /** The baseline block's modelled all-to-all delay per training step (blocks_per_step x 4 all-to-alls). */
  delay_per_step_ms: number | null;
  /** The ratio that ran: delay_per_step_ms / (the baseline's MoE-layer time in the measured rounds - delay_per_step_ms). */
  comm_compute_measured: number | null;
  tokens_per_step: number;
  /** The choice as `ampipe train` makes it: the timed arms, the noise and the reason (tune.ts decide). */
  tune: { chosen: string; reason: string; noise: number; rounds: number; arms: Array<{ name: string; median_ms: number; speedup: number }> } | null;
  /** "baseline" or the chosen plan's arm name. */
  chosen: string;
  /** How moe-overlap's degree and boundaries were chosen. */
  moe_overlap_by: string | null;
  /** The measured arms: baseline, planned (absent when no pipelined plan fits), moe-overlap (absent when none fits). */
  arms: ArmResult[];
  /** The planner's choice over the baseline (paired; exactly 1 when it chose the baseline). */
  speedup: Spread | null;
  /** moe-overlap over the baseline (paired). */
  moe_overlap_speedup: Spread | null;
  /** The planner's choice over moe-overlap: per round moe-overlap / choice, median and quartiles. */
  chosen_vs_moe_overlap: Spread | null;
  /** Relative noise of the measured rounds (tune.ts decide: half the baseline's IQR over its median, at least 1%). */
  noise: number | null;
  /** The choice beats the baseline by more than the noise (speedup.median > 1 + noise). */
  beats_baseline: boolean | null;
  /** Predicted vs measured step time of the chosen plan (null when the choice is the baseline: the model predicts plans). */
  predicted_step_ms: number | null;
  measured_step_ms: number | null;
  prediction_error: number | null;
  steps: number;
  warmup: number;
  tune_steps: number;
  elapsed_s: number;
  finished: string;
}

export const caseId = (seqLength: number, ratio: number | null): string => `s${seqLength}${ratio === null ? "" : `-r${ratio}`}`;

const spread = (xs: number[]): Spread => quartiles(xs);

/** An arm's figures from its rounds (decide()'s ArmTiming: slowest rank per round, paired speed-up). */
export function armResult(role: ArmRole, plan: Plan | null, t: ArmTiming, base: ArmTiming, tokensPerStep: number, predictedStepMs: number | null): ArmResult {
  const step = spread(t.stepMs);
  return {
    role, name: t.name, variant: plan?.variant ?? null, degree: plan ? plan.boundaries.length - 1 : 1, boundaries: plan?.boundaries ?? null,
    step_ms: step,
    tokens_per_s: spread(t.stepMs.map((ms) => tokensPerStep / (ms / 1e3))),
    speedup: pairedRatio(base.stepMs, t.stepMs),
    predicted_step_ms: predictedStepMs,
    prediction_error: predictedStepMs === null ? null : predictedStepMs / step.median - 1,
    samples_ms: t.stepMs,
  };
}

/** Per round num / den, median and quartiles. */
export function pairedRatio(num: number[], den: number[]): Spread {
  if (num.length !== den.length || num.length === 0) throw new Error(`pairedRatio: ${num.length} against ${den.length} rounds`);
  return spread(num.map((n, i) => n / den[i]));
}

export interface BreakEven {
  ratio: number | null;
  /** The smallest sequence length of the sweep from which (it and every longer one) the choice beats the baseline by more than the noise; null: none. */
  seq_length: number | null;
  /** Where the planned arm's paired speed-up crosses 1 (upwards, for the last time), linear in log2(seq_length); null: no crossing inside the sweep. */
  interpolated: number | null;
  /** The sequence lengths with a finished case, in order. */
  seq_lengths: number[];
  note: string;
}

/**
 * The break-even per ratio. `seq_length` comes from the decisions measured in the rounds
 * (beats_baseline). `interpolated` uses the planned arm (the planner's choice, or its fastest timed
 * plan where it chose the baseline, so the curve is a pipelined schedule's at every length):
 * between the two neighbouring lengths where its median speed-up goes from <= 1 to > 1 and stays
 * above 1, S* = 2^(log2 S_a + (1 - x_a) / (x_b - x_a) * (log2 S_b - log2 S_a)).
 */
export function breakEven(cases: TrainBenchCase[]): BreakEven[] {
  const ratios = [...new Set(cases.map((c) => c.comm_compute_ratio))];
  return ratios.map((ratio) => {
    const ok = cases.filter((c) => c.comm_compute_ratio === ratio && c.status === "ok").sort((a, b) => a.seq_length - b.seq_length);
    const seqs = ok.map((c) => c.seq_length);
    let from: number | null = null;
    for (let i = ok.length - 1; i >= 0 && ok[i].beats_baseline; i--) from = ok[i].seq_length;
    const pts = ok.flatMap((c) => {
      const p = c.arms.find((a) => a.role === "planned");
      return p ? [{ s: c.seq_length, x: p.speedup.median }] : [];
    });
    let interpolated: number | null = null;
    let note: string;
    const lastBelow = pts.map((p) => p.x <= 1).lastIndexOf(true);
    if (pts.length === 0) note = "no finished case with a pipelined plan";
    else if (lastBelow === pts.length - 1) note = `the planner's best plan does not beat the baseline at the longest sequence length (${pts[lastBelow].s}): no crossing in the sweep`;
    else if (lastBelow === -1) note = `the planner's best plan beats the baseline at every sequence length from ${pts[0].s}: the crossing lies below the sweep`;
    else {
      const a = pts[lastBelow];
      const b = pts[lastBelow + 1];
      const la = Math.log2(a.s);
      interpolated = 2 ** (la + ((1 - a.x) / (b.x - a.x)) * (Math.log2(b.s) - la));
      note = `the planner's best plan crosses 1x between ${a.s} (${a.x.toFixed(3)}x) and ${b.s} (${b.x.toFixed(3)}x)`;
    }
    return { ratio, seq_length: from, interpolated, seq_lengths: seqs, note };
  });
}
