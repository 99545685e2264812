// How many seeds a paired comparison needs to be decided (docs/compare.md): the power of the
// paired TOST (equivalence shown) and of the outside-margin test (a difference outside the margin
// shown, stats.ts) at an assumed true mean difference μ and spread σ of the per-seed differences.
//
// Both are exact, by one integral over the sample standard deviation s. With n seeds the mean
// difference d̄ ~ N(μ, σ²/n) is independent of s, and U = s/σ has U² ~ χ²_ν/ν (ν = n − 1). The
// TOST shows equivalence iff −δ + t·s/√n < d̄ < δ − t·s/√n (t = t_{1−α,ν}), so
//   power = E_U[ Φ(a − t·U) − Φ(b + t·U) ]⁺,   a = (δ − μ)√n/σ,  b = (−δ − μ)√n/σ,
// (Owen's formulation of the bivariate noncentral t); the outside-margin test (t = t_{1−α/2,ν})
// shows a difference iff d̄ − t·s/√n > δ or d̄ + t·s/√n < −δ, two disjoint events:
//   power = E_U[ 1 − Φ(a + t·U) ] + E_U[ Φ(b − t·U) ].
// E_U is composite Simpson over the density of U; tested against scipy (test/ts/compare).
import jStat from "jstat";

const phi = (x: number) => jStat.normal.cdf(x, 0, 1);
const INTERVALS = 4000; // Simpson intervals: the integrands vary on a scale >= 1/t >= 0.15 of u

/** E[g(U)] over U ∈ [0, upper], U² ~ χ²_ν/ν. */
function expectOverU(nu: number, g: (u: number) => number, upper = Infinity): number {
  const hi = Math.min(upper, 1 + 10 * Math.sqrt(2 / nu)); // beyond: density below e^-50 of its peak
  if (!(hi > 0)) return 0;
  const logc = Math.log(2) + (nu / 2) * Math.log(nu / 2) - jStat.gammaln(nu / 2);
  const f = (u: number) => (u === 0 ? (nu === 1 ? Math.exp(logc) : 0) : Math.exp(logc + (nu - 1) * Math.log(u) - (nu * u * u) / 2));
  const h = hi / INTERVALS;
  let sum = 0;
  for (let i = 0; i <= INTERVALS; i++) {
    const u = i * h;
    sum += (i === 0 || i === INTERVALS ? 1 : i % 2 ? 4 : 2) * f(u) * g(u);
  }
  return (sum * h) / 3;
}

export interface Truth {
  /** The true mean of the paired differences, pipelined − baseline. */
  mu: number;
  /** The true standard deviation of the paired differences. */
  sigma: number;
  /** The equivalence margin (loss units). */
  delta: number;
}

/** Power of the paired TOST at level alpha with n seeds: P(equivalence shown). */
export function tostPower(n: number, t: Truth, alpha = 0.05): number {
  if (n < 2) return 0;
  if (t.sigma === 0) return Math.abs(t.mu) < t.delta ? 1 : 0;
  const nu = n - 1;
  const tc = jStat.studentt.inv(1 - alpha, nu);
  const a = ((t.delta - t.mu) * Math.sqrt(n)) / t.sigma;
  const b = ((-t.delta - t.mu) * Math.sqrt(n)) / t.sigma;
  const uMax = (a - b) / (2 * tc); // beyond it the acceptance interval is empty
  return Math.min(1, expectOverU(nu, (u) => Math.max(0, phi(a - tc * u) - phi(b + tc * u)), uMax));
}

/** Power of the outside-margin test at level alpha with n seeds: P(a difference outside ±δ shown). */
export function outsidePower(n: number, t: Truth, alpha = 0.05): number {
  if (n < 2) return 0;
  if (t.sigma === 0) return Math.abs(t.mu) > t.delta ? 1 : 0;
  const nu = n - 1;
  const tc = jStat.studentt.inv(1 - alpha / 2, nu);
  const a = ((t.delta - t.mu) * Math.sqrt(n)) / t.sigma;
  const b = ((-t.delta - t.mu) * Math.sqrt(n)) / t.sigma;
  return Math.min(1, expectOverU(nu, (u) => 1 - phi(a + tc * u) + phi(b - tc * u)));
}

export interface SeedsNeeded {
  /** Which test decides at this mean: equivalence when |μ| < δ, a difference when |μ| > δ. */
  test: "equivalence" | "difference" | null;
  /** The fewest seeds whose power reaches `target`; null when no number up to `maxSeeds` does. */
  seeds: number | null;
  power: number | null;
  target: number;
  alpha: number;
  max_seeds: number;
}

/**
 * The fewest seeds that decide the comparison with probability `target`, were the observed mean
 * difference and spread the truth. Powers rise with n, so a doubling search then bisection.
 */
export function seedsNeeded(t: Truth, alpha = 0.05, target = 0.8, maxSeeds = 1000): SeedsNeeded {
  const base = { target, alpha, max_seeds: maxSeeds };
  if (Math.abs(t.mu) === t.delta || !(t.sigma >= 0) || !(t.delta > 0)) return { ...base, test: null, seeds: null, power: null };
  const test = Math.abs(t.mu) < t.delta ? "equivalence" : "difference";
  const power = (n: number) => (test === "equivalence" ? tostPower(n, t, alpha) : outsidePower(n, t, alpha));
  let hi = 2;
  while (power(hi) < target) {
    if (hi >= maxSeeds) return { ...base, test, seeds: null, power: null };
    hi = Math.min(2 * hi, maxSeeds);
  }
  let lo = Math.max(2, Math.floor(hi / 2)); // power(lo) < target unless lo === hi === 2
  if (power(lo) >= target) return { ...base, test, seeds: lo, power: power(lo) };
  while (hi - lo > 1) {
    const mid = (lo + hi) >> 1;
    if (power(mid) >= target) hi = mid;
    else lo = mid;
  }
  return { ...base, test, seeds: hi, power: power(hi) };
}
