// The report of an `ampipe bench` run directory: report.html (charts through html.ts) and
// summary.md (the goals, judged with their numbers, and a table of every case).
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { median } from "../plan/calibration.ts";
import { CALIBRATION_FILE, MANIFEST_FILE } from "../sweep/sweep.ts";
import { RESULTS_FILE, readResults, referenceMoeOverlap, type CaseResult } from "../sweep/results.ts";
import type { ChartSpec, ReportDoc, TableColumn } from "./html.ts";
import { mdGoals, mdTable, pct, times, type Goal } from "./markdown.ts";

export class MissingRunError extends Error {}

export interface BenchReport {
  doc: ReportDoc;
  summary: string;
  /** Three lines of headline numbers. */
  headline: string[];
  /** What the directory lacks (cases not run, cases that failed, traces missing); empty when complete. */
  missing: string[];
}

/** What every sweep's manifest holds (bench.json, bench-train.json). */
export interface SweepManifest {
  config_path: string;
  cases: string[];
  created: string;
  device?: string;
  torch?: string;
}

interface Manifest extends SweepManifest {
  settings: { steps: number; seq_lengths: number[]; comm_compute_ratios: number[] | null };
  config: { model: Record<string, unknown>; parallelism: Record<string, unknown> };
}

/** How a case appears in legends: its variant and degree, or "planner". */
export function seriesOf(r: Pick<CaseResult, "source" | "variant" | "degree"> & { model?: string | null }): string {
  const s = r.source === "planner" ? "planner's choice" : `${r.variant} P=${r.degree}`;
  return r.model ? `${r.model}: ${s}` : s;
}

const ratioText = (r: number | null) => (r === null ? "as configured" : String(r));

/** Reads a run directory; throws MissingRunError naming what is missing when it is not a bench run. */
export function readBenchRun(dir: string): { manifest: Manifest; results: CaseResult[] } {
  if (!existsSync(dir)) throw new MissingRunError(`${dir}: no such directory`);
  const mPath = join(dir, MANIFEST_FILE);
  const rPath = join(dir, RESULTS_FILE);
  const lacks = [mPath, rPath].filter((p) => !existsSync(p));
  if (lacks.length === 2 && existsSync(join(dir, "compare.json")))
    throw new MissingRunError(`${dir}: an ampipe compare directory; ampipe compare writes its report.html and summary.md itself`);
  if (lacks.length === 2) throw new MissingRunError(`${dir}: not an ampipe bench directory: ${MANIFEST_FILE} and ${RESULTS_FILE} are missing (run ampipe bench <config> --out ${dir})`);
  if (!existsSync(mPath)) throw new MissingRunError(`${dir}: ${MANIFEST_FILE} is missing (the sweep's grid and config); ${RESULTS_FILE} alone cannot say which cases should be there`);
  const manifest = JSON.parse(readFileSync(mPath, "utf8")) as Manifest;
  const order = new Map(manifest.cases.map((id, i) => [id, i] as const));
  const results = referenceMoeOverlap(readResults(rPath).sort((a, b) => (order.get(a.case) ?? 1e9) - (order.get(b.case) ?? 1e9)));
  return { manifest, results };
}

interface GanttRow { stream: string; op: string; kind: string; pass: string; start_ms: number; end_ms: number }

/** One step of a case from its trace (measured op times replayed): one bar per op, per stream. */
export function ganttRows(tracePath: string): GanttRow[] {
  const trace = JSON.parse(readFileSync(tracePath, "utf8")) as { traceEvents: Array<Record<string, unknown>> };
  const names = new Map<number, string>();
  for (const e of trace.traceEvents) if (e.ph === "M" && e.name === "thread_name") names.set(e.tid as number, (e.args as { name: string }).name);
  return trace.traceEvents
    .filter((e) => e.ph === "X" && (e.cat === "forward" || e.cat === "backward" || e.cat === "pass"))
    .map((e) => ({
      stream: names.get(e.tid as number) ?? String(e.tid),
      op: e.cat === "pass" ? String(e.name) : String((e.args as { id: string }).id),
      kind: e.cat === "pass" ? `${String(e.name)} pass` : String((e.args as { kind: string }).kind),
      pass: e.cat === "pass" ? String(e.name) : String(e.cat),
      start_ms: (e.ts as number) / 1e3,
      end_ms: ((e.ts as number) + (e.dur as number)) / 1e3,
    }));
}

function goals(ok: CaseResult[], groups: string[]): Goal[] {
  const out: Goal[] = [];
  // 1. Prediction after calibration.
  const errs = ok.filter((r) => r.prediction_error !== null);
  if (errs.length === 0) out.push({ name: "predicted time within 10% of measured, every case", met: null, detail: "no finished case" });
  else {
    const worst = errs.reduce((a, r) => (Math.abs(r.prediction_error!) > Math.abs(a.prediction_error!) ? r : a));
    const within = errs.filter((r) => Math.abs(r.prediction_error!) <= 0.1).length;
    const outside = errs.filter((r) => Math.abs(r.prediction_error!) > 0.1).map((r) => `${r.case} ${pct(r.prediction_error!)}`);
    out.push({
      name: "predicted time within 10% of measured, every case (after calibration)",
      met: within === errs.length,
      detail: `${within} of ${errs.length} cases within 10%; median |error| ${pct(median(errs.map((r) => Math.abs(r.prediction_error!))))}, worst ${pct(worst.prediction_error!)} (${worst.case})` +
        (outside.length ? `; outside: ${outside.join(", ")}` : ""),
    });
  }
  // 2. The planner's choice against the best measured case of its group (via paired speed-ups: T_planner / T_best = speedup_best / speedup_planner).
  const per: string[] = [];
  let judged = 0;
  let within = 0;
  for (const g of groups) {
    const inG = ok.filter((r) => r.group === g);
    const planner = inG.find((r) => r.source === "planner");
    if (!planner || inG.length < 2) continue;
    const best = inG.reduce((a, r) => (r.speedup! > a.speedup! ? r : a));
    const gap = best.speedup! / planner.speedup! - 1;
    judged++;
    if (gap <= 0.03) within++;
    per.push(`${g}: ${gap <= 1e-12 ? "the planner's choice is the best" : `${pct(gap)} slower than ${best.case}`}`);
  }
  out.push(judged === 0
    ? { name: "planner's choice within 3% of the best measured case at each sequence length", met: null, detail: "no group has both the planner's choice and another finished case" }
    : { name: "planner's choice within 3% of the best measured case at each sequence length", met: within === judged, detail: `${within} of ${judged} groups; ${per.join("; ")}` });
  // 3. Average speed-up at comm/compute ratios 0.5-1.
  const inRange = ok.filter((r) => r.source === "planner" && r.comm_compute_ratio !== null && r.comm_compute_ratio >= 0.5 && r.comm_compute_ratio <= 1);
  if (inRange.length === 0) out.push({ name: "average speed-up >= 1.25x over sequential and >= 1.10x over moe-overlap at comm/compute 0.5-1", met: null, detail: "no planner case ran at a set comm/compute ratio in [0.5, 1] (bench.comm_compute_ratios)" });
  else {
    const seq = mean(inRange.map((r) => r.speedup!));
    const moeRows = inRange.filter((r) => r.speedup_vs_moe_overlap !== null);
    const moe = moeRows.length ? mean(moeRows.map((r) => r.speedup_vs_moe_overlap!)) : null;
    out.push({
      name: "average speed-up >= 1.25x over sequential and >= 1.10x over moe-overlap at comm/compute 0.5-1 (the planner's choice, mean over groups)",
      met: seq >= 1.25 && moe !== null && moe >= 1.1,
      detail: `${times(seq)} over sequential, ${moe === null ? "no moe-overlap case to compare with" : `${times(moe)} over the best moe-overlap`} (${inRange.length} groups: ${inRange.map((r) => `${r.group} ${times(r.speedup!)}/${r.speedup_vs_moe_overlap === null ? "–" : times(r.speedup_vs_moe_overlap)}`).join(", ")})`,
    });
  }
  return out;
}

const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;

/** A sweep's finished and failed cases, and what the report must say is missing (cases without a result, failures). */
export function sortCases<R extends { case: string; status: string; error?: string | null }>(cases: string[], results: R[], why: string): { ok: R[]; failed: R[]; missing: string[] } {
  const ok = results.filter((r) => r.status === "ok");
  const failed = results.filter((r) => r.status === "error");
  const have = new Set(results.map((r) => r.case));
  const notRun = cases.filter((id) => !have.has(id));
  const missing: string[] = [];
  if (notRun.length) missing.push(`${notRun.length} of ${cases.length} cases have no result (${why}): ${notRun.join(", ")}`);
  if (failed.length) missing.push(`${failed.length} case(s) failed: ${failed.map((r) => `${r.case} (${(r.error ?? "").split("\n")[0]})`).join("; ")}`);
  return { ok, failed, missing };
}

export function buildBenchReport(dir: string): BenchReport {
  const { manifest, results } = readBenchRun(dir);
  const { ok, failed, missing } = sortCases(manifest.cases, results, "the sweep was interrupted or limited by --cases; rerun ampipe bench to resume");
  for (const r of ok) if (r.trace && !existsSync(join(dir, r.trace))) missing.push(`trace of ${r.case} is missing: ${r.trace}`);
  if (!existsSync(join(dir, CALIBRATION_FILE))) missing.push(`${CALIBRATION_FILE} is missing`);

  const groups = [...new Set(manifest.cases.map((id) => results.find((r) => r.case === id)?.group).filter((g): g is string => !!g))];
  const interconnects = [...new Set(ok.map((r) => (r.emulated ? `EMULATED: ${r.emulated.replace(/ \(.*\)$/, "")}` : "real interconnect")))];
  const emulatedAny = ok.some((r) => r.emulated);
  const device = manifest.device ?? String(manifest.config.parallelism.device);
  const ratios = [...new Set(ok.map((r) => r.comm_compute_ratio))];
  const multiRatio = ratios.length > 1;

  // ---- charts ----
  // One colour per case series across every chart.
  const seriesDomain = [...new Set(ok.map((r) => seriesOf(r)))];
  const seriesColor = { field: "series", title: "case", scale: { domain: seriesDomain } };
  const speedChart = (against: "sequential" | "moe-overlap"): ChartSpec => {
    const rows = ok
      .filter((r) => (against === "sequential" ? r.speedup !== null : r.speedup_vs_moe_overlap !== null && r.source !== "moe-overlap"))
      .map((r) => ({
        seq_length: r.seq_length, series: seriesOf(r), ratio: ratioText(r.comm_compute_ratio), case: r.case,
        speedup: against === "sequential" ? r.speedup : r.speedup_vs_moe_overlap,
        ...(against === "sequential" ? { q1: r.speedup_q1, q3: r.speedup_q3 } : {}),
      }));
    const seqs = [...new Set(rows.map((r) => r.seq_length))].sort((a, b) => a - b);
    const x = { field: "seq_length", type: "quantitative", title: "sequence length", scale: { type: "log", base: 2 }, axis: { values: seqs, format: "d" } };
    const layer: Array<Record<string, unknown>> = [
      { mark: { type: "rule", strokeDash: [4, 4], color: "#888" }, encoding: { y: { datum: 1 } } },
      { mark: { type: "line", point: true }, encoding: { x, y: { field: "speedup", type: "quantitative", title: "speed-up (x)", scale: { zero: false } }, color: seriesColor, tooltip: [{ field: "case" }, { field: "speedup", format: ".3f" }] } },
    ];
    if (against === "sequential")
      layer.push({ mark: "rule", encoding: { x, y: { field: "q1", type: "quantitative" }, y2: { field: "q3" }, color: seriesColor } });
    return {
      title: against === "sequential" ? "Speed-up over the sequential block, against sequence length" : "Speed-up over moe-overlap (its best degree), against sequence length",
      caption: (against === "sequential"
        ? `Per case: paired per repetition (sequential / case), median over ${manifest.settings.steps} ABBA repetitions; bars: quartiles.`
        : "Per AMPipe case: its speed-up over the sequential block divided by the best moe-overlap speed-up of the same group (both paired against the same sequential block).") +
        `${multiRatio ? " One panel per comm/compute ratio." : ""}${emulatedAny ? " Communication EMULATED." : ""}`,
      spec: multiRatio
        ? { data: { values: rows }, facet: { column: { field: "ratio", title: "comm/compute" } }, spec: { width: 340, height: 240, layer } }
        : { data: { values: rows }, width: 520, height: 260, layer },
    };
  };
  const predRows = ok.filter((r) => r.predicted_ms !== null).map((r) => ({ case: r.case, series: seriesOf(r), measured_ms: r.measured_ms, predicted_ms: r.predicted_ms, error_pct: 100 * r.prediction_error! }));
  const lo = Math.min(...predRows.flatMap((r) => [r.measured_ms!, r.predicted_ms!]));
  const hi = Math.max(...predRows.flatMap((r) => [r.measured_ms!, r.predicted_ms!]));
  const worstErr = predRows.length ? Math.max(...predRows.map((r) => Math.abs(r.error_pct))) : NaN;
  const predChart: ChartSpec = {
    title: "Measured against predicted step time",
    caption: `The calibrated cost model's prediction of each case's forward+backward against its measured median; dashed: y = x. Worst error ${Number.isFinite(worstErr) ? `${worstErr.toFixed(1)}%` : "–"} (hover a point for its error).`,
    spec: {
      width: 420, height: 360,
      layer: [
        { data: { values: [{ v: lo }, { v: hi }] }, mark: { type: "line", strokeDash: [4, 4], color: "#888" }, encoding: { x: { field: "v", type: "quantitative" }, y: { field: "v", type: "quantitative" } } },
        { data: { values: predRows }, mark: { type: "point", filled: true, size: 60 }, encoding: {
          x: { field: "measured_ms", type: "quantitative", title: "measured (ms)", scale: { zero: false } },
          y: { field: "predicted_ms", type: "quantitative", title: "predicted (ms)", scale: { zero: false } },
          color: seriesColor,
          tooltip: [{ field: "case" }, { field: "measured_ms", format: ".2f" }, { field: "predicted_ms", format: ".2f" }, { field: "error_pct", title: "error %", format: "+.1f" }],
        } },
      ],
    },
  };
  const ampipeOk = ok.filter((r) => r.source !== "moe-overlap");
  const best = (ampipeOk.length ? ampipeOk : ok).reduce<CaseResult | null>((a, r) => (!a || r.speedup! > a.speedup! ? r : a), null);
  const charts: ChartSpec[] = [];
  let ganttNote: string | null = null;
  if (best?.trace && existsSync(join(dir, best.trace))) {
    charts.push({
      title: `One step of the best case: ${best.case} (${times(best.speedup!)} against sequential)`,
      caption: `Per stream, forward then backward: the plan replayed with the op times measured on rank 0 (median per op over the repetitions), boundaries [${best.boundaries?.join(", ")}]. The measured step took ${best.measured_ms!.toFixed(2)} ms (median); the replay shows where the time went.`,
      spec: {
        width: 1000, height: 140,
        data: { values: ganttRows(join(dir, best.trace)) },
        mark: { type: "bar", stroke: "white", strokeWidth: 0.5 },
        encoding: {
          x: { field: "start_ms", type: "quantitative", title: "time (ms)" }, x2: { field: "end_ms" },
          y: { field: "stream", type: "nominal", title: null }, color: { field: "kind", title: "op", scale: { scheme: "tableau20" } },
          tooltip: [{ field: "op" }, { field: "pass" }, { field: "start_ms", format: ".3f" }, { field: "end_ms", format: ".3f" }],
        },
      },
    });
  } else ganttNote = best ? `No timeline: the trace of ${best.case} is missing.` : "No timeline: no case finished.";
  const effRows = ok.map((r) => ({ case: r.case, series: seriesOf(r), overlap_efficiency: r.overlap_efficiency })).filter((r) => r.overlap_efficiency !== null);
  const effChart: ChartSpec = {
    title: "Overlap efficiency per case",
    caption: "(T_sequential − T_case) / (T_sequential − T_bound), T_bound the ideal bound from the case's measured op times: 1 = every gain the bound allows; missing where the bound is not below the sequential time.",
    spec: {
      width: Math.max(300, 22 * effRows.length), height: 220,
      data: { values: effRows },
      mark: "bar",
      encoding: { x: { field: "case", type: "nominal", sort: null, title: null, axis: { labelAngle: -50 } }, y: { field: "overlap_efficiency", type: "quantitative", title: "overlap efficiency" }, color: seriesColor, tooltip: [{ field: "case" }, { field: "overlap_efficiency", format: ".2f" }] },
    },
  };

  // ---- tables and goals ----
  const fmtMs = (v: unknown) => (typeof v === "number" ? v.toFixed(2) : "–");
  const fmtX = (v: unknown) => (typeof v === "number" ? v.toFixed(3) : "–");
  const columns: TableColumn[] = [
    { key: "case", label: "case", align: "left" },
    { key: "status", label: "status", align: "left" },
    { key: "seq_length", label: "seq" },
    { key: "comm_compute_ratio", label: "comm/compute set", format: (v) => ratioText(v as number | null) },
    { key: "comm_compute_measured", label: "measured", format: (v) => (typeof v === "number" ? v.toFixed(2) : "–") },
    { key: "variant", label: "variant", align: "left" },
    { key: "degree", label: "P" },
    { key: "boundaries", label: "boundaries", align: "left", format: (v) => (Array.isArray(v) ? v.join(" ") : "–") },
    { key: "measured_ms", label: "measured ms", format: fmtMs },
    { key: "baseline_ms", label: "sequential ms", format: fmtMs },
    { key: "predicted_ms", label: "predicted ms", format: fmtMs },
    { key: "prediction_error", label: "pred. error", format: (v) => (typeof v === "number" ? pct(v) : "–") },
    { key: "speedup", label: "speed-up [q1, q3]", format: (v, r) => (typeof v === "number" ? `${v.toFixed(3)} [${fmtX(r.speedup_q1)}, ${fmtX(r.speedup_q3)}]` : "–") },
    { key: "speedup_vs_moe_overlap", label: "vs moe-overlap", format: fmtX },
    { key: "overlap_efficiency", label: "overlap eff.", format: (v) => (typeof v === "number" ? v.toFixed(2) : "–") },
    { key: "equivalence_ok", label: "equivalence", format: (v, r) => (v === null ? "–" : `${v ? "PASS" : "FAIL"} (${typeof r.largest_relative_difference === "number" ? r.largest_relative_difference.toExponential(1) : "–"})`) },
    { key: "interconnect", label: "comm", align: "left" },
    { key: "error", label: "error", align: "left", format: (v) => (typeof v === "string" ? v.split("\n")[0] : "") },
  ];
  const gs = goals(ok, groups);
  const moeBestAvg = ok.filter((r) => r.source === "planner" && r.speedup_vs_moe_overlap !== null);
  const planners = ok.filter((r) => r.source === "planner");
  const eqFail = ok.filter((r) => r.equivalence_ok === false);
  const errsAbs = ok.filter((r) => r.prediction_error !== null).map((r) => Math.abs(r.prediction_error!));
  const headline = [
    planners.length
      ? `speed-up of the planner's choice: mean ${times(mean(planners.map((r) => r.speedup!)))} over the sequential block` +
        `${moeBestAvg.length ? `, ${times(mean(moeBestAvg.map((r) => r.speedup_vs_moe_overlap!)))} over the best moe-overlap` : ""} (${planners.length} group${planners.length === 1 ? "" : "s"}); ` +
        `best case ${best ? `${best.case} ${times(best.speedup!)}` : "–"}`
      : `best case: ${best ? `${best.case} ${times(best.speedup!)} over the sequential block` : "none finished"}`,
    errsAbs.length
      ? `prediction after calibration: median |error| ${pct(median(errsAbs))}, worst ${pct(Math.max(...errsAbs))}; ${errsAbs.filter((e) => e <= 0.1).length} of ${errsAbs.length} cases within 10%`
      : "prediction after calibration: no finished case",
    `${ok.length} of ${manifest.cases.length} cases finished (${failed.length} failed); equivalence ${eqFail.length ? `FAILED in ${eqFail.map((r) => r.case).join(", ")}` : "PASS in every finished case"}; ${interconnects.join(", ") || "no interconnect measured"} on ${device}`,
  ];
  const subtitle = [
    `${dir} — config ${manifest.config_path}; sweep started ${manifest.created}; device ${device}${manifest.torch ? `, torch ${manifest.torch}` : ""}`,
    `interconnect: ${interconnects.join("; ") || "–"}${emulatedAny ? " (every timing here is EMULATED: a modelled delay on the comm stream, not a real network)" : ""}`,
  ];
  const doc: ReportDoc = {
    title: "ampipe bench report",
    subtitle,
    sections: [
      { title: "Headline", text: headline, notice: missing.length ? ["This run is incomplete:", ...missing] : undefined },
      { title: "Goals", text: gs.map((g) => `${g.met === null ? "NOT JUDGED" : g.met ? "MET" : "MISSED"} — ${g.name}: ${g.detail}`) },
      { title: "Speed-up", charts: [speedChart("sequential"), speedChart("moe-overlap")] },
      { title: "Cost model", charts: [predChart] },
      { title: "Timeline", charts, text: ganttNote ? [ganttNote] : undefined },
      effRows.length
        ? { title: "Overlap efficiency", charts: [effChart] }
        : { title: "Overlap efficiency", text: ["No case has an ideal bound below its sequential time, so no overlap efficiency is defined."] },
      { title: "Every case", tables: [{ columns, rows: results as unknown as Array<Record<string, unknown>> }] },
    ],
  };

  const md: string[] = [];
  md.push(`# ampipe bench summary`, "");
  for (const l of subtitle) md.push(`${l}  `);
  md.push("", "## Headline", "", ...headline.map((l) => `- ${l}`), "");
  if (missing.length) md.push("## Missing", "", ...missing.map((l) => `- ${l}`), "");
  md.push("## Goals", "", "Printed by the suite itself; no goal is a pass/fail test.", "", mdGoals(gs));
  md.push("## Every case", "", mdTable(
    ["case", "status", "P", "boundaries", "measured ms", "sequential ms", "predicted ms", "pred. error", "speed-up [q1, q3]", "vs moe-overlap", "overlap eff.", "equivalence"],
    results.map((r) => [r.case, r.status === "ok" ? "ok" : `error: ${(r.error ?? "").split("\n")[0]}`, r.degree, r.boundaries ? r.boundaries.join(" ") : "–", fmtMs(r.measured_ms), fmtMs(r.baseline_ms), fmtMs(r.predicted_ms),
      r.prediction_error === null ? "–" : pct(r.prediction_error), r.speedup === null ? "–" : `${r.speedup.toFixed(3)} [${fmtX(r.speedup_q1)}, ${fmtX(r.speedup_q3)}]`,
      fmtX(r.speedup_vs_moe_overlap), r.overlap_efficiency === null ? "–" : r.overlap_efficiency.toFixed(2), r.equivalence_ok === null ? "–" : r.equivalence_ok ? "PASS" : "FAIL"]),
  ));
  return { doc, summary: md.join("\n") + "\n", headline, missing };
}
