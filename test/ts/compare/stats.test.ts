// The comparison statistics against scipy 1.x on fixed numbers. The expected values were printed by
//   d = p - b; delta = m * abs(b.mean())
//   scipy.stats.ttest_1samp(d, -delta, alternative="greater").pvalue   # p_lower
//   scipy.stats.ttest_1samp(d, +delta, alternative="less").pvalue      # p_upper
//   d.mean() -/+ scipy.stats.t.ppf(0.95, n - 1) * d.std(ddof=1) / sqrt(n)   # the TOST's 90% interval
//   x.mean() -/+ scipy.stats.t.ppf(0.975, n - 1) * x.std(ddof=1) / sqrt(n)  # a 95% interval
// and the outside-margin test's by test/ts/compare/scipy_reference.py ("outside-margin:").
import { describe, expect, it } from "vitest";
import { fmtP, interval, outsideMarginTest, pairedTost } from "../../../src/compare/stats.ts";

const close = (a: number, b: number, digits = 10) => expect(a).toBeCloseTo(b, digits);

describe("comparison statistics", () => {
  it("95% interval of a mean, as scipy's t", () => {
    const r = interval([2.31, 2.35, 2.29]);
    close(r.mean, 2.3166666666666664);
    close(r.ci95![0], 2.2407750059947316);
    close(r.ci95![1], 2.392558327338602);
    expect(interval([1.5]).ci95).toBeNull();
  });

  it("TOST p-values and the 90% interval, as scipy's one-sided one-sample t-tests", () => {
    const cases: Array<[string, number[], number[], number, [number, number, number], [number, number], boolean]> = [
      ["close", [2.31, 2.35, 2.29], [2.32, 2.34, 2.30], 0.01, [0.028925591199060685, 0.04842530508661879, 0.02316666666666667], [-0.016133237202358396, 0.022799903869024626], true],
      ["shifted", [2.31, 2.35, 2.29, 2.33], [2.36, 2.41, 2.33, 2.37], 0.01, [0.00033673458606461556, 0.9926163539565614, 0.023200000000000002], [0.036234130265590844, 0.05876586973440913], false],
      ["wide", [3.0, 3.5], [3.1, 3.3], 0.01, [0.5369690280333699, 0.33994003476126083, 0.0325], [-0.9970627272012564, 0.8970627272012563], false],
    ];
    for (const [name, b, p, m, [pl, pu, delta], [lo, hi], eq] of cases) {
      const r = pairedTost(b, p, m);
      close(r.margin, delta);
      close(r.p_lower!, pl, 8);
      close(r.p_upper!, pu, 8);
      close(r.p_value!, Math.max(pl, pu), 8);
      close(r.ci90![0], lo, 8);
      close(r.ci90![1], hi, 8);
      expect(r.equivalent, name).toBe(eq);
    }
  });

  it("degenerate cases: identical differences, one seed, a bad margin", () => {
    const same = pairedTost([2, 3, 4], [2, 3, 4], 0.01);
    expect(same).toMatchObject({ p_value: 0, equivalent: true, mean_difference: 0 });
    expect(pairedTost([2, 3], [2.5, 3.5], 0.01)).toMatchObject({ p_value: 1, equivalent: false });
    expect(pairedTost([2], [2], 0.01)).toMatchObject({ p_value: null, equivalent: null, n: 1 });
    expect(() => pairedTost([2], [2], 0)).toThrow(/margin must be > 0/);
  });

  it("the outside-margin test: scipy's one-sided t-tests, each side against alpha / 2", () => {
    const shifted = outsideMarginTest([2.31, 2.35, 2.29, 2.33], [2.36, 2.41, 2.33, 2.37], 0.01);
    close(shifted.p_above!, 0.007383646043438497, 8);
    close(shifted.p_below!, 0.9996632654139354, 8);
    expect(shifted).toMatchObject({ different: true, p_value: shifted.p_above });
    const close3 = outsideMarginTest([2.31, 2.35, 2.29], [2.32, 2.34, 2.30], 0.01);
    close(close3.p_above!, 0.9515746949133812, 8);
    close(close3.p_below!, 0.9710744088009393, 8);
    expect(close3.different).toBe(false);
    expect(outsideMarginTest([2, 3], [2.5, 3.5], 0.01)).toMatchObject({ p_value: 0, different: true }); // sd 0, outside
    expect(outsideMarginTest([2, 3], [2, 3], 0.01)).toMatchObject({ p_value: 1, different: false });
    expect(outsideMarginTest([2], [2], 0.01)).toMatchObject({ p_value: null, different: null });
    expect([fmtP(0.0463), fmtP(1.08e-6), fmtP(0), fmtP(null)]).toEqual(["0.0463", "1.08e-6", "0.00", "–"]);
  });
});
