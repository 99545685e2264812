// `ampipe plan <config> --out plan.json`: choose the pipe degree, variant and chunk boundaries for
// a config's block under the cost model, write the plan and its Chrome trace, and print the
// predicted timeline and the speed-up over the sequential block.
import { join } from "node:path";
import { Command, Option } from "commander";
import { ConfigError, loadConfig, type ExperimentConfig } from "../config/index.ts";
import { configFromMegatron } from "../config/megatron.ts";
import { validatePlan } from "../plan/check.ts";
import { calibrate, readCalibration, type CalibrationReport } from "../plan/calibration.ts";
import { PROFILES, profileModel, type CostModel } from "../plan/costs.ts";
import { dimsFromConfig } from "../plan/dims.ts";
import { VARIANTS, type Variant } from "../plan/ir.ts";
import { writeFileAtomic, writePlan } from "../plan/io.ts";
import { planBlock, type PlanChoice } from "../plan/planner.ts";
import { TIMELINE_LEGEND, chromeTrace, textTimeline } from "../plan/trace.ts";

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

export interface PlanCommandOptions {
  set?: string[];
  /** The config comes from these Megatron-LM flags (the config path is then unused). */
  fromMegatron?: boolean;
  out?: string;
  trace?: string | false;
  calibration?: string;
  variant?: string;
  degree?: string;
  profile?: string;
  granularity?: string;
  bandwidthGbps?: string;
  latencyUs?: string;
  overlapSlowdown?: string;
  json?: boolean;
}

export interface PlanCommandResult {
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

const num = (flag: string, v: string | undefined, check: (x: number) => boolean, rule: string): number | undefined => {
  if (v === undefined) return undefined;
  const x = Number(v);
  if (!Number.isFinite(x) || !check(x)) throw new Error(`${flag}: ${rule}, got "${v}"`);
  return x;
};

/** Runs the planner for a config file (or a resolved config); writes the plan (and trace) and returns the report. */
export function runPlan(source: string | ExperimentConfig, o: PlanCommandOptions): PlanCommandResult {
  const cfg = typeof source === "string" ? loadConfig(source, o.set ?? []) : source;
  const dims = dimsFromConfig(cfg);
  const pl = cfg.pipeline;

  const variantArg = o.variant ?? pl.variant;
  if (variantArg !== "auto" && !VARIANTS.includes(variantArg as Variant))
    throw new Error(`--variant: must be one of ${[...VARIANTS, "auto"].join(", ")}, got "${variantArg}"`);
  const degreeArg = o.degree ?? String(pl.degree);
  const degree = degreeArg === "auto" ? undefined : num("--degree", degreeArg, (x) => Number.isInteger(x) && x >= 1 && x <= dims.seq_length, `must be "auto" or an integer in [1, ${dims.seq_length}]`);
  const { model, calibration } = costModelFor(cfg, o.calibration, {
    profile: o.profile,
    bandwidthGbps: num("--bandwidth-gbps", o.bandwidthGbps, (x) => x > 0, "must be > 0"),
    latencyUs: num("--latency-us", o.latencyUs, (x) => x >= 0, "must be >= 0"),
    overlapSlowdown: num("--overlap-slowdown", o.overlapSlowdown, (x) => x >= 1, "must be >= 1"),
  });

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
    granularity: num("--granularity", o.granularity, (x) => Number.isInteger(x) && x >= 1, "must be a positive integer"),
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

export function register(program: Command): void {
  program
    .command("plan")
    .description("choose pipe degree, variant and chunk boundaries under the cost model; write the plan and its trace")
    .argument("[config]", "experiment config (.yaml, .yml or .json); with --from-megatron, the flags after --")
    .argument("[flags...]")
    .option("--from-megatron", "read the block from Megatron-LM flags given after -- instead of a config file")
    .option("--out <file>", "where to write the plan (default: <run.output_dir>/plan.json)")
    .option("--trace <file>", "where to write the Chrome trace (default: the plan path with .trace.json)")
    .option("--no-trace", "do not write a trace")
    .option("--calibration <file>", "measured op times to fit the cost model to (docs/plan.md)")
    .option("--variant <variant>", "sequential | grouped | interleaved | moe-overlap (the peer baseline) | auto (default: pipeline.variant)")
    .option("--degree <P>", "pipe degree or auto (default: pipeline.degree)")
    .addOption(new Option("--profile <name>", "device profile for the default costs (default: h100 on cuda, else cpu)").choices(Object.keys(PROFILES)))
    .option("--granularity <tokens>", "interior chunk boundaries are multiples of this (default: 64 on GPU profiles, 8 on cpu)")
    .option("--bandwidth-gbps <x>", "interconnect bandwidth per rank in GB/s, 1e9 bytes/s (default: pipeline.emulated_comm or the profile's)")
    .option("--latency-us <x>", "interconnect latency (default: pipeline.emulated_comm or the profile's)")
    .option("--overlap-slowdown <x>", "compute/comm slowdown factor while both run (default: profile or calibration)")
    .option("--set <field=value>", "override a config field, e.g. --set model.seq_length=4096 (repeatable)", (v: string, acc: string[]) => [...acc, v], [])
    .option("--json", "print a JSON summary instead of the text report")
    .action((config: string | undefined, flags: string[], opts: PlanCommandOptions) => {
      try {
        let source: string | ExperimentConfig;
        if (opts.fromMegatron) {
          const argv = [...(config !== undefined ? [config] : []), ...flags];
          if (!argv.length) throw new Error("--from-megatron: give the Megatron-LM flags after --");
          const r = configFromMegatron(argv, opts.set ?? []);
          for (const w of r.warnings) process.stderr.write(`warning: ${w}\n`);
          source = r.config;
        } else {
          if (config === undefined) throw new Error("missing the config argument (or use --from-megatron -- <flags>)");
          if (flags.length) throw new Error(`unexpected argument(s) after the config: ${flags.join(" ")}`);
          source = config;
        }
        const r = runPlan(source, opts);
        process.stdout.write(opts.json ? JSON.stringify(r.summary, null, 2) + "\n" : r.text);
      } catch (e) {
        process.stderr.write(`${e instanceof ConfigError ? "" : "ampipe plan: "}${(e as Error).message}\n`);
        process.exitCode = 2;
      }
    });
}
