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

/** A p-value for people: 3 significant digits, small ones in exponent notation. */
export function fmtP(p: number | null): string {
  return p === null ? "–" : p !== 0 && p < 1e-3 ? p.toExponential(2) : p.toPrecision(3);
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

export interface OutsideMargin {
  margin: number;
  n: number;
  mean_difference: number;
  /** One-sided p-values of H0 mean(d) <= +δ (against: above the margin) and H0 mean(d) >= −δ (below). */
  p_above: number | null;
  p_below: number | null;
  /** The smaller of the two, against alpha / 2 (a two-sided test: either side may be the one). */
  p_value: number | null;
  alpha: number;
  /** A difference outside the margin shown: the (1 − alpha) interval of the mean difference lies wholly outside ±δ. */
  different: boolean | null;
}

/**
 * The test that refutes equivalence: H0 |mean(d)| <= δ against |mean(d)| > δ, as two one-sided
 * paired t-tests at alpha / 2 each, so its size is at most alpha whichever side the difference
 * lies on. Shown when the (1 − alpha) two-sided interval of the mean difference lies wholly above
 * +δ or wholly below −δ. Every difference equal (sd 0): p = 0 outside the margin, 1 inside.
 */
export function outsideMarginTest(baseline: number[], pipelined: number[], relativeMargin: number, alpha = 0.05): OutsideMargin {
  if (baseline.length !== pipelined.length) throw new Error("outsideMarginTest: the arms need one value per seed each");
  if (!(relativeMargin > 0)) throw new Error(`outsideMarginTest: the margin must be > 0; got ${relativeMargin}`);
  const n = baseline.length;
  const d = pipelined.map((p, i) => p - baseline[i]);
  const delta = relativeMargin * Math.abs(mean(baseline));
  const md = mean(d);
  const base = { margin: delta, n, mean_difference: md, alpha };
  const sd = sampleSd(d);
  if (sd === null) return { ...base, p_above: null, p_below: null, p_value: null, different: null };
  if (sd === 0) {
    const outside = Math.abs(md) > delta;
    const p = outside ? 0 : 1;
    return { ...base, p_above: md > delta ? 0 : 1, p_below: md < -delta ? 0 : 1, p_value: p, different: outside };
  }
  const se = sd / Math.sqrt(n);
  const pAbove = 1 - jStat.studentt.cdf((md - delta) / se, n - 1);
  const pBelow = jStat.studentt.cdf((md + delta) / se, n - 1);
  const p = Math.min(pAbove, pBelow);
  return { ...base, p_above: pAbove, p_below: pBelow, p_value: p, different: p < alpha / 2 };
}
