// Planning a config's block: the cost model a config implies (its device profile, its emulated
// interconnect, a calibration), and the planner's choice for it, written as a plan and a trace with
// the predicted timeline as a report. `ampipe plan` (src/commands/plan.ts) parses its options into
// these; `ampipe run`, `ampipe train`, `ampipe compare` and the bench sweep plan through them too.
import { join } from "node:path";
import type { ExperimentConfig } from "../config/index.ts";
import { validatePlan } from "./check.ts";
import { calibrate, readCalibration, type CalibrationReport } from "./calibration.ts";
import { PROFILES, profileModel, type CostModel } from "./costs.ts";
import { dimsFromConfig } from "./dims.ts";
import type { Variant } from "./ir.ts";
import { writeFileAtomic, writePlan } from "./io.ts";
import { planBlock, type PlanChoice } from "./planner.ts";
import { TIMELINE_LEGEND, chromeTrace, textTimeline } from "./trace.ts";

export interface CostModelOverrides {
  /** Device profile name; default h100 when the config runs on cuda, else cpu. */
  profile?: string;
  bandwidthGbps?: number;
  latencyUs?: number;
  overlapSlowdown?: number;
}

/**
 * The cost model for a config: its device profile, `pipeline.emulated_comm` as the interconnect
 * (explicit overrides win), fitted to the calibration file when one is given. An explicit
 * overlap slowdown is kept over the fitted one.
 */
export function costModelFor(cfg: ExperimentConfig, calibrationPath?: string, over: CostModelOverrides = {}): { model: CostModel; calibration?: CalibrationReport } {
  const profile = over.profile ?? (cfg.parallelism.device === "cuda" ? "h100" : "cpu");
  if (!PROFILES[profile]) throw new Error(`--profile: unknown device profile "${profile}" (known: ${Object.keys(PROFILES).join(", ")})`);
  const emu = cfg.pipeline.emulated_comm;
  const base = profileModel(profile, cfg.model.dtype, {
    bandwidthGbps: over.bandwidthGbps ?? emu?.bandwidth_gbps,
    latencyUs: over.latencyUs ?? emu?.latency_us,
    overlapSlowdown: over.overlapSlowdown,
    work: { expertActivation: cfg.model.moe_expert_activation, commWorldSize: emu?.world_size },
  });
  if (!calibrationPath) return { model: base };
  const r = calibrate(base, readCalibration(calibrationPath), calibrationPath);
  const model = over.overlapSlowdown !== undefined ? { ...r.model, overlapSlowdown: base.overlapSlowdown } : r.model;
  return { model, calibration: r.report };
}

/** What `planForConfig` takes: the config's own choices (pipeline.variant, pipeline.degree) unless given here. */
export interface PlanForConfigOptions extends CostModelOverrides {
  /** Where to write the plan (default: <run.output_dir>/plan.json). */
  out?: string;
  /** Where to write its Chrome trace (default: the plan path with .trace.json); false: none. */
  trace?: string | false;
  calibration?: string;
  variant?: Variant | "auto";
  /** The pipe degree, or undefined for the config's (pipeline.degree; "auto" searches). */
  degree?: number | "auto";
  granularity?: number;
}

export interface PlanForConfigResult {
  choice: PlanChoice;
  model: CostModel;
  calibration?: CalibrationReport;
  outPath: string;
  tracePath: string | null;
  /** The human-readable report. */
  text: string;
  /** The machine-readable summary (--json). */
  summary: Record<string, unknown>;
}

/**
 * Plans a resolved config's block: chooses the pipe degree, variant and chunk boundaries under the
 * config's cost model, writes the plan (and its trace) and returns the choice with its report.
 */
export function planForConfig(cfg: ExperimentConfig, o: PlanForConfigOptions = {}): PlanForConfigResult {
  const dims = dimsFromConfig(cfg);
  const pl = cfg.pipeline;

  const variantArg = o.variant ?? pl.variant;
  const degreeArg = o.degree ?? pl.degree;
  if (degreeArg !== "auto" && !(Number.isInteger(degreeArg) && degreeArg >= 1 && degreeArg <= dims.seq_length))
    throw new Error(`--degree: must be "auto" or an integer in [1, ${dims.seq_length}], got "${degreeArg}"`);
  const degree = degreeArg === "auto" ? undefined : degreeArg;
  const { model, calibration } = costModelFor(cfg, o.calibration, o);

  // Fixed config values constrain the search; a degree with explicit boundaries must agree (checked by the config).
  const variants: Variant[] | undefined = variantArg === "auto" ? undefined : [variantArg as Variant];
  if (variants?.[0] === "sequential" && degree !== undefined && degree !== 1)
    throw new Error(`--degree: the sequential variant has one chunk, got ${degree}`);
  const boundaries = pl.boundaries ?? undefined;
  if (boundaries && degree !== undefined && boundaries.length !== degree + 1)
    throw new Error(`--degree: ${degree} disagrees with pipeline.boundaries (${boundaries.length - 1} chunks)`);
  const choice = planBlock(dims, model, {
    variants,
    degrees: variants?.[0] === "sequential" ? [1] : degree !== undefined ? [degree] : undefined,
    boundaries,
    granularity: o.granularity,
    chunkQkv: pl.chunk_qkv,
    capacityScope: pl.capacity_scope,
  });
  const plan = validatePlan(choice.plan);

  const outPath = o.out ?? join(cfg.run.output_dir, "plan.json");
  const tracePath = o.trace === false ? null : (o.trace ?? outPath.replace(/(\.json)?$/, ".trace.json"));
  writePlan(outPath, plan);
  if (tracePath) writeFileAtomic(tracePath, JSON.stringify(chromeTrace(plan, choice.sim)) + "\n");

  const { sim, best, sequential } = choice;
  const f = (ms: number) => (ms >= 100 ? ms.toFixed(1) : ms >= 1 ? ms.toFixed(3) : ms.toPrecision(3));
  const P = best.boundaries.length - 1;
  const lines: string[] = [];
  lines.push(`plan: ${best.variant}, P=${P}, boundaries [${best.boundaries.join(", ")}], chunk_qkv ${plan.chunk_qkv}`);
  lines.push(
    `model: profile ${model.profile} (${dims.dtype})${model.calibration ? `, calibrated from ${model.calibration.samples} op times (${model.calibration.source})` : ", uncalibrated defaults"}` +
      `, overlap slowdown ${model.overlapSlowdown.toFixed(2)}${model.opGapMs > 0 ? `, per-op gap ${f(model.opGapMs)} ms` : ""}, granularity ${choice.granularity}, ${choice.evaluated} plans simulated`,
  );
  if (calibration) {
    for (const k of calibration.kinds)
      lines.push(`  fit ${k.kind.padEnd(13)} n=${String(k.samples).padEnd(4)} a=${k.a.toExponential(3)} b=${f(k.b)} ms  rel.rmse ${(100 * k.rel_rmse).toFixed(1)}%`);
    if (calibration.uncalibrated.length) lines.push(`  not measured (profile defaults): ${calibration.uncalibrated.join(", ")}`);
    for (const m of calibration.makespans)
      lines.push(`  ${m.where}: measured ${f(m.measured_ms)} ms, predicted ${f(m.predicted_ms)} ms (${(100 * m.rel_error).toFixed(1)}%)`);
  }
  for (const [name, r] of [["forward", sim.forward], ["backward", sim.backward]] as const) {
    lines.push("");
    lines.push(`${name}: ${f(r.makespanMs)} ms predicted`);
    for (const t of textTimeline(plan, r)) lines.push(`  ${t}`);
    lines.push(`  busy: ${r.streams.map((s) => `${s.name} ${f(s.busyMs)} ms (${((100 * s.busyMs) / Math.max(r.makespanMs, 1e-12)).toFixed(0)}%)`).join(", ")}`);
    lines.push(`  critical path: ${r.criticalPath.join(" > ")}`);
  }
  lines.push(`  ${TIMELINE_LEGEND}`);
  lines.push("");
  lines.push(`predicted forward+backward: ${f(best.totalMs)} ms; sequential: ${f(sequential.totalMs)} ms; speed-up ${choice.speedup.toFixed(3)}x`);
  lines.push(`best per (variant, P):`);
  for (const c of choice.candidates.slice(0, 6))
    lines.push(`  ${c.variant.padEnd(11)} P=${String(c.boundaries.length - 1).padEnd(3)} ${f(c.totalMs).padStart(9)} ms  [${c.boundaries.join(", ")}]`);
  lines.push("");
  lines.push(`wrote ${outPath}${tracePath ? ` and ${tracePath} (open in https://ui.perfetto.dev)` : ""}`);

  const summary = {
    plan: outPath,
    trace: tracePath,
    variant: best.variant,
    degree: P,
    boundaries: best.boundaries,
    chunk_qkv: plan.chunk_qkv,
    profile: model.profile,
    calibrated: model.calibration !== undefined,
    overlap_slowdown: model.overlapSlowdown,
    op_gap_ms: model.opGapMs,
    granularity: choice.granularity,
    predicted: {
      forward_ms: sim.forward.makespanMs,
      backward_ms: sim.backward.makespanMs,
      total_ms: sim.totalMs,
      sequential_total_ms: sequential.totalMs,
      speedup: choice.speedup,
      streams: Object.fromEntries(
        (["forward", "backward"] as const).map((pass) => [pass, sim[pass].streams.map((s) => ({ name: s.name, kind: s.kind, busy_ms: s.busyMs, idle_ms: s.idleMs }))]),
      ),
      critical_path: { forward: sim.forward.criticalPath, backward: sim.backward.criticalPath },
    },
    candidates: choice.candidates.map((c) => ({ variant: c.variant, degree: c.boundaries.length - 1, boundaries: c.boundaries, total_ms: c.totalMs })),
    ...(calibration ? { calibration } : {}),
  };
  return { choice, model, calibration, outPath, tracePath, text: lines.join("\n") + "\n", summary };
}
