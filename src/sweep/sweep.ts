// The experiment sweep of `ampipe bench <config>` (docs/bench.md): on the config's ranks, through
// the bridge, first calibrate the cost model from measured op times at each group (sequence
// length x comm/compute ratio), then run every case of the grid against the sequential block with
// the ranks' `run_block` command (ABBA order, the equivalence check included), and record one
// line per finished case in results.jsonl, results.csv, calibration.json and a trace per case.
// src/commands/bench.ts drives it (options, progress, signals, the exit code).
//
// Faults: results.jsonl is appended and fsynced per case, so an interrupted sweep (Ctrl-C,
// kill -9) keeps its finished cases and a rerun on the same directory resumes after them; a case
// that fails records its error and the sweep goes on (the ranks are restarted first, since a
// failed rank, or one left inside a collective, cannot be trusted with the next case).
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import { CommandError, RankFailure, RunClosedError, type RankRun } from "../bridge/index.ts";
import { startConfigRun, type ControllerStartOptions } from "../bridge/start.ts";
import { loadConfig, type EmulatedCommConfig, type ExperimentConfig } from "../config/index.ts";
import { calibrate, parseCalibration, type CalibrationReport } from "../plan/calibration.ts";
import { predict, type CostModel } from "../plan/costs.ts";
import { dimsFromConfig } from "../plan/dims.ts";
import { costModelFor } from "../plan/for-config.ts";
import { makePlan } from "../plan/generators.ts";
import { COMM_KINDS, type Plan } from "../plan/ir.ts";
import { writeFileAtomic } from "../plan/io.ts";
import { planBlock } from "../plan/planner.ts";
import { RANK_MODULE, RankResultSchema, replayTrace, summarizeRanks, type RankResult } from "../run/run-block.ts";
import { bandwidthForRatio, baselineDelayMs, emulatedLabel } from "./emulation.ts";
import { benchSettings, expandGrid, groupsOf, withModel, type CaseSpec, type Group } from "./grid.ts";
import { lockRunDir } from "../train/lock.ts";
import {
  CSV_FILE, RESULTS_FILE, appendResult, quartiles, readResults, referenceMoeOverlap, writeCsv, type CaseResult,
} from "./results.ts";

export const BENCH_FORMAT = "ampipe.bench";
export const MANIFEST_FILE = "bench.json";
export const CALIBRATION_FILE = "calibration.json";

export interface SweepOptions extends ControllerStartOptions {
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

/** A case's outcome: its result (recorded), and whether external ranks were lost with it (the sweep must stop). */
export interface CaseOutcome {
  result: CaseResult;
  externalLost: boolean;
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

export const errorText = (e: unknown) => (e instanceof Error ? e.message : String(e));
export const fmtMs = (ms: number) => (ms >= 100 ? ms.toFixed(1) : ms.toFixed(2));
const sequentialSource = (g: Group) => `bench ${g.model ? `${g.model.name}-` : ""}s${g.seqLength}: sequential, no emulated delay`;

/** One sweep over an output directory: its grid, what is done, and the ranks it runs on. */
export class Sweep {
  private run: RankRun | undefined;
  private readonly models = new Map<string, { model: CostModel; report: CalibrationReport }>();
  /** The compute time per (model, sequence length), shared by the groups of several ratios. */
  private readonly computeMs = new Map<string, number>();

  private constructor(
    readonly cfg: ExperimentConfig,
    readonly settings: ReturnType<typeof benchSettings>,
    readonly cases: CaseSpec[],
    readonly outDir: string,
    private readonly manifest: Manifest,
    readonly done: Map<string, CaseResult>,
    private readonly calibrationRuns: CalibrationRunDoc[],
    private readonly o: SweepOptions,
  ) {
    for (const g of groupsOf(settings)) {
      const st = manifest.groups[g.id];
      if (st?.compute_ms != null) this.computeMs.set(sequentialSource(g), st.compute_ms);
    }
  }

  /** Reads the config and an earlier sweep in the output directory (refusing one of another config or grid); writes the manifest. */
  static open(configPath: string, o: SweepOptions): Sweep {
    const cfg = loadConfig(configPath, o.set);
    const settings = benchSettings(cfg, o.quick ?? false);
    let cases = expandGrid(settings);
    if (o.cases !== undefined) cases = cases.slice(0, o.cases);
    if (cases.length === 0) throw new Error("the bench grid is empty (bench.variants, degrees, moe_overlap_degrees and planner select no case)");
    const outDir = o.out ?? join(cfg.run.output_dir, "bench");
    lockRunDir(outDir, "ampipe bench"); // held until this process exits
    if (o.fresh)
      for (const f of [MANIFEST_FILE, CALIBRATION_FILE, RESULTS_FILE, CSV_FILE, "traces"]) rmSync(join(outDir, f), { recursive: true, force: true });
    mkdirSync(join(outDir, "traces"), { recursive: true });
    const fp = fingerprint(cfg, settings);
    const manifestPath = join(outDir, MANIFEST_FILE);
    let manifest: Manifest;
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
    const calibrationRuns = existsSync(calPath) ? (JSON.parse(readFileSync(calPath, "utf8")).runs as CalibrationRunDoc[]) : [];
    const done = new Map(readResults(join(outDir, RESULTS_FILE)).filter((r) => r.status === "ok").map((r) => [r.case, r]));
    const sweep = new Sweep(cfg, settings, cases, outDir, manifest, done, calibrationRuns, o);
    sweep.saveManifest();
    return sweep;
  }

  /** The cases still to run (a rerun resumes after the finished ones). */
  get pending(): CaseSpec[] {
    return this.cases.filter((c) => !this.done.has(c.id));
  }

  /** The sweep in one line: cases, groups, what is done, the interconnect. */
  describe(): string {
    const { cases, settings, cfg, done, outDir } = this;
    const pending = this.pending;
    const nGroups = groupsOf(settings).filter((g) => cases.some((c) => c.group.id === g.id)).length;
    return `bench: ${cases.length} cases over ${nGroups} group${nGroups === 1 ? "" : "s"} ` +
      `(seq_length ${settings.seq_lengths.join(", ")}${settings.comm_compute_ratios ? `; comm/compute ${settings.comm_compute_ratios.join(", ")}` : ""}); ` +
      `${done.size ? `${cases.length - pending.length} already done in ${outDir}, ` : ""}${pending.length} to run; ${settings.steps} steps each (ABBA against the sequential block); ` +
      `interconnect: ${cfg.pipeline.emulated_comm ? `EMULATED ${cfg.pipeline.emulated_comm.world_size}-way all-to-all${settings.comm_compute_ratios ? " (bandwidth set per group)" : ""}` : "real"}`;
  }

  /**
   * Each pending case's expected cost, for an ETA: the uncalibrated model's sequential step at its
   * dims, times (1 + comm/compute); a group not yet calibrated runs two more comparisons
   * (sequential and the calibration plan) before its first case: about two cases' worth.
   */
  caseWeights(): Map<string, number> {
    const calibrated = new Set(Object.entries(this.manifest.groups).filter(([, g]) => g.error === null && g.calibration_runs.length > 0).map(([id]) => id));
    return new Map(this.pending.map((c) => {
      const first = !calibrated.has(c.group.id);
      calibrated.add(c.group.id);
      return [c.id, this.caseWeight(c) * (first ? 3 : 1)] as const;
    }));
  }

  private caseWeight(spec: CaseSpec): number {
    const { cfg } = this;
    const gc = groupConfig(cfg, spec.group, spec.group.ratio === null ? cfg.pipeline.emulated_comm : null);
    const ms = predict(costModelFor(gc).model, makePlan("sequential", dimsFromConfig(gc), { chunkQkv: cfg.pipeline.chunk_qkv, capacityScope: cfg.pipeline.capacity_scope })).totalMs;
    return ms * (1 + (spec.group.ratio ?? 0));
  }

  /**
   * Runs one case (calibrating its group first, `log` told), records its result, and after a
   * failure restarts the ranks for the next case. A failure while the sweep is stopping, or a
   * closed run, is rethrown: the case is not recorded.
   */
  async runOne(spec: CaseSpec, log: (line: string) => void, stopping: () => boolean): Promise<CaseOutcome> {
    const group = spec.group;
    const tc = performance.now();
    let result: CaseResult;
    let externalLost = false;
    try {
      if (!this.models.has(group.id)) {
        log(`calibrating ${group.id} ...`);
        await this.calibrateGroup(group);
        const st = this.manifest.groups[group.id];
        log(`  ${group.id}: ${st.compute_ms !== null ? `compute ${fmtMs(st.compute_ms)} ms, ` : ""}${st.emulated ? `${st.emulated} — EMULATED` : "real interconnect"}; ` +
          `cost model fitted to ${this.models.get(group.id)!.report.kinds.length} op kinds`);
      }
      result = await this.runCase(spec, this.manifest.groups[group.id], this.models.get(group.id)!.model);
    } catch (e) {
      if (stopping() || e instanceof RunClosedError) throw e; // stopped: the case is not recorded
      const st = this.manifest.groups[group.id];
      result = errorResult(spec, st, e, (performance.now() - tc) / 1000);
      if (!st) this.manifest.groups[group.id] = { model: group.model?.name ?? null, seq_length: group.seqLength, comm_compute_ratio: group.ratio, compute_ms: null, emulated_comm: null, emulated: null, calibration_runs: [], error: errorText(e) };
      // Ranks started by torchrun/Slurm cannot be restarted from here: keep the record, stop.
      if (this.o.external && e instanceof RankFailure) externalLost = true;
      else await this.dropRun();
    }
    appendResult(join(this.outDir, RESULTS_FILE), result);
    if (result.status === "ok") this.done.set(result.case, result);
    writeCsv(join(this.outDir, CSV_FILE), this.orderedResults());
    return { result, externalLost };
  }

  /** Stops the ranks at once (a signal): the case in flight fails with a closed run. */
  async abort(): Promise<void> {
    await this.run?.close();
  }

  /** Closes the ranks and saves the manifest. */
  async close(): Promise<void> {
    await this.run?.close();
    this.saveManifest();
  }

  /** The results in the grid's order, moe-overlap references recomputed over them all; results.csv rewritten. */
  finish(): CaseResult[] {
    const results = this.orderedResults();
    writeCsv(join(this.outDir, CSV_FILE), results);
    return results;
  }

  private orderedResults(): CaseResult[] {
    const all = readResults(join(this.outDir, RESULTS_FILE));
    const order = new Map(this.manifest.cases.map((id, i) => [id, i] as const));
    return referenceMoeOverlap(all.sort((a, b) => (order.get(a.case) ?? 1e9) - (order.get(b.case) ?? 1e9)));
  }

  private saveManifest(): void {
    writeFileAtomic(join(this.outDir, MANIFEST_FILE), JSON.stringify(this.manifest, null, 2) + "\n");
  }

  private saveCalibration(): void {
    writeFileAtomic(join(this.outDir, CALIBRATION_FILE), JSON.stringify({
      format: "ampipe.calibration", version: 1, device: this.manifest.device ?? this.cfg.parallelism.device, runs: this.calibrationRuns,
    }, null, 2) + "\n");
  }

  // ---- ranks, restarted after a failed case ----

  private async ensureRun(): Promise<RankRun> {
    if (this.run && !this.run.closing && !this.run.failure) return this.run;
    await this.run?.close();
    this.run = await startConfigRun(this.cfg.parallelism, this.o, { imports: [RANK_MODULE] });
    this.manifest.device = this.run.ranks[0].device;
    this.manifest.torch = this.run.ranks[0].torch;
    return this.run;
  }

  private async runBlock(c: ExperimentConfig, plan: Plan, steps: number, warmup: number): Promise<RankResult[]> {
    const r = await this.ensureRun();
    return r.broadcastAs("run_block", { config: c, plan, steps, warmup, seed: this.cfg.run.seed }, RankResultSchema);
  }

  /** After a failure: the ranks are restarted for the next case. */
  private async dropRun(): Promise<void> {
    const r = this.run;
    this.run = undefined;
    await r?.close();
  }

  // ---- calibration, per group ----

  private async calibrateGroup(group: Group): Promise<void> {
    const { cfg, settings, manifest, calibrationRuns } = this;
    let state = manifest.groups[group.id];
    if (!state || state.error !== null || state.calibration_runs.length === 0) {
      const S = group.seqLength;
      const runsBefore = calibrationRuns.length;
      const compute = async (): Promise<number> => {
        const known = this.computeMs.get(sequentialSource(group));
        if (known !== undefined) return known;
        // The sequential block without emulated delay: its time is the compute the ratio refers to,
        // its one-chunk op times (all but the all-to-alls) calibrate the whole-sequence ops.
        const c0 = groupConfig(cfg, group, null);
        const plan = makePlan("sequential", dimsFromConfig(c0), { chunkQkv: cfg.pipeline.chunk_qkv, capacityScope: cfg.pipeline.capacity_scope });
        // At least one warm-up step: a cold first step (lazy initialisation) would set the ratio.
        const res = await this.runBlock(c0, plan, settings.steps, Math.max(1, settings.warmup));
        const ms = summarizeRanks(res, c0.model.dtype).timing.baseline_ms;
        for (const r of res) calibrationRuns.push(calibrationRun(plan, r, `${sequentialSource(group)}, rank ${r.rank}`));
        this.computeMs.set(sequentialSource(group), ms);
        return ms;
      };
      const base = cfg.pipeline.emulated_comm;
      let emu: EmulatedCommConfig | null = base;
      const cms = await compute();
      if (group.ratio !== null) emu = { ...base!, bandwidth_gbps: bandwidthForRatio(groupConfig(cfg, group, null), S, group.ratio, cms, base!) };
      const gc = groupConfig(cfg, group, emu);
      const plan = makePlan("grouped", dimsFromConfig(gc), { degree: settings.calibration_degree, chunkQkv: cfg.pipeline.chunk_qkv, capacityScope: cfg.pipeline.capacity_scope });
      const res = await this.runBlock(gc, plan, settings.steps, settings.warmup);
      for (const r of res) calibrationRuns.push(calibrationRun(plan, r, `bench ${group.id}: grouped P=${settings.calibration_degree}${emu ? ` (${emulatedLabel(emu)})` : ""}, rank ${r.rank}`));
      const idx = calibrationRuns.map((_, i) => i).filter((i) => i >= runsBefore || calibrationRuns[i].source.startsWith(sequentialSource(group)));
      state = {
        model: group.model?.name ?? null, seq_length: S, comm_compute_ratio: group.ratio, compute_ms: cms,
        emulated_comm: emu, emulated: emu ? emulatedLabel(emu) : null, calibration_runs: idx, error: null,
      };
      manifest.groups[group.id] = state;
      this.saveCalibration();
      this.saveManifest();
    }
    const gc = groupConfig(cfg, group, state.emulated_comm);
    // The sequential run had no emulated delay: in an emulated group its all-to-alls and its
    // makespan say nothing about the group's interconnect, only its compute ops are used.
    const runs = state.calibration_runs.map((i) => calibrationRuns[i]).map((r) =>
      state!.emulated_comm !== null && r.source.startsWith(sequentialSource(group)) ? computeOnly(r) : r);
    const data = parseCalibration({ runs }, this.outDir, `${CALIBRATION_FILE} (${group.id})`);
    this.models.set(group.id, calibrate(costModelFor(gc).model, data, `${CALIBRATION_FILE} (${group.id})`));
  }

  // ---- one case ----

  private async runCase(spec: CaseSpec, state: GroupState, model: CostModel): Promise<CaseResult> {
    const { cfg, settings } = this;
    const tc = performance.now();
    const gc = groupConfig(cfg, spec.group, state.emulated_comm);
    const dims = dimsFromConfig(gc);
    const plan = spec.source === "planner"
      ? planBlock(dims, model, { chunkQkv: cfg.pipeline.chunk_qkv, capacityScope: cfg.pipeline.capacity_scope }).plan
      : makePlan(spec.variant!, dims, { degree: spec.degree!, chunkQkv: cfg.pipeline.chunk_qkv, capacityScope: cfg.pipeline.capacity_scope });
    const predicted = predict(model, plan).totalMs;
    const predictedBase = predict(model, makePlan("sequential", dims, { chunkQkv: cfg.pipeline.chunk_qkv, capacityScope: cfg.pipeline.capacity_scope })).totalMs;
    const res = await this.runBlock(gc, plan, settings.steps, settings.warmup);
    const s = summarizeRanks(res, gc.model.dtype);
    const t = s.timing;
    const sp = quartiles(t.steps.map((x) => x.baseline_ms / x.pipelined_ms));
    const pm = quartiles(t.steps.map((x) => x.pipelined_ms));
    const bm = quartiles(t.steps.map((x) => x.baseline_ms));
    const trace = `traces/${spec.id}.trace.json`;
    const r0 = res[0];
    // the schedule rank 0 replayed from its measured op times
    writeFileAtomic(join(this.outDir, trace), JSON.stringify(replayTrace(plan, r0, `${spec.id}: `)) + "\n");
    const ref = this.bestMoeOverlap(spec.group.id);
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

  private bestMoeOverlap(groupId: string): CaseResult | undefined {
    let best: CaseResult | undefined;
    for (const r of this.done.values())
      if (r.group === groupId && r.source === "moe-overlap" && r.speedup !== null && (!best || r.speedup > best.speedup!)) best = r;
    return best;
  }
}

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
