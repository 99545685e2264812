// What a bench sweep writes per case: one JSON line in results.jsonl as each case finishes
// (appended and fsynced, so an interrupted sweep keeps every finished case), and results.csv
// (rewritten whole). Reading tolerates a torn last line (a kill -9 mid-write): it is dropped.
import { closeSync, existsSync, fsyncSync, openSync, readFileSync, truncateSync, writeSync } from "node:fs";
import { quantile } from "simple-statistics";
import { median } from "../plan/calibration.ts";
import { writeFileAtomic } from "../plan/io.ts";
import type { CaseSource } from "./grid.ts";

export const RESULTS_FILE = "results.jsonl";
export const CSV_FILE = "results.csv";

export interface CaseResult {
  case: string;
  group: string;
  /** The bench.models name (null: the config's model). */
  model: string | null;
  seq_length: number;
  /** The emulated comm/compute ratio the group's bandwidth was set for; null when not set by ratio. */
  comm_compute_ratio: number | null;
  /**
   * The ratio that ran (emulated only): the sequential block's modelled all-to-all delay D over
   * the rest of its measured median step, D / (baseline_ms - D).
   */
  comm_compute_measured: number | null;
  source: CaseSource;
  variant: string | null;
  degree: number | null;
  boundaries: number[] | null;
  status: "ok" | "error";
  error: string | null;
  /** "emulated" or "real": how the all-to-alls ran. */
  interconnect: "emulated" | "real";
  /** The emulated interconnect's label (null for real comm). */
  emulated: string | null;
  bandwidth_gbps: number | null;
  /** Pipelined step (forward+backward), median over steps of the slowest rank; q1/q3 its quartiles. */
  measured_ms: number | null;
  measured_q1_ms: number | null;
  measured_q3_ms: number | null;
  /** The sequential block in the same repetitions (ABBA order). */
  baseline_ms: number | null;
  baseline_q1_ms: number | null;
  baseline_q3_ms: number | null;
  /** The calibrated cost model's prediction of the plan, and of the sequential plan. */
  predicted_ms: number | null;
  predicted_baseline_ms: number | null;
  /** predicted / measured - 1. */
  prediction_error: number | null;
  /** Paired: per repetition baseline / pipelined, then the median (q1/q3 the quartiles). */
  speedup: number | null;
  speedup_q1: number | null;
  speedup_q3: number | null;
  /** speedup / the best moe-overlap speedup of the same group (both paired against the same sequential block). */
  speedup_vs_moe_overlap: number | null;
  moe_overlap_reference: string | null;
  /** (T_baseline - T_pipelined) / (T_baseline - T_bound); null when the bound is not below the baseline. */
  overlap_efficiency: number | null;
  ideal_bound_ms: number | null;
  /** The plan replayed with its measured median op times (no executor overhead). */
  replayed_ms: number | null;
  equivalence_ok: boolean | null;
  largest_relative_difference: number | null;
  steps: number;
  /** Chrome trace of the case (measured op times replayed), relative to the run directory. */
  trace: string | null;
  /** The measured step pairs (slowest rank): what the paired figures come from. */
  samples: Array<{ baseline_ms: number; pipelined_ms: number }>;
  elapsed_s: number;
  finished: string;
}

/** Median and quartiles (linear interpolation between order statistics). */
export function quartiles(values: number[]): { median: number; q1: number; q3: number } {
  if (values.length === 0) throw new Error("quartiles: no values");
  return { median: median(values), q1: quantile(values, 0.25), q3: quantile(values, 0.75) };
}

/** Appends one result as a line and syncs it to disk before returning (any record keyed by `case`). */
export function appendResult<T extends { case: string } = CaseResult>(path: string, r: T): void {
  const fd = openSync(path, "a");
  try {
    writeSync(fd, JSON.stringify(r) + "\n");
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

/**
 * Reads results.jsonl: the last record of each case (a rerun of a failed case appends a newer
 * one). A torn last line is cut off the file, so the next append starts on a clean line.
 */
export function readResults<T extends { case: string } = CaseResult>(path: string): T[] {
  if (!existsSync(path)) return [];
  const text = readFileSync(path, "utf8");
  const byCase = new Map<string, T>();
  let good = 0;
  let offset = 0;
  for (const line of text.split("\n")) {
    const end = offset + Buffer.byteLength(line) + 1;
    if (line.trim() !== "") {
      let r: T;
      try {
        r = JSON.parse(line) as T;
      } catch {
        if (end >= Buffer.byteLength(text)) break; // the torn last line
        throw new Error(`${path}: line ${text.slice(0, offset).split("\n").length} is not JSON`);
      }
      byCase.delete(r.case);
      byCase.set(r.case, r);
    }
    if (end <= Buffer.byteLength(text)) good = end;
    offset = end;
  }
  if (good < Buffer.byteLength(text)) truncateSync(path, good);
  return [...byCase.values()];
}

/** Fills speedup_vs_moe_overlap from the best moe-overlap case of each group (in place; returns the list). */
export function referenceMoeOverlap(results: CaseResult[]): CaseResult[] {
  const best = new Map<string, CaseResult>();
  for (const r of results) {
    if (r.status !== "ok" || r.source !== "moe-overlap" || r.speedup === null) continue;
    const b = best.get(r.group);
    if (!b || r.speedup > b.speedup!) best.set(r.group, r);
  }
  for (const r of results) {
    const ref = best.get(r.group);
    r.speedup_vs_moe_overlap = ref && r.speedup !== null ? r.speedup / ref.speedup! : null;
    r.moe_overlap_reference = ref ? ref.case : null;
  }
  return results;
}

export const CSV_COLUMNS = [
  "case", "group", "model", "seq_length", "comm_compute_ratio", "comm_compute_measured", "source", "variant", "degree", "boundaries", "status",
  "interconnect", "emulated", "bandwidth_gbps", "measured_ms", "measured_q1_ms", "measured_q3_ms",
  "baseline_ms", "baseline_q1_ms", "baseline_q3_ms", "predicted_ms", "predicted_baseline_ms", "prediction_error",
  "speedup", "speedup_q1", "speedup_q3", "speedup_vs_moe_overlap", "moe_overlap_reference", "overlap_efficiency",
  "ideal_bound_ms", "replayed_ms", "equivalence_ok", "largest_relative_difference", "steps", "trace", "elapsed_s", "error",
] as const;

function csvCell(v: unknown): string {
  if (v === null || v === undefined) return "";
  const s = Array.isArray(v) ? v.join(" ") : String(v);
  return /[",\n]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
}

export function resultsCsv(results: CaseResult[]): string {
  const rows = results.map((r) => CSV_COLUMNS.map((c) => csvCell((r as unknown as Record<string, unknown>)[c])).join(","));
  return [CSV_COLUMNS.join(","), ...rows].join("\n") + "\n";
}

export function writeCsv(path: string, results: CaseResult[]): void {
  writeFileAtomic(path, resultsCsv(results));
}
