// The noise-envelope rule and the whole-curve endpoints on hand-made curves.
import { describe, expect, it } from "vitest";
import { curveMean, perEvalDifferences, tailMean } from "../../../src/compare/endpoints.ts";
import { checkEnvelope, checkSeed, ulp32, UNIT_ROUNDOFF_32 } from "../../../src/compare/envelope.ts";

const curve = (pipelined: number[], control: number[], floor = 0) =>
  ({ steps: pipelined.map((_, i) => i + 1), pipelined, control, floor: pipelined.map(() => floor) });

describe("the noise envelope", () => {
  it("ulp32: the spacing of fp32 numbers", () => {
    expect(ulp32(1)).toBe(2 ** -23);
    expect(ulp32(-1)).toBe(2 ** -23);
    expect(ulp32(4.2)).toBe(2 ** -21); // [4, 8)
    expect(ulp32(0.8)).toBe(2 ** -24); // [0.5, 1)
    expect(ulp32(0)).toBe(2 ** -149);
    expect(UNIT_ROUNDOFF_32).toBe(2 ** -24);
  });

  it("compares running maxima: a pipelined spike is judged against the control's largest value so far", () => {
    // The control spikes at step 2; the pipelined arm's later spike at step 4 is within K x that.
    const r = checkEnvelope(curve([1e-9, 1e-9, 1e-9, 5e-6, 1e-9], [1e-9, 1e-6, 1e-9, 1e-9, 1e-9]), 10);
    expect(r).toMatchObject({ met: true, first_outside: null, worst_step: 4 });
    expect(r.worst_ratio).toBeCloseTo(5, 10);
    // A pipelined spike before the control's is outside: the envelope only ever knows the past.
    const early = checkEnvelope(curve([1e-9, 5e-6, 1e-9, 1e-9, 1e-9], [1e-9, 1e-9, 1e-9, 1e-6, 1e-9]), 10);
    expect(early).toMatchObject({ met: false, first_outside: { step: 2, pipelined: 5e-6, envelope: 10 * 1e-9 } });
  });

  it("counts every control value as at least the floor, and exactly K x is still inside", () => {
    expect(checkEnvelope(curve([3e-7, 0], [0, 0], 4.77e-7), 10).met).toBe(true); // both under fp32's resolution
    expect(checkEnvelope(curve([3e-7, 0], [0, 0], 0), 10).met).toBe(false); // no floor: any difference is outside
    expect(checkEnvelope(curve([10], [1]), 10).met).toBe(true);
    expect(checkEnvelope(curve([10.001], [1]), 10).met).toBe(false);
    expect(checkEnvelope(curve([0, 0], [0, 0]), 1)).toMatchObject({ met: true, worst_ratio: 0 });
    expect(() => checkEnvelope(curve([0], [0]), 0.5)).toThrow(/factor must be >= 1/);
  });

  it("a seed is within the envelope only if every divergence is", () => {
    const ok = curve([1e-8, 1e-7], [1e-7, 1e-6]);
    const out = curve([1e-3, 1e-3], [1e-7, 1e-6]);
    expect(checkSeed({ loss: ok, grad_norm: ok, param_distance: ok }, 10).met).toBe(true);
    const r = checkSeed({ loss: ok, grad_norm: out, param_distance: ok }, 10);
    expect(r.met).toBe(false);
    expect(r.checks.grad_norm.first_outside!.step).toBe(1);
    expect(r.checks.loss.met).toBe(true);
  });
});

describe("the eval-curve endpoints", () => {
  const c = [{ step: 10, loss: 4 }, { step: 20, loss: 3 }, { step: 40, loss: 2 }, { step: 50, loss: 2 }];
  it("the curve's mean height: trapezoids over the span it covers", () => {
    // (4+3)/2*10 + (3+2)/2*20 + 2*10 = 35 + 50 + 20 = 105 over 40 steps.
    expect(curveMean(c)).toBeCloseTo(105 / 40, 12);
    expect(curveMean([{ step: 5, loss: 3 }])).toBe(3);
  });

  it("the tail mean: the evaluations after (1 - fraction) x steps", () => {
    expect(tailMean(c, 50, 0.5)).toBe(2); // steps 40 and 50
    expect(tailMean(c, 50, 0.7)).toBeCloseTo(7 / 3, 12); // steps 20, 40, 50
    expect(() => tailMean(c, 100, 0.4)).toThrow(/no evaluation in the last 40% of the run's 100 steps/);
  });

  it("per-eval paired differences with their intervals, at the steps every seed has", () => {
    const seeds = [
      { baseline: c, pipelined: c.map((e) => ({ ...e, loss: e.loss + 0.01 })) },
      { baseline: c, pipelined: c.map((e) => ({ ...e, loss: e.loss + 0.03 })) },
    ];
    const r = perEvalDifferences(seeds, 0.01);
    expect(r.map((e) => e.step)).toEqual([10, 20, 40, 50]);
    expect(r[0].difference.mean).toBeCloseTo(0.02, 12);
    expect(r[0].margin).toBeCloseTo(0.04, 12);
    expect(r[0].difference.ci95).not.toBeNull();
  });
});
