// The statistics of a convergence comparison (docs/compare.md): means with t-based 95%
// confidence intervals over seeds, the paired difference between arms, and a TOST
// equivalence test (two one-sided paired t-tests) at a relative margin. The t distribution is
// jStat's (a well-kept library), tested against scipy's values in test/ts/compare/stats.test.ts.
import jStat from "jstat";

export interface Interval {
  n: number;
  mean: number;
  sd: number | null;
  /** The 95% confidence interval of the mean; null with fewer than two samples. */
  ci95: [number, number] | null;
}

export function mean(xs: number[]): number {
  return xs.reduce((a, b) => a + b, 0) / xs.length;
}

/** Sample standard deviation (n − 1); null for n < 2. */
export function sampleSd(xs: number[]): number | null {
  if (xs.length < 2) return null;
  const m = mean(xs);
  return Math.sqrt(xs.reduce((a, x) => a + (x - m) ** 2, 0) / (xs.length - 1));
}

export function interval(xs: number[], level = 0.95): Interval {
  if (xs.length === 0) throw new Error("interval: no samples");
  const m = mean(xs);
  const sd = sampleSd(xs);
  if (sd === null) return { n: xs.length, mean: m, sd, ci95: null };
  const half = jStat.studentt.inv(1 - (1 - level) / 2, xs.length - 1) * sd / Math.sqrt(xs.length);
  return { n: xs.length, mean: m, sd, ci95: [m - half, m + half] };
}

export interface Tost {
  /** The equivalence margin in loss units (relative margin × the baseline's mean). */
  margin: number;
  relative_margin: number;
  n: number;
  /** Mean paired difference pipelined − baseline, with its 90% interval (the TOST's). */
  mean_difference: number;
  ci90: [number, number] | null;
  /** The larger of the two one-sided p-values; null when it cannot be computed (n < 2). */
  p_value: number | null;
  p_lower: number | null;
  p_upper: number | null;
  alpha: number;
  equivalent: boolean | null;
}

/**
 * TOST for paired samples: H0 mean(d) <= -δ or mean(d) >= +δ, against |mean(d)| < δ, with
 * d_i = pipelined_i − baseline_i. Each one-sided test is a paired t-test with n − 1 degrees of
 * freedom; equivalence is shown when both reject at `alpha` (p = max of the two). With every
 * difference equal (sd 0) the test degenerates: p = 0 inside the margin, 1 outside.
 */
export function pairedTost(baseline: number[], pipelined: number[], relativeMargin: number, alpha = 0.05): Tost {
  if (baseline.length !== pipelined.length) throw new Error("pairedTost: the arms need one value per seed each");
  if (!(relativeMargin > 0)) throw new Error(`pairedTost: the margin must be > 0; got ${relativeMargin}`);
  const n = baseline.length;
  const d = pipelined.map((p, i) => p - baseline[i]);
  const delta = relativeMargin * Math.abs(mean(baseline));
  const md = mean(d);
  const base = { margin: delta, relative_margin: relativeMargin, n, mean_difference: md, alpha };
  const sd = sampleSd(d);
  if (sd === null) return { ...base, ci90: null, p_value: null, p_lower: null, p_upper: null, equivalent: null };
  if (sd === 0) {
    const inside = Math.abs(md) < delta;
    const p = inside ? 0 : 1;
    return { ...base, ci90: [md, md], p_value: p, p_lower: p, p_upper: p, equivalent: inside };
  }
  const se = sd / Math.sqrt(n);
  const dof = n - 1;
  const pLower = 1 - jStat.studentt.cdf((md + delta) / se, dof); // H0: mean(d) <= -δ
  const pUpper = jStat.studentt.cdf((md - delta) / se, dof); // H0: mean(d) >= +δ
  const t = jStat.studentt.inv(1 - alpha, dof);
  const p = Math.max(pLower, pUpper);
  return { ...base, ci90: [md - t * se, md + t * se], p_value: p, p_lower: pLower, p_upper: pUpper, equivalent: p < alpha };
}
