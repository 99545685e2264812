// What `ampipe compare` concludes from its runs' metric lines (docs/compare.md): per-step loss
// differences, final eval losses per seed and arm, the TOST, throughput and speed-up.
import { quantile } from "simple-statistics";
import { interval, pairedTost, type Interval, type Tost } from "./stats.ts";

export const ARMS = ["baseline", "pipelined"] as const;
export type Arm = (typeof ARMS)[number];

export interface MetricLine { kind: string; step: number; loss: number; step_ms?: number; tokens_per_s?: number }

export interface SeedRuns {
  seed: number;
  lines: Record<Arm, MetricLine[]>;
  /** ‖θ_pipelined − θ_baseline‖ at the end, from the ranks. */
  parameter_distance: { l2: number; relative: number; max_abs: number } | null;
}

export interface CompareOptions {
  steps: number;
  relativeMargin: number;
  /** Final eval loss = mean of the last K evaluations of a run. */
  lastEvals: number;
  /** Routing drops no token (and fp32 on CPU): the arms compute the same function. */
  dropless: boolean;
  goalMaxDelta: number;
  emulated: string | null;
}

export interface Spread { median: number; q1: number; q3: number; n: number }

const spread = (xs: number[]): Spread => ({ median: quantile(xs, 0.5), q1: quantile(xs, 0.25), q3: quantile(xs, 0.75), n: xs.length });

export interface CompareSummary {
  seeds: number[];
  steps: number;
  per_step_max_abs_delta: { per_seed: Record<string, number>; overall: number; at: { seed: number; step: number } };
  per_step_abs_delta: Record<string, Array<[number, number]>>;
  arms: Record<Arm, {
    final_eval_loss: Record<string, number>;
    final_eval: Interval;
    tokens_per_s: Record<string, number>;
    throughput: { tokens_per_s: Spread; step_ms: Spread };
  }>;
  difference: Interval;
  tost: Tost;
  speedup: Spread & { emulated: boolean; label: string };
  parameter_distance: Record<string, SeedRuns["parameter_distance"]>;
  goals: Array<{ goal: string; met: boolean | null; detail: string }>;
}

/** The mean of the last `k` eval losses of one run. */
function finalEval(lines: MetricLine[], k: number): number {
  const evals = lines.filter((l) => l.kind === "eval").sort((a, b) => a.step - b.step);
  if (!evals.length) throw new Error("a run has no evaluation (train.eval_interval > train.steps?)");
  const last = evals.slice(-k);
  return last.reduce((a, l) => a + l.loss, 0) / last.length;
}

export function summarize(runs: SeedRuns[], o: CompareOptions): CompareSummary {
  if (!runs.length) throw new Error("no finished seed to summarise");
  const seeds = runs.map((r) => r.seed);
  const perSeed: Record<string, number> = {};
  const deltas: Record<string, Array<[number, number]>> = {};
  let overall = -1;
  let at = { seed: seeds[0], step: 0 };
  const ratios: number[] = [];
  for (const r of runs) {
    const base = new Map(r.lines.baseline.filter((l) => l.kind === "train").map((l) => [l.step, l]));
    const pairs = r.lines.pipelined.filter((l) => l.kind === "train" && base.has(l.step)).sort((a, b) => a.step - b.step);
    if (pairs.length !== o.steps) throw new Error(`seed ${r.seed}: ${pairs.length} of ${o.steps} steps have both arms' losses`);
    deltas[r.seed] = pairs.map((p) => [p.step, Math.abs(p.loss - base.get(p.step)!.loss)]);
    perSeed[r.seed] = Math.max(...deltas[r.seed].map(([, d]) => d));
    for (const [step, d] of deltas[r.seed]) if (d > overall) { overall = d; at = { seed: r.seed, step }; }
    // The first step of a run pays one-time costs (allocations, the executor's set-up): left out.
    for (const p of pairs) if (p.step > 1) ratios.push(base.get(p.step)!.step_ms! / p.step_ms!);
  }
  const arms = Object.fromEntries(ARMS.map((arm) => {
    const finals = Object.fromEntries(runs.map((r) => [r.seed, finalEval(r.lines[arm], o.lastEvals)]));
    const steps = runs.flatMap((r) => r.lines[arm].filter((l) => l.kind === "train" && l.step > 1));
    const tps = Object.fromEntries(runs.map((r) => [r.seed, quantile(r.lines[arm].filter((l) => l.kind === "train" && l.step > 1).map((l) => l.tokens_per_s!), 0.5)]));
    return [arm, {
      final_eval_loss: finals,
      final_eval: interval(Object.values(finals)),
      tokens_per_s: tps,
      throughput: { tokens_per_s: spread(steps.map((l) => l.tokens_per_s!)), step_ms: spread(steps.map((l) => l.step_ms!)) },
    }];
  })) as CompareSummary["arms"];
  const b = seeds.map((s) => arms.baseline.final_eval_loss[s]);
  const p = seeds.map((s) => arms.pipelined.final_eval_loss[s]);
  const tost = pairedTost(b, p, o.relativeMargin);
  const speedup = { ...spread(ratios), emulated: o.emulated !== null, label: o.emulated ? `EMULATED (${o.emulated})` : "real communication" };
  const goals: CompareSummary["goals"] = [];
  if (o.dropless) {
    goals.push({ goal: `dropless: largest per-step |Δloss| <= ${o.goalMaxDelta.toExponential(0)}`, met: overall <= o.goalMaxDelta,
      detail: `${overall.toExponential(2)} (seed ${at.seed}, step ${at.step}) over ${seeds.length} seed(s) x ${o.steps} steps` +
        (overall > o.goalMaxDelta ? "; training amplifies rounding differences: python -m ampipe.bench.divergence <seed dir> sets them beside a baseline nudged by 1e-7" : "") });
  }
  goals.push({
    goal: `final eval loss equivalent within ±${(100 * o.relativeMargin).toFixed(2)}% (TOST, alpha ${tost.alpha})`,
    met: tost.equivalent,
    detail: tost.p_value === null ? `not shown: needs at least 2 seeds (have ${tost.n})`
      : `${tost.equivalent ? "shown" : "not shown"}: p = ${tost.p_value.toPrecision(3)}, mean difference ${tost.mean_difference.toExponential(2)}, margin ±${tost.margin.toExponential(2)}`,
  });
  return {
    seeds, steps: o.steps,
    per_step_max_abs_delta: { per_seed: perSeed, overall, at },
    per_step_abs_delta: deltas,
    arms,
    difference: interval(seeds.map((s, i) => p[i] - b[i])),
    tost,
    speedup,
    parameter_distance: Object.fromEntries(runs.map((r) => [r.seed, r.parameter_distance])),
    goals,
  };
}

/** The TOST result as one sentence. */
export function tostSentence(t: Tost): string {
  const m = `±${(100 * t.relative_margin).toFixed(2)}% of the baseline's final eval loss (±${t.margin.toPrecision(3)})`;
  if (t.p_value === null) return `Equivalence within ${m} cannot be tested with ${t.n} seed: run at least 2.`;
  return t.equivalent
    ? `The pipelined arm's final eval loss is equivalent to the baseline's within ${m}: TOST over ${t.n} seeds, p = ${t.p_value.toPrecision(3)} < ${t.alpha}.`
    : `Equivalence within ${m} is not shown: TOST over ${t.n} seeds, p = ${t.p_value.toPrecision(3)} >= ${t.alpha} (mean difference ${t.mean_difference.toPrecision(3)}).`;
}
