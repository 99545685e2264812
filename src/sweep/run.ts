// `ampipe bench <config>`: the experiment sweep (docs/bench.md). On the config's ranks, through
// the bridge: first calibrate the cost model from measured op times at each group (sequence
// length x comm/compute ratio), then run every case of the grid against the sequential block
// with the ranks' `run_block` command (ABBA order, the equivalence check included), write one
// line per finished case to results.jsonl, results.csv, calibration.json and a trace per case.
//
// Faults: results.jsonl is appended and fsynced per case, so an interrupted sweep (Ctrl-C,
// kill -9) keeps its finished cases and a rerun on the same directory resumes after them; a case
// that fails records its error and the sweep goes on (the ranks are restarted first, since a
// failed rank, or one left inside a collective, cannot be trusted with the next case).
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import { CommandError, RankFailure, RunClosedError, type RankRun } from "../bridge/index.ts";
import { loadConfig, type EmulatedCommConfig, type ExperimentConfig } from "../config/index.ts";
import { calibrate, parseCalibration, type CalibrationReport } from "../plan/calibration.ts";
import { predict, type CostModel } from "../plan/costs.ts";
import { makePlan } from "../plan/generators.ts";
import { COMM_KINDS, DTYPE_BYTES, type Plan } from "../plan/ir.ts";
import { writeFileAtomic } from "../plan/io.ts";
import { planBlock } from "../plan/planner.ts";
import { simulatePlan } from "../plan/simulate.ts";
import { chromeTrace } from "../plan/trace.ts";
import { costModelFor, dimsFromConfig } from "../commands/plan.ts";
import { startConfigRun, type ControllerCliOptions } from "../commands/ping.ts";
import { RANK_MODULE, summarizeRanks, type RankResult } from "../commands/run.ts";
import { makeProgress, type Progress } from "../train/progress.ts";
import { benchSettings, expandGrid, groupsOf, withModel, type CaseSpec, type Group } from "./grid.ts";
import {
  CSV_FILE, RESULTS_FILE, appendResult, quartiles, readResults, referenceMoeOverlap, writeCsv, type CaseResult,
} from "./results.ts";

export const BENCH_FORMAT = "ampipe.bench";
export const MANIFEST_FILE = "bench.json";
export const CALIBRATION_FILE = "calibration.json";

export interface BenchOptions
  extends ControllerCliOptions {
  out?: string;
  cases?: number;
  quick?: boolean;
  /** Remove an earlier sweep's files from the output directory first (no resume). */
  fresh?: boolean;
  set: string[];
}

/** A calibration run as calibration.json holds it (the planner's format, docs/plan.md). */
interface CalibrationRunDoc {
  plan: Plan;
  op_times_ms: { forward: Record<string, number>; backward: Record<string, number> };
  makespan_ms?: { total: number };
  source: string;
}

interface GroupState {
  /** The bench.models name, or null for the config's model. */
  model: string | null;
  seq_length: number;
  comm_compute_ratio: number | null;
  /** The sequential block without emulated delay (slowest rank, median): what the ratio is of. */
  compute_ms: number | null;
  emulated_comm: EmulatedCommConfig | null;
  emulated: string | null;
  /** Indices into calibration.json's runs used to fit this group's model. */
  calibration_runs: number[];
  error: string | null;
}

interface Manifest {
  format: string;
  version: 1;
  fingerprint: string;
  config_path: string;
  config: ExperimentConfig;
  settings: ReturnType<typeof benchSettings>;
  cases: string[];
  groups: Record<string, GroupState>;
  created: string;
  device?: string;
  torch?: string;
}

/** Emulated label, as the Python side writes it (EmulatedComm.label). */
export function emulatedLabel(e: EmulatedCommConfig): string {
  const g = (x: number) => String(Number(x.toPrecision(6)));
  return `emulated ${e.world_size}-way all-to-all (${g(e.latency_us)} us + bytes / ${g(e.bandwidth_gbps)} GB/s)`;
}

/**
 * The emulated bandwidth (GB/s) at which the sequential block's four all-to-alls (dispatch,
 * combine and their backward) take `ratio` x `computeMs`: each moves a rank's dropless buffer
 * (tokens x top-k x hidden) minus its own 1/world share, plus the latency per op.
 */
/** Bytes the sequential block's four all-to-alls put on the wire per rank (dropless buffer, or E x capacity rows). */
function baselineWireBytes(cfg: ExperimentConfig, seqLength: number, worldSize: number): number {
  const m = cfg.model; // the group's model
  const tokens = seqLength * m.micro_batch_size;
  const cap = m.moe_expert_capacity_factor;
  const rows = cap === null ? tokens * m.moe_router_topk : m.num_experts * Math.ceil((cap * tokens * m.moe_router_topk) / m.num_experts);
  const bytes = rows * m.hidden_size * DTYPE_BYTES[m.dtype];
  return (4 * bytes * (worldSize - 1)) / worldSize;
}

/** The emulated delay (ms) of the sequential block's four all-to-alls. */
export function baselineDelayMs(cfg: ExperimentConfig, emu: EmulatedCommConfig): number {
  return (4 * emu.latency_us) / 1e3 + (baselineWireBytes(cfg, cfg.model.seq_length, emu.world_size) / (emu.bandwidth_gbps * 1e9)) * 1e3;
}

export function bandwidthForRatio(cfg: ExperimentConfig, seqLength: number, ratio: number, computeMs: number, emu: EmulatedCommConfig): number {
  const wire = baselineWireBytes(cfg, seqLength, emu.world_size);
  const budgetS = (ratio * computeMs) / 1e3 - (4 * emu.latency_us) / 1e6;
  if (budgetS <= 0) throw new Error(`bench.comm_compute_ratios: at ${ratio} the latency alone (4 x ${emu.latency_us} us) exceeds ${ratio} x compute (${computeMs.toFixed(2)} ms) at seq_length ${seqLength}`);
  return wire / budgetS / 1e9;
}

function groupConfig(cfg: ExperimentConfig, group: Group, emu: EmulatedCommConfig | null): ExperimentConfig {
  const c = withModel(cfg, group.model, group.seqLength);
  c.pipeline.emulated_comm = emu;
  return c;
}

/** What identifies a sweep's measurements: the config (its output directory and bench section aside) and the settings. */
export function fingerprint(cfg: ExperimentConfig, settings: unknown): string {
  const c = structuredClone(cfg) as unknown as Record<string, Record<string, unknown>>;
  delete c.run.output_dir;
  delete c.bench;
  return createHash("sha256").update(JSON.stringify({ c, settings })).digest("hex").slice(0, 16);
}

const fmt = (ms: number) => (ms >= 100 ? ms.toFixed(1) : ms.toFixed(2));
const errorText = (e: unknown) => (e instanceof Error ? e.message : String(e));

interface Printer { line(s: string): void }

/** The sweep; returns the exit code (0: every case ran, 1: a case failed or the ranks could not start, 2: bad input, 130/143: interrupted). */
export async function benchCommand(configPath: string, o: BenchOptions, out: Printer = { line: (s) => process.stdout.write(s + "\n") }): Promise<number> {
  const t0 = performance.now();
  let cfg: ExperimentConfig;
  let settings: ReturnType<typeof benchSettings>;
  let cases: CaseSpec[];
  let outDir: string;
  let manifest: Manifest;
  let done: Map<string, CaseResult>;
  let calibrationRuns: CalibrationRunDoc[];
  try {
    cfg = loadConfig(configPath, o.set);
    settings = benchSettings(cfg, o.quick ?? false);
    cases = expandGrid(settings);
    if (o.cases !== undefined) cases = cases.slice(0, o.cases);
    if (cases.length === 0) throw new Error("the bench grid is empty (bench.variants, degrees, moe_overlap_degrees and planner select no case)");
    outDir = o.out ?? join(cfg.run.output_dir, "bench");
    if (o.fresh)
      for (const f of [MANIFEST_FILE, CALIBRATION_FILE, RESULTS_FILE, CSV_FILE, "traces"]) rmSync(join(outDir, f), { recursive: true, force: true });
    mkdirSync(join(outDir, "traces"), { recursive: true });
    const fp = fingerprint(cfg, settings);
    const manifestPath = join(outDir, MANIFEST_FILE);
    if (existsSync(manifestPath)) {
      const old = JSON.parse(readFileSync(manifestPath, "utf8")) as Manifest;
      if (old.fingerprint !== fp)
        throw new Error(`--out ${outDir}: it holds a sweep of another config or grid (fingerprint ${old.fingerprint}, this one ${fp}); choose another --out or remove it`);
      manifest = { ...old, cases: [...new Set([...old.cases, ...cases.map((c) => c.id)])] };
    } else {
      manifest = {
        format: BENCH_FORMAT, version: 1, fingerprint: fp, config_path: configPath, config: cfg, settings,
        cases: cases.map((c) => c.id), groups: {}, created: new Date().toISOString(),
      };
    }
    const calPath = join(outDir, CALIBRATION_FILE);
    calibrationRuns = existsSync(calPath) ? (JSON.parse(readFileSync(calPath, "utf8")).runs as CalibrationRunDoc[]) : [];
    done = new Map(readResults(join(outDir, RESULTS_FILE)).filter((r) => r.status === "ok").map((r) => [r.case, r]));
  } catch (e) {
    process.stderr.write(`ampipe bench: ${errorText(e)}\n`);
    return 2;
  }
  const saveManifest = () => writeFileAtomic(join(outDir, MANIFEST_FILE), JSON.stringify(manifest, null, 2) + "\n");
  const saveCalibration = () => writeFileAtomic(join(outDir, CALIBRATION_FILE), JSON.stringify({
    format: "ampipe.calibration", version: 1, device: manifest.device ?? cfg.parallelism.device, runs: calibrationRuns,
  }, null, 2) + "\n");
  saveManifest();

  const pending = cases.filter((c) => !done.has(c.id));
  const label = (emu: string | null) => (emu ? `${emu} — EMULATED` : "real interconnect");
  const nGroups = groupsOf(settings).filter((g) => cases.some((c) => c.group.id === g.id)).length;
  out.line(`bench: ${cases.length} cases over ${nGroups} group${nGroups === 1 ? "" : "s"} ` +
    `(seq_length ${settings.seq_lengths.join(", ")}${settings.comm_compute_ratios ? `; comm/compute ${settings.comm_compute_ratios.join(", ")}` : ""}); ` +
    `${done.size ? `${cases.length - pending.length} already done in ${outDir}, ` : ""}${pending.length} to run; ${settings.steps} steps each (ABBA against the sequential block); ` +
    `interconnect: ${cfg.pipeline.emulated_comm ? `EMULATED ${cfg.pipeline.emulated_comm.world_size}-way all-to-all${settings.comm_compute_ratios ? " (bandwidth set per group)" : ""}` : "real"}`);
  if (pending.length === 0) {
    finish();
    return 0;
  }

  // ---- ranks, restarted after a failed case ----
  let run: RankRun | undefined;
  let stopping: NodeJS.Signals | null = null;
  const onSignal = (sig: NodeJS.Signals) => {
    stopping = sig;
    process.stderr.write(`ampipe bench: ${sig}: stopping; finished cases are kept in ${join(outDir, RESULTS_FILE)} (rerun to resume)\n`);
    void run?.close();
  };
  process.on("SIGINT", onSignal);
  process.on("SIGTERM", onSignal);
  const par = cfg.parallelism;
  const ensureRun = async (): Promise<RankRun> => {
    if (run && !run.closing && !run.failure) return run;
    await run?.close();
    run = await startConfigRun(par, o, { imports: [RANK_MODULE] },
    );
    manifest.device = run.ranks[0].device;
    manifest.torch = run.ranks[0].torch;
    return run;
  };
  const runBlock = async (c: ExperimentConfig, plan: Plan, steps: number, warmup: number): Promise<RankResult[]> => {
    const r = await ensureRun();
    return (await r.broadcast("run_block", { config: c, plan, steps, warmup, seed: cfg.run.seed })) as RankResult[];
  };
  /** After a failure: the ranks are restarted for the next case (unless we are stopping). */
  const dropRun = async () => {
    const r = run;
    run = undefined;
    await r?.close();
  };

  // ---- calibration, per group ----
  const models = new Map<string, { model: CostModel; report: CalibrationReport }>();
  // The compute time per (model, sequence length), shared by the groups of several ratios.
  const computeMs = new Map<string, number>();
  const computeKey = (g: Group) => sequentialSource(g);
  for (const g of groupsOf(settings)) {
    const st = manifest.groups[g.id];
    if (st?.compute_ms != null) computeMs.set(computeKey(g), st.compute_ms);
  }
  const calibrateGroup = async (group: Group): Promise<void> => {
    let state = manifest.groups[group.id];
    if (!state || state.error !== null || state.calibration_runs.length === 0) {
      const S = group.seqLength;
      const runsBefore = calibrationRuns.length;
      const compute = async (): Promise<number> => {
        const known = computeMs.get(computeKey(group));
        if (known !== undefined) return known;
        // The sequential block without emulated delay: its time is the compute the ratio refers to,
        // its one-chunk op times (all but the all-to-alls) calibrate the whole-sequence ops.
        const c0 = groupConfig(cfg, group, null);
        const plan = makePlan("sequential", dimsFromConfig(c0), { chunkQkv: cfg.pipeline.chunk_qkv, capacityScope: cfg.pipeline.capacity_scope });
        // At least one warm-up step: a cold first step (lazy initialisation) would set the ratio.
        const res = await runBlock(c0, plan, settings.steps, Math.max(1, settings.warmup));
        const ms = summarizeRanks(res, c0.model.dtype).timing.baseline_ms;
        for (const r of res) calibrationRuns.push(calibrationRun(plan, r, `${sequentialSource(group)}, rank ${r.rank}`));
        computeMs.set(computeKey(group), ms);
        return ms;
      };
      const base = cfg.pipeline.emulated_comm;
      let emu: EmulatedCommConfig | null = base;
      const cms = await compute();
      if (group.ratio !== null) emu = { ...base!, bandwidth_gbps: bandwidthForRatio(groupConfig(cfg, group, null), S, group.ratio, cms, base!) };
      const gc = groupConfig(cfg, group, emu);
      const plan = makePlan("grouped", dimsFromConfig(gc), { degree: settings.calibration_degree, chunkQkv: cfg.pipeline.chunk_qkv, capacityScope: cfg.pipeline.capacity_scope });
      const res = await runBlock(gc, plan, settings.steps, settings.warmup);
      for (const r of res) calibrationRuns.push(calibrationRun(plan, r, `bench ${group.id}: grouped P=${settings.calibration_degree}${emu ? ` (${emulatedLabel(emu)})` : ""}, rank ${r.rank}`));
      const idx = calibrationRuns.map((_, i) => i).filter((i) => i >= runsBefore || calibrationRuns[i].source.startsWith(sequentialSource(group)));
      state = {
        model: group.model?.name ?? null, seq_length: S, comm_compute_ratio: group.ratio, compute_ms: cms,
        emulated_comm: emu, emulated: emu ? emulatedLabel(emu) : null, calibration_runs: idx, error: null,
      };
      manifest.groups[group.id] = state;
      saveCalibration();
      saveManifest();
    }
    const gc = groupConfig(cfg, group, state.emulated_comm);
    // The sequential run had no emulated delay: in an emulated group its all-to-alls and its
    // makespan say nothing about the group's interconnect, only its compute ops are used.
    const runs = state.calibration_runs.map((i) => calibrationRuns[i]).map((r) =>
      state!.emulated_comm !== null && r.source.startsWith(sequentialSource(group)) ? computeOnly(r) : r);
    const data = parseCalibration({ runs }, outDir, `${CALIBRATION_FILE} (${group.id})`);
    const r = calibrate(costModelFor(gc).model, data, `${CALIBRATION_FILE} (${group.id})`);
    models.set(group.id, r);
  };

  // ---- the cases ----
  // The ETA weighs each case by its expected cost (a long sequence costs more than a short one).
  // A group not yet calibrated runs two more comparisons (sequential and the calibration plan)
  // before its first case: about two cases' worth.
  const calibrated = new Set(Object.entries(manifest.groups).filter(([, g]) => g.error === null && g.calibration_runs.length > 0).map(([id]) => id));
  const weights = new Map(pending.map((c) => {
    const first = !calibrated.has(c.group.id);
    calibrated.add(c.group.id);
    return [c.id, caseWeight(c) * (first ? 3 : 1)] as const;
  }));
  const totalWeight = [...weights.values()].reduce((a, b) => a + b, 0);
  let doneWeight = 0;
  const tStart = performance.now();
  const eta = () => (doneWeight > 0 ? (((performance.now() - tStart) / 1000) / doneWeight) * Math.max(0, totalWeight - doneWeight) : Infinity);
  const tty = process.stdout.isTTY === true;
  const progress: Progress = makeProgress({ total: cases.length, start: cases.length - pending.length, format: "{case}: {note}", every: 1, eta });
  let doneCount = cases.length - pending.length;
  let failed = 0;
  let externalLost = false;
  try {
    for (const spec of pending) {
      if (stopping) break;
      const group = spec.group;
      if (tty) progress.update(doneCount, { case: spec.id, note: "running" });
      const tc = performance.now();
      let result: CaseResult;
      try {
        if (!models.has(group.id)) {
          progress.log(`calibrating ${group.id} ...`);
          await calibrateGroup(group);
          const st = manifest.groups[group.id];
          progress.log(`  ${group.id}: ${st.compute_ms !== null ? `compute ${fmt(st.compute_ms)} ms, ` : ""}${label(st.emulated)}; ` +
            `cost model fitted to ${models.get(group.id)!.report.kinds.length} op kinds`);
        }
        result = await runCase(spec, manifest.groups[group.id], models.get(group.id)!.model);
      } catch (e) {
        if (stopping || e instanceof RunClosedError) break;
        const st = manifest.groups[group.id];
        result = errorResult(spec, st, e, (performance.now() - tc) / 1000);
        if (!st) manifest.groups[group.id] = { model: group.model?.name ?? null, seq_length: group.seqLength, comm_compute_ratio: group.ratio, compute_ms: null, emulated_comm: null, emulated: null, calibration_runs: [], error: errorText(e) };
        failed++;
        if (o.external && e instanceof RankFailure) {
          // Ranks started by torchrun/Slurm cannot be restarted from here: keep the record, stop.
          appendResult(join(outDir, RESULTS_FILE), result);
          progress.log(`case ${spec.id} failed and the external ranks are gone; stopping (restart the ranks and rerun to resume):\n${indentLines(result.error!)}`);
          externalLost = true;
          break;
        }
        await dropRun();
      }
      if (result.equivalence_ok === false) {
        failed++;
        progress.log(`case ${spec.id}: the pipelined block DIFFERS from the sequential block (largest relative difference ${result.largest_relative_difference}); its times are kept, flagged`);
      }
      appendResult(join(outDir, RESULTS_FILE), result);
      if (result.status === "ok") done.set(result.case, result);
      writeCsv(join(outDir, CSV_FILE), orderedResults());
      const note = result.status === "ok"
        ? `${fmt(result.measured_ms!)} ms, ${result.speedup!.toFixed(3)}x vs sequential${result.speedup_vs_moe_overlap !== null ? `, ${result.speedup_vs_moe_overlap.toFixed(3)}x vs moe-overlap` : ""}, predicted ${fmt(result.predicted_ms!)} ms`
        : `FAILED: ${result.error!.split("\n")[0]}`;
      doneCount++;
      doneWeight += weights.get(spec.id) ?? 0;
      if (tty) progress.log(`[${doneCount}/${cases.length}] ${spec.id}: ${note}`); // each result stays on screen
      progress.update(doneCount, { case: spec.id, note });
      if (result.status === "error") progress.log(`case ${spec.id} failed (recorded; the sweep goes on):\n${indentLines(result.error!)}`);
    }
  } finally {
    progress.stop();
    process.off("SIGINT", onSignal);
    process.off("SIGTERM", onSignal);
    await run?.close();
    saveManifest();
  }
  if (stopping) {
    writeCsv(join(outDir, CSV_FILE), orderedResults());
    out.line(`interrupted: ${done.size} of ${cases.length} cases finished and kept in ${outDir}; rerun the same command to resume`);
    return stopping === "SIGINT" ? 130 : 143;
  }
  finish();
  if (externalLost) return 1;
  return failed > 0 ? 1 : 0;

  // ---- helpers that close over the sweep's state ----

  /** A case's expected cost for the ETA: the uncalibrated model's sequential step at its dims, times (1 + comm/compute). */
  function caseWeight(spec: CaseSpec): number {
    const gc = groupConfig(cfg, spec.group, spec.group.ratio === null ? cfg.pipeline.emulated_comm : null);
    const dims = dimsFromConfig(gc);
    const ms = predict(costModelFor(gc).model, makePlan("sequential", dims, { chunkQkv: cfg.pipeline.chunk_qkv, capacityScope: cfg.pipeline.capacity_scope })).totalMs;
    return ms * (1 + (spec.group.ratio ?? 0));
  }

  function orderedResults(): CaseResult[] {
    const all = readResults(join(outDir, RESULTS_FILE));
    const order = new Map(manifest.cases.map((id, i) => [id, i] as const));
    return referenceMoeOverlap(all.sort((a, b) => (order.get(a.case) ?? 1e9) - (order.get(b.case) ?? 1e9)));
  }

  function finish(): void {
    const results = orderedResults();
    writeCsv(join(outDir, CSV_FILE), results);
    const ok = results.filter((r) => r.status === "ok");
    const errs = results.filter((r) => r.status === "error");
    out.line(`wrote ${join(outDir, RESULTS_FILE)}, ${join(outDir, CSV_FILE)}, ${join(outDir, CALIBRATION_FILE)} and ${ok.length} traces in ${join(outDir, "traces")}`);
    if (errs.length) out.line(`${errs.length} case(s) failed: ${errs.map((r) => r.case).join(", ")} (errors in ${RESULTS_FILE}; rerun to retry them)`);
    out.line(`done in ${((performance.now() - t0) / 1000).toFixed(1)} s; report: ampipe report ${outDir}`);
  }

  async function runCase(spec: CaseSpec, state: GroupState, model: CostModel): Promise<CaseResult> {
    const tc = performance.now();
    const gc = groupConfig(cfg, spec.group, state.emulated_comm);
    const dims = dimsFromConfig(gc);
    const plan = spec.source === "planner"
      ? planBlock(dims, model, { chunkQkv: cfg.pipeline.chunk_qkv, capacityScope: cfg.pipeline.capacity_scope }).plan
      : makePlan(spec.variant!, dims, { degree: spec.degree!, chunkQkv: cfg.pipeline.chunk_qkv, capacityScope: cfg.pipeline.capacity_scope });
    const predicted = predict(model, plan).totalMs;
    const predictedBase = predict(model, makePlan("sequential", dims, { chunkQkv: cfg.pipeline.chunk_qkv, capacityScope: cfg.pipeline.capacity_scope })).totalMs;
    const res = await runBlock(gc, plan, settings.steps, settings.warmup);
    const s = summarizeRanks(res, gc.model.dtype);
    const t = s.timing;
    const sp = quartiles(t.steps.map((x) => x.baseline_ms / x.pipelined_ms));
    const pm = quartiles(t.steps.map((x) => x.pipelined_ms));
    const bm = quartiles(t.steps.map((x) => x.baseline_ms));
    const trace = `traces/${spec.id}.trace.json`;
    const r0 = res[0];
    const replay = simulatePlan(plan, (op, pass) => r0.op_times_ms[pass][op.id] ?? 0);
    writeFileAtomic(join(outDir, trace), JSON.stringify(chromeTrace(plan, replay, `${spec.id}: measured op times of rank ${r0.rank}, replayed`)) + "\n");
    const ref = bestMoeOverlap(spec.group.id);
    // The sequential block's emulated delay in these repetitions: what the ratio actually was.
    const delay = state.emulated_comm ? baselineDelayMs(gc, state.emulated_comm) : null;
    return {
      case: spec.id, group: spec.group.id, model: spec.group.model?.name ?? null, seq_length: spec.group.seqLength, comm_compute_ratio: spec.group.ratio,
      comm_compute_measured: delay !== null && bm.median > delay ? delay / (bm.median - delay) : null,
      source: spec.source, variant: plan.variant, degree: plan.boundaries.length - 1, boundaries: plan.boundaries,
      status: "ok", error: null,
      interconnect: s.emulated ? "emulated" : "real", emulated: s.emulated, bandwidth_gbps: state.emulated_comm?.bandwidth_gbps ?? null,
      measured_ms: pm.median, measured_q1_ms: pm.q1, measured_q3_ms: pm.q3,
      baseline_ms: bm.median, baseline_q1_ms: bm.q1, baseline_q3_ms: bm.q3,
      predicted_ms: predicted, predicted_baseline_ms: predictedBase, prediction_error: predicted / pm.median - 1,
      speedup: sp.median, speedup_q1: sp.q1, speedup_q3: sp.q3,
      // Against the best moe-overlap case of the group finished so far (the report recomputes it over all).
      speedup_vs_moe_overlap: ref ? sp.median / ref.speedup! : spec.source === "moe-overlap" ? 1 : null,
      moe_overlap_reference: ref ? ref.case : spec.source === "moe-overlap" ? spec.id : null,
      overlap_efficiency: t.overlap_efficiency, ideal_bound_ms: t.ideal_bound_ms, replayed_ms: t.replayed_ms,
      equivalence_ok: s.equivalence.ok, largest_relative_difference: s.equivalence.worst.value,
      steps: t.steps.length, trace, samples: t.steps,
      elapsed_s: (performance.now() - tc) / 1000, finished: new Date().toISOString(),
    };
  }

  function bestMoeOverlap(groupId: string): CaseResult | undefined {
    let best: CaseResult | undefined;
    for (const r of done.values())
      if (r.group === groupId && r.source === "moe-overlap" && r.speedup !== null && (!best || r.speedup > best.speedup!)) best = r;
    return best;
  }
}

const sequentialSource = (g: Group) => `bench ${g.model ? `${g.model.name}-` : ""}s${g.seqLength}: sequential, no emulated delay`;

/** A rank's run_block result as a calibration run (the pipelined block's op times and step time). */
function calibrationRun(plan: Plan, r: RankResult, source: string): CalibrationRunDoc {
  return { plan, op_times_ms: r.op_times_ms, makespan_ms: { total: r.pipelined_ms }, source };
}

/** The run without its all-to-alls and its makespan. */
function computeOnly(run: CalibrationRunDoc): CalibrationRunDoc {
  const keep = (pass: "forward" | "backward") => {
    const kinds = new Map(run.plan[pass].map((op) => [op.id, op.kind] as const));
    return Object.fromEntries(Object.entries(run.op_times_ms[pass]).filter(([id]) => !COMM_KINDS.has(kinds.get(id)!)));
  };
  return { plan: run.plan, op_times_ms: { forward: keep("forward"), backward: keep("backward") }, source: run.source };
}

function errorResult(spec: CaseSpec, state: GroupState | undefined, e: unknown, elapsed: number): CaseResult {
  let msg = errorText(e);
  if (e instanceof RankFailure) msg = `rank failure: ${msg}`;
  else if (e instanceof CommandError) msg = `rank error: ${msg}`;
  return {
    case: spec.id, group: spec.group.id, model: spec.group.model?.name ?? null, seq_length: spec.group.seqLength, comm_compute_ratio: spec.group.ratio,
    comm_compute_measured: null, source: spec.source, variant: spec.variant, degree: spec.degree, boundaries: null, status: "error", error: msg,
    interconnect: state?.emulated ? "emulated" : "real", emulated: state?.emulated ?? null, bandwidth_gbps: state?.emulated_comm?.bandwidth_gbps ?? null,
    measured_ms: null, measured_q1_ms: null, measured_q3_ms: null, baseline_ms: null, baseline_q1_ms: null, baseline_q3_ms: null,
    predicted_ms: null, predicted_baseline_ms: null, prediction_error: null, speedup: null, speedup_q1: null, speedup_q3: null,
    speedup_vs_moe_overlap: null, moe_overlap_reference: null, overlap_efficiency: null, ideal_bound_ms: null, replayed_ms: null,
    equivalence_ok: null, largest_relative_difference: null, steps: 0, trace: null, samples: [], elapsed_s: elapsed,
    finished: new Date().toISOString(),
  };
}

function indentLines(s: string): string {
  return s.split("\n").map((l) => `    ${l}`).join("\n");
}
