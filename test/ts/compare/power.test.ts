// The power calculation and the sequential procedure (--seeds auto) against scipy, and the
// sequential procedure's error rates on simulated comparisons. The scipy values were printed by
//   python3 test/ts/compare/scipy_reference.py        (scipy 1.17.1, numpy 2.4.6)
// which computes them independently (scipy.integrate.quad over scipy's chi and normal
// distributions, scipy's noncentral t, numpy Monte Carlo, scipy.stats.ttest_1samp). jStat's t
// distribution (its log-gamma) is accurate to about 1e-9, hence 7 digits.
import { describe, expect, it } from "vitest";
import { outsidePower, seedsNeeded, tostPower } from "../../../src/compare/power.ts";
import { sequentialDecision, sequentialDesign } from "../../../src/compare/sequential.ts";

// [n, mu, sigma, delta, exact (quad), noncentral-t approximation, Monte Carlo (400000 experiments)]
const TOST: Array<[number, number, number, number, number, number, number]> = [
  [3, 0.0, 0.02, 0.0238, 0.1955121929821625, -0.20331654290283363, 0.194465],
  [5, 0.005, 0.01, 0.02, 0.8596265108988446, 0.8594580989791476, 0.8599925],
  [10, -0.01, 0.02, 0.025, 0.7062835837014384, 0.7062834955751325, 0.7067525],
  [20, 0.0, 0.05, 0.03, 0.6533152857876319, 0.6532790374752642, 0.6532675],
  [2, 0.0, 0.001, 0.02, 0.9999851556294868, 0.9999806788903258, 0.9999825],
  [8, 0.012, 0.015, 0.024, 0.6527233288604751, 0.6527233183617529, 0.654005],
];
// [n, mu, sigma, delta, power of the outside-margin test (scipy's noncentral t, exact)]
const OUTSIDE: Array<[number, number, number, number, number]> = [
  [4, 0.05, 0.02, 0.02, 0.532786594266404], [8, -0.03, 0.02, 0.02, 0.23140738046759327],
  [3, 0.1, 0.01, 0.02, 0.9999182049062195], [6, 0.021, 0.03, 0.02, 0.029235262709565064],
];
// [mu, sigma, delta, the fewest seeds with 80% power] (a scan over n with the powers above)
const NEEDED: Array<[number, number, number, number]> = [
  [-0.00538, 0.0704, 0.024, 93], [0.0, 0.02, 0.0238, 8], [0.005, 0.01, 0.02, 5], [0.04, 0.02, 0.02, 10], [-0.03, 0.05, 0.02, 199],
];
// Paired differences (baseline 2.0 at every seed, margin 1% = 0.02), looks from 3 to 10 seeds at 0.05 / 8:
// [n, TOST p, outside-margin p, decision] per look, up to the first decision.
type Looks = Array<[number, number, number, string]>;
const SEQ: Record<string, { d: number[]; looks: Looks }> = {
  tight: { d: [0.001718, 0.004021, -0.002573, 0.004373, 0.000905, -0.0006, -0.000606, -0.001166, 0.000553, 0.002668], looks: [[3, 0.005121099344947737, 0.9948789006550522, "equivalent"]] },
  spread: { d: [0.007009, 0.007659, -0.020338, -0.018852, 0.018646, 0.011627, 0.026199, 0.014518, -0.012293, 0.015423], looks: [[3, 0.09431999838497834, 0.9056800016150217, "continue"], [4, 0.0863389045915651, 0.9136610954084349, "continue"], [5, 0.036671762414511304, 0.9633282375854887, "continue"], [6, 0.018247751040181056, 0.9817522489598189, "continue"], [7, 0.03076823839891945, 0.9692317616010806, "continue"], [8, 0.024351746746387813, 0.9756482532536122, "continue"], [9, 0.01024861055205462, 0.9897513894479454, "continue"], [10, 0.008618714834217039, 0.9913812851657829, "continue"]] },
  shifted: { d: [0.059426, 0.053222, 0.037702, 0.050042, 0.047795, 0.063388, 0.051867, 0.073771, 0.038383, 0.057067], looks: [[3, 0.9784667299232543, 0.021533270076745673, "continue"], [4, 0.99644202119132, 0.003557978808679995, "continue"], [5, 0.9994261028966516, 0.0005738971033484516, "different"]] },
  edge: { d: [0.034965, -0.00593, -0.015438, 0.050407, 0.035523, 0.015125, 0.031831, -0.00026, 0.02715, 0.001846], looks: [[3, 0.2112530840662085, 0.7887469159337915, "continue"], [4, 0.40852489425168625, 0.5914751057483137, "continue"], [5, 0.49724567127856584, 0.5027543287214342, "continue"], [6, 0.46796275219779215, 0.5320372478022078, "continue"], [7, 0.5388882596008617, 0.4611117403991383, "continue"], [8, 0.42087352062134775, 0.5791264793786522, "continue"], [9, 0.46157087459400004, 0.538429125406, "continue"], [10, 0.36275410650477025, 0.6372458934952298, "continue"]] },
};

describe("power of the paired comparison", () => {
  it("TOST power equals scipy's integral, bounds the noncentral-t approximation from above, matches simulation", () => {
    for (const [n, mu, sigma, delta, exact, nct, mc] of TOST) {
      const p = tostPower(n, { mu, sigma, delta });
      expect(p, `n=${n} mu=${mu}`).toBeCloseTo(exact, 7);
      expect(p).toBeGreaterThanOrEqual(nct - 1e-12);
      expect(Math.abs(p - mc)).toBeLessThan(4 * Math.sqrt((mc * (1 - mc)) / 400000) + 1e-6);
    }
  });

  it("outside-margin power equals scipy's noncentral t", () => {
    for (const [n, mu, sigma, delta, want] of OUTSIDE) expect(outsidePower(n, { mu, sigma, delta }), `n=${n} mu=${mu}`).toBeCloseTo(want, 7);
  });

  it("seeds needed: the fewest with 80% power, as a scan with scipy finds", () => {
    for (const [mu, sigma, delta, n] of NEEDED) {
      const r = seedsNeeded({ mu, sigma, delta });
      expect(r.seeds, `mu=${mu} sigma=${sigma}`).toBe(n);
      expect(r.test).toBe(Math.abs(mu) < delta ? "equivalence" : "difference");
      expect(r.power!).toBeGreaterThanOrEqual(0.8);
    }
    expect(seedsNeeded({ mu: 0.02, sigma: 0.01, delta: 0.02 })).toMatchObject({ test: null, seeds: null }); // on the margin: never decided
    expect(seedsNeeded({ mu: 0.0199, sigma: 0.05, delta: 0.02 }, 0.05, 0.8, 50)).toMatchObject({ test: "equivalence", seeds: null });
    expect(seedsNeeded({ mu: 0, sigma: 0, delta: 0.02 })).toMatchObject({ seeds: 2 }); // no spread: the smallest TOST decides
  });
});

describe("--seeds auto: the sequential procedure", () => {
  const design = sequentialDesign(10);
  it("spends alpha 0.05 over 8 looks (Bonferroni)", () => {
    expect(design).toMatchObject({ first_look: 3, max_seeds: 10, looks: 8, alpha_per_look: 0.05 / 8 });
    expect(() => sequentialDesign(2)).toThrow(/--max-seeds: must be an integer >= 3/);
  });

  it("looks and stops as scipy's t-tests say, on synthetic paired differences", () => {
    const want = { tight: ["equivalent", 3], spread: ["undecided", 10], shifted: ["different", 5], edge: ["undecided", 10] } as const;
    for (const [name, { d, looks }] of Object.entries(SEQ)) {
      const r = sequentialDecision(d.map(() => 2.0), d.map((x) => 2.0 + x), 0.01, design);
      expect(r.looks.length, name).toBe(looks.length);
      r.looks.forEach((l, i) => {
        expect(l.n).toBe(looks[i][0]);
        expect(l.p_equivalent, `${name} n=${l.n}`).toBeCloseTo(looks[i][1], 6);
        expect(l.p_different, `${name} n=${l.n}`).toBeCloseTo(looks[i][2], 6);
        expect(l.decision).toBe(looks[i][3]);
      });
      expect([r.decision, r.seeds], name).toEqual(want[name as keyof typeof want]);
    }
  });

  it("with fewer seeds than the next look: continue, naming the seed it needs", () => {
    const d = SEQ.spread.d;
    expect(sequentialDecision([2, 2], [2, 2.01], 0.01, design)).toMatchObject({ decision: "continue", seeds: 3, looks: [] });
    expect(sequentialDecision(d.slice(0, 5).map(() => 2), d.slice(0, 5).map((x) => 2 + x), 0.01, design)).toMatchObject({ decision: "continue", seeds: 6 });
  });

  // Simulated comparisons (a fixed-seed generator: the same numbers on any machine). On the
  // margin the procedure may declare equivalence, and just inside it a difference, with
  // probability at most alpha each, whichever look stops.
  it("keeps its error rates on simulated comparisons", () => {
    let state = 12345;
    const uniform = () => ((state = (Math.imul(state, 1664525) + 1013904223) >>> 0) + 0.5) / 2 ** 32;
    const normal = () => Math.sqrt(-2 * Math.log(uniform())) * Math.cos(2 * Math.PI * uniform());
    const rate = (mu: number, outcome: string, sigma = 0.02, reps = 2000) => {
      let hits = 0;
      for (let r = 0; r < reps; r++) {
        const d = Array.from({ length: 10 }, () => mu + sigma * normal());
        if (sequentialDecision(d.map(() => 2), d.map((x) => 2 + x), 0.01, design).decision === outcome) hits++;
      }
      return hits / reps;
    };
    expect(rate(0.02, "equivalent")).toBeLessThanOrEqual(0.05); // true difference on the margin
    expect(rate(0.0199, "different")).toBeLessThanOrEqual(0.05); // just inside it
    expect(rate(0, "equivalent", 0.01)).toBeGreaterThan(0.5); // and it does decide when it can
    expect(rate(0.04, "different", 0.01)).toBeGreaterThan(0.5);
  });
});
