// The measured choice of the block for training (`pipeline.degree: auto`): the planner proposes,
// training steps decide. The ranks time real training steps of the baseline block and of the
// planner's best candidate plans on the run's own model, data and ranks (the rank command
// `train_tune`, ABBA rounds), and the run keeps the baseline unless a plan beats it by more than
// the measured noise, so `auto` never makes training slower than the baseline by more than that
// noise. As Tutel's adaptive pipelining degree, or a compiler's autotuning. docs/train.md#auto.
import { makePlan } from "../plan/generators.ts";
import type { Plan } from "../plan/ir.ts";
import type { PlanChoice } from "../plan/planner.ts";

export const TUNE_FORMAT = "ampipe.tune";

/** One arm of the timing: the baseline block (plan null) or a candidate plan. */
export interface TuneArm {
  name: string;
  plan: Plan | null;
  /** The cost model's forward+backward block time (ms), for predicted-vs-measured. */
  predictedBlockMs?: number;
}

export interface ArmTiming {
  name: string;
  /** Per measured round: the step time (ms), the slowest rank's (the ranks wait for each other every step). */
  stepMs: number[];
  medianMs: number;
  /** Median over rounds of baseline / arm in the same round (1 for the baseline). */
  speedup: number;
  speedupQuartiles: [number, number];
}

export interface TuneDecision {
  format: typeof TUNE_FORMAT;
  version: 1;
  chosen: string;
  /** Relative noise: half the interquartile range of the baseline's step times over its median, at least `minNoise`. */
  noise: number;
  arms: ArmTiming[];
  rounds: number;
  warmup: number;
  reason: string;
}

export const armName = (plan: Plan | null): string =>
  plan === null ? "baseline" : `${plan.variant} P=${plan.boundaries.length - 1} [${plan.boundaries.join(",")}]`;

/**
 * The arms to time: the baseline and the `count` best pipelined candidates of the planner (by
 * predicted block time; one per variant and degree, the sequential one-chunk plan excluded: it is
 * the baseline's schedule with the executor's cost added).
 */
export function tuneArms(choice: PlanChoice, count: number, chunkQkv: boolean, capacityScope: Plan["capacity_scope"]): TuneArm[] {
  const arms: TuneArm[] = [{ name: "baseline", plan: null, predictedBlockMs: choice.sequential.totalMs }];
  for (const c of choice.candidates) {
    if (arms.length > count) break;
    if (c.boundaries.length <= 2) continue;
    const plan = makePlan(c.variant, choice.plan.dims, { boundaries: c.boundaries, chunkQkv, capacityScope });
    arms.push({ name: armName(plan), plan, predictedBlockMs: c.totalMs });
  }
  return arms;
}

function quantile(sorted: number[], q: number): number {
  if (sorted.length === 0) return NaN;
  const pos = (sorted.length - 1) * q;
  const lo = Math.floor(pos);
  const hi = Math.ceil(pos);
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo);
}

const median = (xs: number[]) => quantile([...xs].sort((a, b) => a - b), 0.5);

/**
 * Step times per arm and rank (`rankTimes[rank][arm]` = ms per measured round) to the decision:
 * per round the slowest rank's time; each arm's paired speed-up over the baseline (median over
 * rounds of baseline/arm); the fastest arm is chosen only if its speed-up exceeds 1 + noise.
 */
export function decide(arms: TuneArm[], rankTimes: Record<string, number[]>[], warmup: number, minNoise = 0.01): TuneDecision {
  const rounds = Math.min(...arms.flatMap((a) => rankTimes.map((r) => (r[a.name] ?? []).length)));
  if (!Number.isFinite(rounds) || rounds < 1) throw new Error("tune: no measured round (was the run cancelled?)");
  const slowest = (name: string) => Array.from({ length: rounds }, (_, i) => Math.max(...rankTimes.map((r) => r[name][i])));
  const base = slowest("baseline");
  const timings: ArmTiming[] = arms.map((a) => {
    const ms = slowest(a.name);
    const ratios = ms.map((m, i) => base[i] / m).sort((x, y) => x - y);
    return { name: a.name, stepMs: ms, medianMs: median(ms), speedup: quantile(ratios, 0.5), speedupQuartiles: [quantile(ratios, 0.25), quantile(ratios, 0.75)] };
  });
  const sb = [...base].sort((a, b) => a - b);
  const noise = Math.max(minNoise, (quantile(sb, 0.75) - quantile(sb, 0.25)) / 2 / quantile(sb, 0.5));
  const best = timings.filter((t) => t.name !== "baseline").reduce<ArmTiming | null>((a, t) => (a === null || t.speedup > a.speedup ? t : a), null);
  let chosen = "baseline";
  let reason: string;
  if (best === null) reason = "no pipelined candidate to time";
  else if (best.speedup > 1 + noise) {
    chosen = best.name;
    reason = `${best.name} is ${best.speedup.toFixed(3)}x the baseline, above the noise (±${(100 * noise).toFixed(1)}%)`;
  } else reason = `no plan beats the baseline by more than the noise (best ${best.name}: ${best.speedup.toFixed(3)}x, noise ±${(100 * noise).toFixed(1)}%)`;
  return { format: TUNE_FORMAT, version: 1, chosen, noise, arms: timings, rounds, warmup, reason };
}

/** The one line `ampipe train` prints about the choice. */
export function describeDecision(d: TuneDecision): string {
  const arms = d.arms.map((a) => `${a.name} ${a.medianMs.toFixed(1)} ms${a.name === "baseline" ? "" : ` (${a.speedup.toFixed(3)}x)`}`).join(", ");
  return `auto: timed ${d.rounds} training steps per block in ABBA order after ${d.warmup} warm-up: ${arms}; ` +
    `chose ${d.chosen}: ${d.reason}`;
}
