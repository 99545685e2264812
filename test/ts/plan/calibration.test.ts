import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { calibrate, fitLine, median, parseCalibration, readCalibration, replayRun } from "../../../src/plan/calibration.ts";
import { opWork, predict, profileModel, type CostModel } from "../../../src/plan/costs.ts";
import { makePlan } from "../../../src/plan/generators.ts";
import { planToJson } from "../../../src/plan/io.ts";
import { OP_KINDS, type Plan } from "../../../src/plan/ir.ts";
import { simulatePlan } from "../../../src/plan/simulate.ts";
import { smallDims } from "./helpers.ts";

// With a shared expert, so every op kind (its shared/shared_bwd too) is measured and fitted.
const dims = smallDims({ expert_model_parallel_size: 2, moe_shared_expert_intermediate_size: 24 });

/** A "true" device: the cpu profile with every coefficient changed. */
function truth(): CostModel {
  const m = profileModel("cpu", "fp32");
  const coefficients = { ...m.coefficients };
  OP_KINDS.forEach((k, i) => (coefficients[k] = { a: m.coefficients[k].a * (0.5 + 0.1 * i), b: 0.01 + 0.002 * i, source: "profile" }));
  return { ...m, coefficients, overlapSlowdown: 1.4, opGapMs: 0.05 };
}

/** What the executor would report for a plan on the "true" device: per-op times (without the executor's per-op gap) and pass makespans. */
function measure(t: CostModel, plan: Plan) {
  const sim = predict(t, plan);
  const op_times_ms = Object.fromEntries([...plan.forward, ...plan.backward].map((o) => {
    const c = t.coefficients[o.kind];
    return [o.id, c.a * opWork(plan.dims, plan.boundaries, o.kind, o.chunk) + c.b];
  }));
  return { plan, op_times_ms, makespan_ms: { forward: sim.forward.makespanMs, backward: sim.backward.makespanMs } };
}

describe("calibration", () => {
  it("fitLine recovers a line, keeps a and b non-negative, and handles one work value", () => {
    const pts = [1, 2, 5, 9].map((x) => ({ work: x, ms: 0.5 * x + 2 }));
    const f = fitLine(pts, { a: 1, b: 0 });
    expect(f.a).toBeCloseTo(0.5, 12);
    expect(f.b).toBeCloseTo(2, 12);
    expect(fitLine([{ work: 1, ms: 5 }, { work: 2, ms: 1 }], { a: 1, b: 0 })).toEqual({ a: 0, b: expect.any(Number) });
    const o = fitLine([{ work: 1, ms: 1 }, { work: 10, ms: 20 }], { a: 1, b: 0 }); // LS intercept < 0: through the origin
    expect(o.b).toBe(0);
    expect(o.a).toBeGreaterThan(1);
    // one work value: the intercept keeps its prior, the slope fits the relative-error mean of 3 and 5
    const one = fitLine([{ work: 4, ms: 3 }, { work: 4, ms: 5 }], { a: 1, b: 0.5 });
    expect(one.b).toBe(0.5);
    expect(one.a).toBeCloseTo(((1 / 3 + 1 / 5) / (1 / 9 + 1 / 25) - 0.5) / 4, 12);
    expect(median([3, 1, 2])).toBe(2);
    expect(median([4, 1, 2, 3])).toBe(2.5);
  });

  it("recovers per-kind coefficients and the overlap factor from executed plans", () => {
    const t = truth();
    const runs = [
      measure(t, makePlan("sequential", dims)),
      measure(t, makePlan("grouped", dims, { degree: 3 })),
      measure(t, makePlan("interleaved", dims, { boundaries: [0, 20, 36, 48] })),
    ];
    const { model, report } = calibrate(profileModel("cpu", "fp32"), parseCalibration({ runs }));
    for (const k of OP_KINDS) {
      expect(model.coefficients[k].source).toBe("fit");
      // aux_loss and counts have one work value per dims: their slope and intercept are not separable
      if (k.startsWith("aux_loss") || k === "counts") continue;
      expect(model.coefficients[k].a / t.coefficients[k].a).toBeCloseTo(1, 6);
      expect(model.coefficients[k].b).toBeCloseTo(t.coefficients[k].b, 6);
    }
    expect(report.uncalibrated).toEqual([]);
    expect(report.overlapSlowdown.fitted).toBe(true);
    expect(model.overlapSlowdown).toBeCloseTo(1.4, 3);
    expect(report.opGapMs.fitted).toBe(true);
    expect(model.opGapMs).toBeCloseTo(0.05, 4);
    for (const m of report.makespans) expect(Math.abs(m.rel_error)).toBeLessThan(1e-3);
    // the calibrated model predicts a plan it has not seen
    const unseen = makePlan("interleaved", dims, { degree: 4 });
    expect(predict(model, unseen).totalMs / predict(t, unseen).totalMs).toBeCloseTo(1, 2);
  });

  it("accepts single-op samples with repetitions (median) and a top-level dims default", () => {
    const t = truth();
    const samples = [[0, 48], [0, 16, 32, 48], [0, 24, 48]].flatMap((b) =>
      b.slice(0, -1).map((_, c) => {
        const ms = t.coefficients.attn.a * opWork(dims, b, "attn", c) + t.coefficients.attn.b;
        return { kind: "attn", chunk: c, boundaries: b, ms: [ms * 1.5, ms, ms * 0.9] };
      }),
    );
    const { model, report } = calibrate(profileModel("cpu", "fp32"), parseCalibration({ format: "ampipe.calibration", version: 1, dims, samples }));
    expect(model.coefficients.attn.a / t.coefficients.attn.a).toBeCloseTo(1, 6);
    expect(report.kinds.map((k) => k.kind)).toEqual(["attn"]);
    expect(report.uncalibrated).toContain("experts");
    expect(model.coefficients.experts.source).toBe("profile");
    expect(report.overlapSlowdown.fitted).toBe(false);
  });

  it("reads a file whose runs point at plan files; a bare run or array is accepted too", () => {
    const dir = mkdtempSync(join(tmpdir(), "ampipe-cal-"));
    const plan = makePlan("grouped", dims, { degree: 2 });
    writeFileSync(join(dir, "p.json"), planToJson(plan));
    const m = measure(truth(), plan);
    writeFileSync(join(dir, "cal.json"), JSON.stringify({ runs: [{ plan: "p.json", op_times_ms: m.op_times_ms }] }));
    const data = readCalibration(join(dir, "cal.json"));
    expect(data.runs[0].plan.boundaries).toEqual([0, 24, 48]);
    expect(parseCalibration({ plan, op_times_ms: m.op_times_ms }).runs.length).toBe(1);
    expect(parseCalibration([{ plan, op_times_ms: m.op_times_ms }, { kind: "proj", chunk: 0, dims, ms: 1 }]).samples.length).toBe(1);
    // the Python comparison's shape: op times split by pass, and a total makespan
    const fwd = Object.fromEntries(plan.forward.map((o) => [o.id, m.op_times_ms[o.id]]));
    const bwd = Object.fromEntries(plan.backward.map((o) => [o.id, m.op_times_ms[o.id]]));
    const split = parseCalibration({ plan, op_times_ms: { forward: fwd, backward: bwd }, makespan_ms: { total: 12 } });
    expect(split.runs[0].opTimesMs).toEqual(data.runs[0].opTimesMs);
    expect(split.makespans).toMatchObject([{ pass: "total", ms: 12 }]);
    expect(() => parseCalibration({ plan, op_times_ms: { forward: { "b.attn.0": 1 } } })).toThrow(/op_times_ms\["forward\.b\.attn\.0"\]: no op with this id/);
    // replaying measured op times through the schedule equals simulating with them directly
    const replay = replayRun(data.runs[0]);
    expect(replay.totalMs).toBe(simulatePlan(plan, new Map(Object.entries(m.op_times_ms))).totalMs);
  });

  it("rejects bad input with errors that name the field", () => {
    const plan = makePlan("grouped", dims, { degree: 2 });
    expect(() => parseCalibration({ samples: [{ kind: "attn", chunk: 0, ms: 1 }] })).toThrow(/samples\[0\]\.dims: missing/);
    expect(() => parseCalibration({ samples: [{ kind: "attn", chunk: 0, dims, ms: -1 }] })).toThrow(/samples\[0\]\.ms/);
    expect(() => parseCalibration({ samples: [{ kind: "softmax", chunk: 0, dims, ms: 1 }] })).toThrow(/samples\[0\]\.kind/);
    expect(() => parseCalibration({ samples: [{ kind: "attn", chunk: 3, dims, boundaries: [0, 24, 48], ms: 1 }] })).toThrow(/samples\[0\]\.chunk: 3 is out of range/);
    expect(() => parseCalibration({ samples: [{ kind: "attn", chunk: 0, dims, boundaries: [0, 30, 20, 48], ms: 1 }] })).toThrow(/samples\[0\]\.boundaries\[2\]/);
    expect(() => parseCalibration({ runs: [{ plan, op_times_ms: { "f.nope.0": 1 } }] })).toThrow(/runs\[0\]\.op_times_ms\["f\.nope\.0"\]: no op with this id/);
    expect(() => parseCalibration({ runs: [{ plan: { ...plan, version: 9 }, op_times_ms: {} }] })).toThrow(/runs\[0\]\.plan: version/);
    expect(() => parseCalibration({ runs: [{ plan: "missing.json", op_times_ms: {} }] }, "/nonexistent")).toThrow(/runs\[0\]\.plan: cannot read/);
    expect(() => parseCalibration({ sample: [] })).toThrow(/sample/);
    expect(() => parseCalibration({})).toThrow(/no samples and no runs/);
  });
});
