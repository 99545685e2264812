// What `ampipe compare` concludes from its runs' metric lines (docs/compare.md): the divergence of
// the pipelined arm (and of the control arm) from the baseline step by step with the noise
// envelope, the equivalence tests of the eval-loss curves (final, tail mean, whole-curve mean)
// with the seeds that would decide an undecided one, throughput and speed-up.
import { quantile } from "simple-statistics";
import { checkSeed, DIVERGENCES, ulp32, UNIT_ROUNDOFF_32, type Divergence, type DivergenceCurve, type SeedEnvelope } from "./envelope.ts";
import { curveMean, evalCurve, finalEval, perEvalDifferences, tailMean, testEndpoint, type Endpoint, type EndpointName, type PerEval } from "./endpoints.ts";
import { type SequentialDesign, type SequentialResult, sequentialDecision } from "./sequential.ts";
import { fmtP, interval, type Interval, type Tost } from "./stats.ts";

/** The two arms compared; the control arm, when trained, is the baseline nudged by rounding. */
export const ARMS = ["baseline", "pipelined"] as const;
export const ALL_ARMS = ["baseline", "pipelined", "control"] as const;
export type Arm = (typeof ALL_ARMS)[number];

export interface MetricLine {
  kind: string; step: number; loss: number; grad_norm?: number; step_ms?: number; tokens_per_s?: number;
  /** param_distance lines: ‖θ_arm − θ_baseline‖ / ‖θ_baseline‖ and max |θ_arm − θ_baseline|. */
  relative?: number; max_abs?: number;
}

export interface ParameterDistance { l2: number; relative: number; max_abs: number }

export interface SeedRuns {
  seed: number;
  lines: { baseline: MetricLine[]; pipelined: MetricLine[]; control?: MetricLine[] };
  /** Each arm's ‖θ_arm − θ_baseline‖ at the end, from the ranks. */
  parameter_distance: { pipelined: ParameterDistance; control?: ParameterDistance } | null;
}

export interface CompareOptions {
  steps: number;
  relativeMargin: number;
  /** Final eval loss = mean of the last K evaluations of a run. */
  lastEvals: number;
  /** The tail-mean endpoint: the evaluations in the last fraction of the steps. */
  tailFraction: number;
  /** Routing drops no token: the arms compute the same function (the envelope is the goal). */
  dropless: boolean;
  /** The envelope factor K (envelope.ts). */
  envelopeFactor: number;
  emulated: string | null;
  /** --seeds auto: the sequential design the final eval loss is decided by. */
  sequential?: SequentialDesign;
}

export interface Spread { median: number; q1: number; q3: number; n: number }

const spread = (xs: number[]): Spread => ({ median: quantile(xs, 0.5), q1: quantile(xs, 0.25), q3: quantile(xs, 0.75), n: xs.length });

/** Per seed and divergence: the steps, each arm's divergence from the baseline (control: null without it), the floor. */
export type SeedDivergence = Record<Divergence, { steps: number[]; pipelined: number[]; control: number[] | null; floor: number[] }>;

export interface CompareSummary {
  seeds: number[];
  steps: number;
  arms_trained: Arm[];
  per_step_max_abs_delta: { per_seed: Record<string, number>; overall: number; at: { seed: number; step: number } };
  per_step_abs_delta: Record<string, Array<[number, number]>>;
  divergence: Record<string, SeedDivergence>;
  envelope: { factor: number; rule: string; per_seed: Record<string, SeedEnvelope>; met: boolean } | null;
  arms: { baseline: ArmSummary; pipelined: ArmSummary; control?: ArmSummary };
  /** The final eval loss endpoint's interval of the difference and TOST (also in endpoints.final). */
  difference: Interval;
  tost: Tost;
  endpoints: Record<EndpointName, Endpoint>;
  tail_fraction: number;
  per_eval: PerEval[];
  sequential: SequentialResult | null;
  speedup: Spread & { emulated: boolean; label: string };
  parameter_distance: Record<string, SeedRuns["parameter_distance"]>;
  goals: Array<{ goal: string; met: boolean | null; detail: string }>;
}

export interface ArmSummary {
  final_eval_loss: Record<string, number>;
  final_eval: Interval;
  tokens_per_s: Record<string, number>;
  throughput: { tokens_per_s: Spread; step_ms: Spread };
}

export const ENVELOPE_RULE = "the running max of the pipelined arm's divergence from the baseline stays <= K x the running max of the control's " +
  "(each control value counted as at least one fp32 ulp of the baseline's value; 2^-24 for the relative parameter distance), " +
  "for |Δloss| and |Δgrad norm| at every step and the parameter distance at every evaluation";

const sci = (v: number) => v.toExponential(2);
/** A relative margin as a percentage (two decimals, or two significant digits below 0.01%). */
export const marginPct = (m: number) => `${100 * m >= 0.01 ? (100 * m).toFixed(2) : (100 * m).toPrecision(2)}%`;

function trainByStep(lines: MetricLine[]): Map<number, MetricLine> {
  return new Map(lines.filter((l) => l.kind === "train").map((l) => [l.step, l]));
}

// A value that is not a number (fp16's skipped steps report NaN, stored as null): two such agree,
// one such against a number is as far apart as can be (and JSON-safe).
const isNumber = (v: unknown): v is number => typeof v === "number" && !Number.isNaN(v);
const divergence = (a: number | undefined, b: number | undefined) =>
  isNumber(a) && isNumber(b) ? Math.abs(a - b) : !isNumber(a) && !isNumber(b) ? 0 : Number.MAX_VALUE;

/** The per-step and per-eval divergences of one seed. */
function seedDivergence(r: SeedRuns, steps: number): SeedDivergence {
  const base = trainByStep(r.lines.baseline);
  const arm = (lines: MetricLine[] | undefined) => (lines ? trainByStep(lines) : null);
  const pip = arm(r.lines.pipelined)!;
  const ctl = arm(r.lines.control);
  for (const [name, m] of [["pipelined", pip], ["control", ctl]] as const) {
    if (m === null) continue;
    const have = [...base.keys()].filter((s) => m.has(s)).length;
    if (have !== steps) throw new Error(`seed ${r.seed}: ${have} of ${steps} steps have both the baseline's and the ${name} arm's losses`);
  }
  const stepsList = [...base.keys()].filter((s) => pip.has(s)).sort((a, b) => a - b);
  const per = (key: "loss" | "grad_norm") => ({
    steps: stepsList,
    pipelined: stepsList.map((s) => divergence(pip.get(s)![key], base.get(s)![key])),
    control: ctl ? stepsList.map((s) => divergence(ctl.get(s)![key], base.get(s)![key])) : null,
    floor: stepsList.map((s) => (isNumber(base.get(s)![key]) ? ulp32(base.get(s)![key]!) : 0)),
  });
  // Parameter distances at each evaluation (measured when every arm stood at the same step).
  const dist = (lines: MetricLine[] | undefined) => new Map((lines ?? []).filter((l) => l.kind === "param_distance").map((l) => [l.step, l.relative!]));
  const dp = dist(r.lines.pipelined);
  const dc = dist(r.lines.control);
  const distSteps = [...dp.keys()].filter((s) => !r.lines.control || dc.has(s)).sort((a, b) => a - b);
  return {
    loss: per("loss"),
    grad_norm: per("grad_norm"),
    param_distance: {
      steps: distSteps, pipelined: distSteps.map((s) => dp.get(s)!),
      control: r.lines.control ? distSteps.map((s) => dc.get(s)!) : null, floor: distSteps.map(() => UNIT_ROUNDOFF_32),
    },
  };
}

function armSummary(runs: SeedRuns[], arm: Arm, lastEvals: number): ArmSummary {
  const lines = (r: SeedRuns) => r.lines[arm]!;
  const finals = Object.fromEntries(runs.map((r) => [r.seed, finalEval(evalCurve(lines(r)), lastEvals)]));
  // The first step of a run pays one-time costs (allocations, the executor's set-up): left out.
  const later = (r: SeedRuns) => lines(r).filter((l) => l.kind === "train" && l.step > 1);
  const steps = runs.flatMap(later);
  return {
    final_eval_loss: finals,
    final_eval: interval(Object.values(finals)),
    tokens_per_s: Object.fromEntries(runs.map((r) => [r.seed, quantile(later(r).map((l) => l.tokens_per_s!), 0.5)])),
    throughput: { tokens_per_s: spread(steps.map((l) => l.tokens_per_s!)), step_ms: spread(steps.map((l) => l.step_ms!)) },
  };
}

export function summarize(runs: SeedRuns[], o: CompareOptions): CompareSummary {
  if (!runs.length) throw new Error("no finished seed to summarise");
  const seeds = runs.map((r) => r.seed);
  const withControl = runs.every((r) => r.lines.control !== undefined);
  const armsTrained: Arm[] = withControl ? [...ALL_ARMS] : [...ARMS];
  const divergence: Record<string, SeedDivergence> = {};
  const perSeed: Record<string, number> = {};
  const deltas: Record<string, Array<[number, number]>> = {};
  let overall = -1;
  let at = { seed: seeds[0], step: 0 };
  const ratios: number[] = [];
  for (const r of runs) {
    const d = seedDivergence(r, o.steps);
    divergence[r.seed] = d;
    deltas[r.seed] = d.loss.steps.map((s, i) => [s, d.loss.pipelined[i]]);
    perSeed[r.seed] = Math.max(...d.loss.pipelined);
    for (const [step, v] of deltas[r.seed]) if (v > overall) { overall = v; at = { seed: r.seed, step }; }
    const base = trainByStep(r.lines.baseline);
    for (const p of r.lines.pipelined) if (p.kind === "train" && p.step > 1 && base.has(p.step)) ratios.push(base.get(p.step)!.step_ms! / p.step_ms!);
  }
  const envelope = withControl ? {
    factor: o.envelopeFactor, rule: ENVELOPE_RULE,
    per_seed: Object.fromEntries(seeds.map((s) => {
      const d = divergence[s];
      const curves = Object.fromEntries(DIVERGENCES.map((k) => [k, { ...d[k], control: d[k].control! } as DivergenceCurve])) as Record<Divergence, DivergenceCurve>;
      return [s, checkSeed(curves, o.envelopeFactor)];
    })),
    met: false,
  } : null;
  if (envelope) envelope.met = Object.values(envelope.per_seed).every((e) => e.met);

  const arms = Object.fromEntries(armsTrained.map((a) => [a, armSummary(runs, a, o.lastEvals)])) as CompareSummary["arms"];
  const curves = runs.map((r) => ({ baseline: evalCurve(r.lines.baseline), pipelined: evalCurve(r.lines.pipelined) }));
  const pct = (f: number) => `${Number((100 * f).toPrecision(3))}%`;
  const endpoints: Record<EndpointName, Endpoint> = {
    final: testEndpoint("final", `final eval loss (mean of the last ${o.lastEvals} evaluation(s))`, seeds,
      curves.map((c) => finalEval(c.baseline, o.lastEvals)), curves.map((c) => finalEval(c.pipelined, o.lastEvals)), o.relativeMargin),
    tail_mean: testEndpoint("tail_mean", `mean eval loss over the last ${pct(o.tailFraction)} of the steps`, seeds,
      curves.map((c) => tailMean(c.baseline, o.steps, o.tailFraction)), curves.map((c) => tailMean(c.pipelined, o.steps, o.tailFraction)), o.relativeMargin),
    curve_mean: testEndpoint("curve_mean", "mean of the eval-loss curve over the run (area under it / its span)", seeds,
      curves.map((c) => curveMean(c.baseline)), curves.map((c) => curveMean(c.pipelined)), o.relativeMargin),
  };
  const finalB = seeds.map((s) => endpoints.final.baseline[s]);
  const finalP = seeds.map((s) => endpoints.final.pipelined[s]);
  const sequential = o.sequential ? sequentialDecision(finalB, finalP, o.relativeMargin, o.sequential) : null;
  const speedup = { ...spread(ratios), emulated: o.emulated !== null, label: o.emulated ? `EMULATED (${o.emulated})` : "real communication" };

  const goals: CompareSummary["goals"] = [];
  if (o.dropless) {
    if (!envelope) {
      goals.push({ goal: "dropless: the pipelined arm within the noise envelope", met: null, detail: "not judged: no control arm (--no-control)" });
    } else {
      for (const s of seeds) goals.push(envelopeGoal(s, envelope.per_seed[s], o.envelopeFactor));
    }
  }
  for (const name of ["final", "tail_mean", "curve_mean"] as const) goals.push(endpointGoal(endpoints[name], name === "final" ? sequential : null));
  return {
    seeds, steps: o.steps, arms_trained: armsTrained,
    per_step_max_abs_delta: { per_seed: perSeed, overall, at },
    per_step_abs_delta: deltas,
    divergence, envelope,
    arms,
    difference: endpoints.final.difference,
    tost: endpoints.final.tost,
    endpoints, tail_fraction: o.tailFraction,
    per_eval: perEvalDifferences(curves, o.relativeMargin),
    sequential,
    speedup,
    parameter_distance: Object.fromEntries(runs.map((r) => [r.seed, r.parameter_distance])),
    goals,
  };
}

const DIV_LABEL: Record<Divergence, string> = { loss: "|Δloss|", grad_norm: "|Δgrad norm|", param_distance: "parameter distance" };

function envelopeGoal(seed: number, e: SeedEnvelope, factor: number): CompareSummary["goals"][number] {
  const goal = `dropless, seed ${seed}: the pipelined arm within the noise envelope (${factor}x the control's)`;
  const out = DIVERGENCES.filter((d) => !e.checks[d].met);
  if (out.length) {
    const d = out.sort((a, b) => e.checks[a].first_outside!.step - e.checks[b].first_outside!.step)[0];
    const f = e.checks[d].first_outside!;
    return { goal, met: false, detail: `left it at step ${f.step}: ${DIV_LABEL[d]} ${sci(f.pipelined)} > envelope ${sci(f.envelope)}` +
      (out.length > 1 ? ` (also ${out.filter((x) => x !== d).map((x) => DIV_LABEL[x]).join(", ")})` : "") };
  }
  const worst = DIVERGENCES.map((d) => [d, e.checks[d]] as const).sort((a, b) => b[1].worst_ratio - a[1].worst_ratio)[0];
  return { goal, met: true, detail: `closest: ${DIV_LABEL[worst[0]]} at ${worst[1].worst_ratio.toPrecision(2)}x the control's running max (step ${worst[1].worst_step ?? "-"})` };
}

/** A sentence for "what would decide it". */
export function seedsNeededSentence(e: Endpoint): string {
  const s = e.seeds_needed;
  if (!s || s.test === null) return "";
  const what = s.test === "equivalence" ? "show equivalence" : "show the difference outside the margin";
  return s.seeds === null
    ? `; more than ${s.max_seeds} seeds would be needed to ${what} at the observed mean difference and spread`
    : `; about ${s.seeds} seeds would ${what} with ${100 * s.target}% power at the observed mean difference ${sci(e.difference.mean)} and spread (sd ${sci(e.difference.sd!)})`;
}

function endpointGoal(e: Endpoint, seq: SequentialResult | null): CompareSummary["goals"][number] {
  const t = e.tost;
  const m = `±${marginPct(t.relative_margin)}`;
  if (seq) {
    const d = seq.design;
    const goal = `${e.label} equivalent within ${m} (sequential TOST, alpha ${d.alpha} over ${d.looks} look(s), ${d.alpha_per_look.toPrecision(3)} each)`;
    const last = seq.looks[seq.looks.length - 1];
    const at = last ? `at ${last.n} seeds: TOST p = ${fmtP(last.p_equivalent)}, outside-margin p = ${fmtP(last.p_different)}` : "no look yet";
    const detail = seq.decision === "equivalent" ? `shown ${at}`
      : seq.decision === "different" ? `refuted ${at} (a difference outside the margin, mean ${sci(last.mean_difference)})`
      : seq.decision === "undecided" ? `undecided after ${d.max_seeds} seeds (${at})${seedsNeededSentence(e)}`
      : `needs seed ${seq.seeds} for the next look (${at})`;
    return { goal, met: seq.decision === "equivalent" ? true : seq.decision === "continue" ? null : false, detail };
  }
  const goal = `${e.label} equivalent within ${m} (TOST, alpha ${t.alpha})`;
  if (t.p_value === null) return { goal, met: null, detail: `not testable: needs at least 2 seeds (have ${t.n})` };
  const tail = `p = ${fmtP(t.p_value)}, mean difference ${sci(t.mean_difference)}, margin ±${sci(t.margin)}`;
  if (t.equivalent) return { goal, met: true, detail: `shown: ${tail}` };
  if (e.outside.different) return { goal, met: false, detail: `refuted: a difference outside the margin is shown (outside-margin p = ${fmtP(e.outside.p_value)} < ${e.outside.alpha / 2}); ${tail}` };
  return { goal, met: false, detail: `not shown, not refuted: ${tail}${seedsNeededSentence(e)}` };
}

/** The final eval loss TOST as one sentence. */
export function tostSentence(t: Tost): string {
  const m = `±${marginPct(t.relative_margin)} of the baseline's final eval loss (±${t.margin.toPrecision(3)})`;
  if (t.p_value === null) return `Equivalence within ${m} cannot be tested with ${t.n} seed: run at least 2.`;
  return t.equivalent
    ? `The pipelined arm's final eval loss is equivalent to the baseline's within ${m}: TOST over ${t.n} seeds, p = ${fmtP(t.p_value)} < ${t.alpha}.`
    : `Equivalence within ${m} is not shown: TOST over ${t.n} seeds, p = ${fmtP(t.p_value)} >= ${t.alpha} (mean difference ${t.mean_difference.toPrecision(3)}).`;
}
