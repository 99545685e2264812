// What `ampipe compare` tests for equivalence (docs/compare.md): per seed, a number from each
// arm's eval-loss curve, compared paired over seeds. The final eval loss (the mean of the last K
// evaluations), the mean eval loss over the last fraction of the run, and the mean of the eval
// curve over the whole run (the area under it by the trapezoid rule, over the span it covers).
// Each gets the paired TOST, the outside-margin test and, when neither decides, the seeds that
// would at the observed mean difference and spread (power.ts).
import { seedsNeeded, type SeedsNeeded } from "./power.ts";
import { interval, outsideMarginTest, pairedTost, type Interval, type OutsideMargin, type Tost } from "./stats.ts";

export interface EvalPoint { step: number; loss: number }

export const ENDPOINTS = ["final", "tail_mean", "curve_mean"] as const;
export type EndpointName = (typeof ENDPOINTS)[number];

export interface Endpoint {
  name: EndpointName;
  /** What the number is, in words. */
  label: string;
  baseline: Record<string, number>;
  pipelined: Record<string, number>;
  difference: Interval;
  tost: Tost;
  outside: OutsideMargin;
  /** equivalent: the TOST shows it; different: the outside-margin test shows it; null: neither. */
  decided: "equivalent" | "different" | null;
  /** For an undecided comparison with >= 2 seeds: the seeds that decide it with 80% power. */
  seeds_needed: SeedsNeeded | null;
}

/** The paired tests of one endpoint over seeds (in seed order). */
export function testEndpoint(name: EndpointName, label: string, seeds: number[], baseline: number[], pipelined: number[],
  relativeMargin: number, alpha = 0.05): Endpoint {
  const tost = pairedTost(baseline, pipelined, relativeMargin, alpha);
  const outside = outsideMarginTest(baseline, pipelined, relativeMargin, alpha);
  const difference = interval(pipelined.map((p, i) => p - baseline[i]));
  const decided = tost.equivalent ? "equivalent" : outside.different ? "different" : null;
  const seeds_needed = decided === null && difference.sd !== null
    ? seedsNeeded({ mu: difference.mean, sigma: difference.sd, delta: tost.margin }, alpha)
    : null;
  const bySeed = (xs: number[]) => Object.fromEntries(seeds.map((s, i) => [s, xs[i]]));
  return { name, label, baseline: bySeed(baseline), pipelined: bySeed(pipelined), difference, tost, outside, decided, seeds_needed };
}

/** A run's eval curve, in step order. */
export function evalCurve(lines: Array<{ kind: string; step: number; loss: number }>): EvalPoint[] {
  const evals = lines.filter((l) => l.kind === "eval").map((l) => ({ step: l.step, loss: l.loss })).sort((a, b) => a.step - b.step);
  if (!evals.length) throw new Error("a run has no evaluation (train.eval_interval > train.steps?)");
  return evals;
}

/** The mean of the last k eval losses. */
export function finalEval(curve: EvalPoint[], k: number): number {
  const last = curve.slice(-k);
  return last.reduce((a, e) => a + e.loss, 0) / last.length;
}

/** The evaluations in the last `fraction` of `steps` (step > (1 − fraction)·steps). */
export function tailPoints(curve: EvalPoint[], steps: number, fraction: number): EvalPoint[] {
  return curve.filter((e) => e.step > (1 - fraction) * steps);
}

export function tailMean(curve: EvalPoint[], steps: number, fraction: number): number {
  const tail = tailPoints(curve, steps, fraction);
  if (!tail.length) throw new Error(`no evaluation in the last ${100 * fraction}% of the run's ${steps} steps (--tail, train.eval_interval)`);
  return tail.reduce((a, e) => a + e.loss, 0) / tail.length;
}

/** The area under the eval curve (trapezoids) over the steps it spans, divided by that span: its mean height. */
export function curveMean(curve: EvalPoint[]): number {
  if (curve.length === 1) return curve[0].loss;
  let area = 0;
  for (let i = 1; i < curve.length; i++) area += ((curve[i].loss + curve[i - 1].loss) / 2) * (curve[i].step - curve[i - 1].step);
  return area / (curve[curve.length - 1].step - curve[0].step);
}

export interface PerEval {
  step: number;
  n: number;
  baseline_mean: number;
  /** The margin at this evaluation: the relative margin times the baseline's mean there. */
  margin: number;
  difference: Interval;
}

/** At each evaluation step every seed has: the paired difference pipelined − baseline with its 95% interval. */
export function perEvalDifferences(curves: Array<{ baseline: EvalPoint[]; pipelined: EvalPoint[] }>, relativeMargin: number): PerEval[] {
  const steps = curves[0].baseline.map((e) => e.step)
    .filter((s) => curves.every((c) => c.baseline.some((e) => e.step === s) && c.pipelined.some((e) => e.step === s)));
  const at = (xs: EvalPoint[], s: number) => xs.find((e) => e.step === s)!.loss;
  return steps.map((s) => {
    const b = curves.map((c) => at(c.baseline, s));
    const d = curves.map((c) => at(c.pipelined, s) - at(c.baseline, s));
    const bm = b.reduce((a, x) => a + x, 0) / b.length;
    return { step: s, n: curves.length, baseline_mean: bm, margin: relativeMargin * Math.abs(bm), difference: interval(d) };
  });
}
