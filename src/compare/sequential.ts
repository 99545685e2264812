// `ampipe compare --seeds auto --max-seeds N` (docs/compare.md): seeds are added one at a time
// until the final eval loss comparison is decided: equivalence shown (the paired TOST) or refuted
// (a difference outside the margin shown, stats.ts outsideMarginTest).
//
// Looks come after seed FIRST_LOOK, FIRST_LOOK + 1, ..., N: K = N − FIRST_LOOK + 1 of them, each
// at alpha / K (Bonferroni-spent alpha). By the union bound the probability of ever declaring
// equivalence when the true difference lies outside the margin is at most alpha, and so is the
// probability of ever declaring a difference when it lies inside: the stated error rates hold
// whichever look stops, although each test's statistic is computed afresh from every seed so far.
// The decision is a function of the finished seeds alone, so an interrupted sequence resumes to
// the same decision.
import { outsideMarginTest, pairedTost } from "./stats.ts";

/** The first look: with fewer seeds the t-tests' 1 degree of freedom would spend alpha for nothing. */
export const FIRST_LOOK = 3;

export interface SequentialDesign {
  alpha: number;
  first_look: number;
  max_seeds: number;
  looks: number;
  alpha_per_look: number;
  rule: string;
}

export function sequentialDesign(maxSeeds: number, alpha = 0.05): SequentialDesign {
  if (!Number.isInteger(maxSeeds) || maxSeeds < FIRST_LOOK)
    throw new Error(`--max-seeds: must be an integer >= ${FIRST_LOOK} (the first look); got ${maxSeeds}`);
  const looks = maxSeeds - FIRST_LOOK + 1;
  return {
    alpha, first_look: FIRST_LOOK, max_seeds: maxSeeds, looks, alpha_per_look: alpha / looks,
    rule: `a look after each seed from ${FIRST_LOOK} to ${maxSeeds}, each at alpha ${alpha} / ${looks} (Bonferroni)`,
  };
}

export type LookDecision = "equivalent" | "different" | "continue";

export interface Look {
  n: number;
  mean_difference: number;
  margin: number;
  /** The TOST's p (equivalence shown when < alpha_per_look). */
  p_equivalent: number;
  /** The outside-margin test's p (a difference shown when < alpha_per_look / 2). */
  p_different: number;
  decision: LookDecision;
}

/** One look at the first n seeds. */
export function look(baseline: number[], pipelined: number[], relativeMargin: number, alphaLook: number): Look {
  const tost = pairedTost(baseline, pipelined, relativeMargin, alphaLook);
  const out = outsideMarginTest(baseline, pipelined, relativeMargin, alphaLook);
  if (tost.p_value === null || out.p_value === null) throw new Error(`a look needs at least 2 seeds; got ${baseline.length}`);
  return {
    n: baseline.length, mean_difference: tost.mean_difference, margin: tost.margin,
    p_equivalent: tost.p_value, p_different: out.p_value,
    decision: tost.equivalent ? "equivalent" : out.different ? "different" : "continue",
  };
}

export interface SequentialResult {
  design: SequentialDesign;
  looks: Look[];
  /** equivalent / different: decided at the last look; undecided: N seeds without a decision; continue: needs another seed. */
  decision: "equivalent" | "different" | "undecided" | "continue";
  /** The seeds the decision (or the next look) rests on. */
  seeds: number;
}

/**
 * The looks the finished seeds allow, in order, stopping at the first decision. `baseline[i]`,
 * `pipelined[i]`: seed i's final eval losses, in seed order.
 */
export function sequentialDecision(baseline: number[], pipelined: number[], relativeMargin: number, design: SequentialDesign): SequentialResult {
  const looks: Look[] = [];
  for (let n = design.first_look; n <= Math.min(design.max_seeds, baseline.length); n++) {
    const l = look(baseline.slice(0, n), pipelined.slice(0, n), relativeMargin, design.alpha_per_look);
    looks.push(l);
    if (l.decision !== "continue") return { design, looks, decision: l.decision, seeds: n };
  }
  const seen = looks.length ? looks[looks.length - 1].n : 0;
  if (seen === design.max_seeds) return { design, looks, decision: "undecided", seeds: seen };
  return { design, looks, decision: "continue", seeds: Math.max(design.first_look, seen + 1) };
}
