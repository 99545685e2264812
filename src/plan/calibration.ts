// Calibration: fit the cost model's per-kind coefficients (time = a * work + b) to measured op
// times by weighted least squares, and the compute/comm overlap factor to measured makespans.
// The input format is documented in docs/plan.md ("Calibration input").
import { readFileSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { z } from "zod";
import { validatePlan } from "./check.ts";
import { opWork, predict, type Coefficient, type CostModel } from "./costs.ts";
import { BlockDimsSchema, OP_KINDS, checkBoundaries, formatIssues, type BlockDims, type OpKind, type Plan } from "./ir.ts";
import { simulatePlan } from "./simulate.ts";

export const CALIBRATION_FORMAT = "ampipe.calibration";

const Ms = z.union([z.number().nonnegative(), z.array(z.number().nonnegative()).min(1)]);

export const CalibrationSampleSchema = z
  .object({
    kind: z.enum(OP_KINDS as [OpKind, ...OpKind[]]),
    chunk: z.number().int().nonnegative().nullable().describe("Chunk index, or null for a whole-sequence op."),
    dims: BlockDimsSchema.optional().describe("Block dims; default: the file's top-level dims."),
    boundaries: z.array(z.number().int().nonnegative()).optional().describe("Chunk boundaries; default [0, seq_length]."),
    ms: Ms.describe("Measured time in ms, or repetitions (the median is used)."),
  })
  .strict();

export const CalibrationRunSchema = z
  .object({
    plan: z.union([z.string(), z.looseObject({})]).describe("The executed plan, inline or as a path relative to this file."),
    op_times_ms: z
      .union([z.record(z.string(), Ms), z.object({ forward: z.record(z.string(), Ms).optional(), backward: z.record(z.string(), Ms).optional() }).strict()])
      .describe("Measured time per op id (ms) or repetitions; flat, or split as {forward: {...}, backward: {...}}."),
    makespan_ms: z
      .object({ forward: Ms.optional(), backward: Ms.optional(), total: Ms.optional() })
      .strict()
      .optional()
      .describe("Measured wall time of each pass; fits the overlap slowdown."),
    source: z.string().optional(),
  })
  .strict();

export const CalibrationFileSchema = z
  .object({
    format: z.literal(CALIBRATION_FORMAT).optional(),
    version: z.literal(1).optional(),
    device: z.string().optional(),
    dims: BlockDimsSchema.optional(),
    samples: z.array(CalibrationSampleSchema).optional(),
    runs: z.array(CalibrationRunSchema).optional(),
  })
  .strict();

export type CalibrationSample = z.infer<typeof CalibrationSampleSchema>;
export type CalibrationRun = z.infer<typeof CalibrationRunSchema>;

/** One measured op: its kind, its work under the model (WORK_UNIT) and its time. */
export interface Point {
  kind: OpKind;
  work: number;
  ms: number;
  where: string;
}

export interface MeasuredMakespan {
  plan: Plan;
  pass: "forward" | "backward" | "total";
  ms: number;
  where: string;
}

export interface CalibrationData {
  samples: Array<{ kind: OpKind; chunk: number | null; dims: BlockDims; boundaries: number[]; ms: number; where: string }>;
  runs: Array<{ plan: Plan; opTimesMs: Map<string, number>; where: string }>;
  makespans: MeasuredMakespan[];
}

export const median = (v: number | number[]): number => {
  if (typeof v === "number") return v;
  const s = [...v].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
};

/**
 * Normalises calibration input: a file object ({samples, runs}), a bare array of samples and/or
 * runs, or one run ({plan, op_times_ms}). `baseDir` resolves plan paths. Errors name the field.
 */
export function parseCalibration(value: unknown, baseDir = ".", name = "calibration"): CalibrationData {
  let doc: unknown = value;
  if (Array.isArray(value)) {
    const isRun = (x: unknown) => !!x && typeof x === "object" && "op_times_ms" in (x as object);
    doc = { samples: value.filter((x) => !isRun(x)), runs: value.filter(isRun) };
  } else if (value && typeof value === "object" && "op_times_ms" in (value as object)) doc = { runs: [value] };
  const r = CalibrationFileSchema.safeParse(doc);
  if (!r.success) throw new Error(`invalid calibration input ${name}:\n${formatIssues(r.error)}`);
  const file = r.data;
  const out: CalibrationData = { samples: [], runs: [], makespans: [] };
  (file.samples ?? []).forEach((s, i) => {
    const where = `${name}: samples[${i}]`;
    const dims = s.dims ?? file.dims;
    if (!dims) throw new Error(`${where}.dims: missing (and the file has no top-level dims)`);
    const boundaries = s.boundaries ?? [0, dims.seq_length];
    checkBoundaries(boundaries, dims.seq_length, `${where}.boundaries`);
    if (s.chunk !== null && s.chunk >= boundaries.length - 1)
      throw new Error(`${where}.chunk: ${s.chunk} is out of range for ${boundaries.length - 1} chunks`);
    out.samples.push({ kind: s.kind, chunk: s.chunk, dims, boundaries, ms: median(s.ms), where });
  });
  (file.runs ?? []).forEach((run, i) => {
    const where = `${name}: runs[${i}]`;
    let planValue: unknown = run.plan;
    if (typeof run.plan === "string") {
      const path = resolve(baseDir, run.plan);
      try {
        planValue = JSON.parse(readFileSync(path, "utf8"));
      } catch (e) {
        throw new Error(`${where}.plan: cannot read ${path}: ${(e as Error).message}`);
      }
    }
    let plan: Plan;
    try {
      plan = validatePlan(planValue);
    } catch (e) {
      throw new Error(`${where}.plan: ${(e as Error).message}`);
    }
    const ids = new Set([...plan.forward, ...plan.backward].map((o) => o.id));
    const opTimesMs = new Map<string, number>();
    const t = run.op_times_ms as Record<string, unknown>;
    const split = Object.keys(t).length > 0 && Object.keys(t).every((k) => k === "forward" || k === "backward");
    const entries: Array<[string, string, number | number[]]> = split
      ? (["forward", "backward"] as const).flatMap((pass) =>
          Object.entries((t[pass] ?? {}) as Record<string, number | number[]>).map(([id, v]) => [`${pass}.${id}`, id, v] as [string, string, number | number[]]))
      : Object.entries(t as Record<string, number | number[]>).map(([id, v]) => [id, id, v] as [string, string, number | number[]]);
    const passIds = { forward: new Set(plan.forward.map((o) => o.id)), backward: new Set(plan.backward.map((o) => o.id)) };
    for (const [path, id, v] of entries) {
      const pass = split ? (path.startsWith("forward.") ? "forward" : "backward") : null;
      if (!(pass ? passIds[pass] : ids).has(id)) throw new Error(`${where}.op_times_ms["${path}"]: no op with this id in the plan`);
      opTimesMs.set(id, median(v));
    }
    out.runs.push({ plan, opTimesMs, where });
    for (const pass of ["forward", "backward", "total"] as const) {
      const m = run.makespan_ms?.[pass];
      if (m !== undefined) out.makespans.push({ plan, pass, ms: median(m), where: `${where}.makespan_ms.${pass}` });
    }
  });
  if (out.samples.length === 0 && out.runs.length === 0) throw new Error(`${name}: no samples and no runs`);
  return out;
}

export function readCalibration(path: string): CalibrationData {
  let value: unknown;
  try {
    value = JSON.parse(readFileSync(path, "utf8"));
  } catch (e) {
    throw new Error(`--calibration ${path}: cannot read: ${(e as Error).message}`);
  }
  return parseCalibration(value, dirname(resolve(path)), path);
}

/** Turns calibration data into (kind, work, ms) points under the model's work options. */
export function calibrationPoints(model: CostModel, data: CalibrationData): Point[] {
  const pts: Point[] = data.samples.map((s) => ({
    kind: s.kind, work: opWork(s.dims, s.boundaries, s.kind, s.chunk, model.work), ms: s.ms, where: s.where,
  }));
  for (const run of data.runs) {
    for (const op of [...run.plan.forward, ...run.plan.backward]) {
      const ms = run.opTimesMs.get(op.id);
      if (ms === undefined) continue;
      pts.push({ kind: op.kind, work: opWork(run.plan.dims, run.plan.boundaries, op.kind, op.chunk, model.work), ms, where: `${run.where} ${op.id}` });
    }
  }
  return pts;
}

/**
 * Fits time = a * work + b to points, minimising relative squared error (weights 1/ms^2) so small
 * and large ops count alike; a and b are kept >= 0. With one distinct work value the intercept
 * keeps its prior (capped by the measurement) and only the slope is fitted.
 */
export function fitLine(points: Array<{ work: number; ms: number }>, prior: { a: number; b: number }): { a: number; b: number } {
  const floor = 1e-6;
  const w = points.map((p) => 1 / Math.max(p.ms, floor) ** 2);
  const sw = w.reduce((s, x) => s + x, 0);
  const mx = points.reduce((s, p, i) => s + w[i] * p.work, 0) / sw;
  const my = points.reduce((s, p, i) => s + w[i] * p.ms, 0) / sw;
  const sxx = points.reduce((s, p, i) => s + w[i] * (p.work - mx) ** 2, 0);
  const sxy = points.reduce((s, p, i) => s + w[i] * (p.work - mx) * (p.ms - my), 0);
  if (sxx <= 1e-12 * Math.max(1, mx * mx) * sw) {
    if (mx <= 0) return { a: prior.a, b: Math.max(0, my) };
    const b = Math.min(prior.b, my);
    return { a: Math.max(0, (my - b) / mx), b };
  }
  let a = sxy / sxx;
  let b = my - a * mx;
  if (a < 0) return { a: 0, b: Math.max(0, my) };
  if (b < 0) {
    // through the origin: minimise sum w (a x - y)^2
    const num = points.reduce((s, p, i) => s + w[i] * p.work * p.ms, 0);
    const den = points.reduce((s, p, i) => s + w[i] * p.work * p.work, 0);
    a = den > 0 ? num / den : 0;
    b = 0;
  }
  return { a, b };
}

const relRmse = (pts: Array<{ work: number; ms: number }>, c: { a: number; b: number }) =>
  Math.sqrt(pts.reduce((s, p) => s + ((c.a * p.work + c.b - p.ms) / Math.max(p.ms, 1e-6)) ** 2, 0) / pts.length);

function predictedMakespan(model: CostModel, m: MeasuredMakespan): number {
  const sim = predict(model, m.plan);
  return m.pass === "total" ? sim.totalMs : sim[m.pass].makespanMs;
}

/** Golden-section minimisation of a unimodal function on [lo, hi]; returns the argmin (an end point if best). */
export function goldenMin(fn: (x: number) => number, lo: number, hi: number, iterations = 30): number {
  const phi = (Math.sqrt(5) - 1) / 2;
  let [a, b] = [lo, hi];
  let x1 = b - phi * (b - a);
  let x2 = a + phi * (b - a);
  let f1 = fn(x1);
  let f2 = fn(x2);
  for (let k = 0; k < iterations; k++) {
    if (f1 <= f2) {
      b = x2; x2 = x1; f2 = f1; x1 = b - phi * (b - a); f1 = fn(x1);
    } else {
      a = x1; x1 = x2; f1 = f2; x2 = a + phi * (b - a); f2 = fn(x2);
    }
  }
  const mid = (a + b) / 2;
  return [lo, mid, hi].reduce((best, x) => (fn(x) < fn(best) ? x : best), mid);
}

const makespanError = (model: CostModel, makespans: MeasuredMakespan[]) =>
  makespans.reduce((s, x) => s + ((predictedMakespan(model, x) - x.ms) / x.ms) ** 2, 0);

/**
 * Fits the executor's per-op gap (ms) and, when pipelined plans were measured, the overlap
 * slowdown (in [1, 4]) to measured makespans: nested golden-section searches on relative error.
 */
function fitSchedule(model: CostModel, makespans: MeasuredMakespan[], fitOverlap: boolean): { opGapMs: number; overlapSlowdown: number } {
  const longest = Math.max(...makespans.map((m) => m.ms));
  const gapFor = (f: number) => goldenMin((g) => makespanError({ ...model, overlapSlowdown: f, opGapMs: g }, makespans), 0, longest / 4, 24);
  const overlapSlowdown = fitOverlap
    ? goldenMin((f) => makespanError({ ...model, overlapSlowdown: f, opGapMs: gapFor(f) }, makespans), 1, 4, 24)
    : model.overlapSlowdown;
  return { overlapSlowdown, opGapMs: gapFor(overlapSlowdown) };
}

export interface CalibrationReport {
  kinds: Array<{ kind: OpKind; samples: number; a: number; b: number; rel_rmse: number }>;
  uncalibrated: OpKind[];
  overlapSlowdown: { value: number; fitted: boolean };
  opGapMs: { value: number; fitted: boolean };
  makespans: Array<{ where: string; measured_ms: number; predicted_ms: number; rel_error: number }>;
}

/** Fits the model to calibration data. Kinds without measurements keep the base model's coefficients. */
export function calibrate(base: CostModel, data: CalibrationData, source = "calibration"): { model: CostModel; report: CalibrationReport } {
  const pts = calibrationPoints(base, data);
  const byKind = new Map<OpKind, Point[]>();
  for (const p of pts) byKind.set(p.kind, [...(byKind.get(p.kind) ?? []), p]);
  const coefficients = { ...base.coefficients } as Record<OpKind, Coefficient>;
  const kinds: CalibrationReport["kinds"] = [];
  for (const kind of OP_KINDS) {
    const kp = byKind.get(kind);
    if (!kp) continue;
    const c = fitLine(kp, base.coefficients[kind]);
    const err = relRmse(kp, c);
    coefficients[kind] = { ...c, source: "fit", samples: kp.length, rel_rmse: err };
    kinds.push({ kind, samples: kp.length, a: c.a, b: c.b, rel_rmse: err });
  }
  let model: CostModel = {
    ...base,
    coefficients,
    calibration: { source, samples: pts.length, fitted_kinds: kinds.map((k) => k.kind) },
  };
  // The schedule terms: a per-op gap from any measured makespan, the overlap slowdown only from
  // pipelined plans (P > 1), where compute and communication actually overlap.
  const fitted = data.makespans.some((m) => m.plan.boundaries.length > 2);
  if (data.makespans.length > 0) model = { ...model, ...fitSchedule(model, data.makespans, fitted) };
  const makespans = data.makespans.map((m) => {
    const predicted = predictedMakespan(model, m);
    return { where: m.where, measured_ms: m.ms, predicted_ms: predicted, rel_error: (predicted - m.ms) / m.ms };
  });
  return {
    model,
    report: {
      kinds,
      uncalibrated: OP_KINDS.filter((k) => !byKind.has(k)),
      overlapSlowdown: { value: model.overlapSlowdown, fitted },
      opGapMs: { value: model.opGapMs, fitted: data.makespans.length > 0 },
      makespans,
    },
  };
}

/** Replays an executed plan with its measured op times (no model): what the schedule alone explains. */
export function replayRun(run: CalibrationData["runs"][number], overlapSlowdown = 1) {
  return simulatePlan(run.plan, (op) => {
    const ms = run.opTimesMs.get(op.id);
    if (ms === undefined) throw new Error(`${run.where}: no measured time for op ${op.id}`);
    return ms;
  }, { overlapSlowdown });
}
