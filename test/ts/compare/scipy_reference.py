"""Reference values for test/ts/compare/power.test.ts, computed with scipy (independent of the
TypeScript code: scipy's distributions and integrator). Run it, and paste what it prints:

    python3 test/ts/compare/scipy_reference.py      # scipy >= 1.11, numpy

Power of the paired TOST with n seeds at a true mean difference mu and spread sigma, margin delta:
  exact  = E_U[(Phi(a - t U) - Phi(b + t U))+], U = s/sigma ~ chi_nu / sqrt(nu)   (scipy.integrate.quad)
  nct    = nct.sf(t, nu, (mu + delta) sqrt(n) / sigma) + nct.cdf(-t, nu, (mu - delta) sqrt(n) / sigma) - 1
           (the usual noncentral-t approximation, a lower bound of the exact power)
  mc     = the share of 400000 simulated experiments whose TOST shows equivalence (numpy, seed 0)
Power of the outside-margin test (two one-sided t-tests at alpha/2, disjoint events): exactly
  nct.sf(t2, nu, (mu - delta) sqrt(n) / sigma) + nct.cdf(-t2, nu, (mu + delta) sqrt(n) / sigma).
The sequential looks: scipy.stats.ttest_1samp on the paired differences at each look.
"""

import json

import numpy as np
from scipy import integrate, stats


def tost_power_exact(n, mu, sigma, delta, alpha=0.05):
    nu = n - 1
    t = stats.t.ppf(1 - alpha, nu)
    a, b = (delta - mu) * np.sqrt(n) / sigma, (-delta - mu) * np.sqrt(n) / sigma
    umax = (a - b) / (2 * t)
    dens = stats.chi(nu, scale=1 / np.sqrt(nu)).pdf
    f = lambda u: max(0.0, stats.norm.cdf(a - t * u) - stats.norm.cdf(b + t * u)) * dens(u)
    return integrate.quad(f, 0, umax, epsabs=1e-13, epsrel=1e-11, limit=200)[0]


def tost_power_nct(n, mu, sigma, delta, alpha=0.05):
    nu, t = n - 1, stats.t.ppf(1 - alpha, n - 1)
    return (stats.nct.sf(t, nu, (mu + delta) * np.sqrt(n) / sigma)
            + stats.nct.cdf(-t, nu, (mu - delta) * np.sqrt(n) / sigma) - 1)


def tost_power_mc(n, mu, sigma, delta, alpha=0.05, reps=400_000):
    rng = np.random.default_rng(0)
    d = rng.normal(mu, sigma, size=(reps, n))
    m, se = d.mean(1), d.std(1, ddof=1) / np.sqrt(n)
    t = stats.t.ppf(1 - alpha, n - 1)
    return float(np.mean((m - t * se > -delta) & (m + t * se < delta)))


def outside_power(n, mu, sigma, delta, alpha=0.05):
    nu, t = n - 1, stats.t.ppf(1 - alpha / 2, n - 1)
    return (stats.nct.sf(t, nu, (mu - delta) * np.sqrt(n) / sigma)
            + stats.nct.cdf(-t, nu, (mu + delta) * np.sqrt(n) / sigma))


def seeds_needed(mu, sigma, delta, alpha=0.05, target=0.8):
    power = tost_power_exact if abs(mu) < delta else outside_power
    return next(n for n in range(2, 100000) if power(n, mu, sigma, delta, alpha) >= target)


def looks(d, delta, alpha, first, max_seeds):
    """Each look's TOST p, outside-margin p and decision at alpha / K (K looks)."""
    k = max_seeds - first + 1
    out = []
    for n in range(first, min(max_seeds, len(d)) + 1):
        x = np.asarray(d[:n])
        p_eq = max(stats.ttest_1samp(x, -delta, alternative="greater").pvalue,
                   stats.ttest_1samp(x, delta, alternative="less").pvalue)
        p_out = min(stats.ttest_1samp(x, delta, alternative="greater").pvalue,
                    stats.ttest_1samp(x, -delta, alternative="less").pvalue)
        dec = "equivalent" if p_eq < alpha / k else "different" if p_out < alpha / k / 2 else "continue"
        out.append([n, float(p_eq), float(p_out), dec])
        if dec != "continue":
            break
    return out


tost_cases = [(3, 0.0, 0.02, 0.0238), (5, 0.005, 0.01, 0.02), (10, -0.01, 0.02, 0.025), (20, 0.0, 0.05, 0.03),
              (2, 0.0, 0.001, 0.02), (8, 0.012, 0.015, 0.024)]
print("tost:", json.dumps([[n, mu, s, dl, tost_power_exact(n, mu, s, dl), float(tost_power_nct(n, mu, s, dl)),
                             tost_power_mc(n, mu, s, dl)] for n, mu, s, dl in tost_cases]))
outside_cases = [(4, 0.05, 0.02, 0.02), (8, -0.03, 0.02, 0.02), (3, 0.1, 0.01, 0.02), (6, 0.021, 0.03, 0.02)]
print("outside:", json.dumps([[n, mu, s, dl, float(outside_power(n, mu, s, dl))] for n, mu, s, dl in outside_cases]))
needed_cases = [(-0.00538, 0.0704, 0.0240), (0.0, 0.02, 0.0238), (0.005, 0.01, 0.02), (0.04, 0.02, 0.02), (-0.03, 0.05, 0.02)]
print("needed:", json.dumps([[mu, s, dl, seeds_needed(mu, s, dl)] for mu, s, dl in needed_cases]))

rng = np.random.default_rng(21)
delta = 0.02  # baseline 2.0 at every seed, margin 1%
seqs = {"tight": rng.normal(0.001, 0.002, 10), "spread": rng.normal(0.0, 0.012, 10),
        "shifted": rng.normal(0.05, 0.015, 10), "edge": rng.normal(0.02, 0.03, 10)}
for name, d in seqs.items():
    d = [round(float(x), 6) for x in d]
    print(f"seq {name}:", json.dumps({"d": d, "looks": looks(d, delta, 0.05, 3, 10)}))

# The outside-margin test on the fixed cases of stats.test.ts: [p_above, p_below] (each one-sided).
for b, p, m in [([2.31, 2.35, 2.29, 2.33], [2.36, 2.41, 2.33, 2.37], 0.01), ([2.31, 2.35, 2.29], [2.32, 2.34, 2.30], 0.01)]:
    d, delta = np.subtract(p, b), m * abs(np.mean(b))
    print("outside-margin:", json.dumps([float(stats.ttest_1samp(d, delta, alternative="greater").pvalue),
                                         float(stats.ttest_1samp(d, -delta, alternative="less").pvalue)]))
