// The report of an `ampipe bench train` run directory (bench-train.json + results.jsonl):
// report.html through html.ts (speed-up over the baseline against sequence length, one line per
// schedule per ratio; tokens/s; the break-even; every case) and summary.md.
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { RESULTS_FILE, readResults } from "../sweep/results.ts";
import { TRAIN_MANIFEST_FILE, breakEven, type ArmResult, type BreakEven, type Spread, type TrainBenchCase } from "../sweep/train.ts";
import type { ChartSpec, ReportDoc, TableColumn } from "./html.ts";
import { mdGoals, mdTable, type Goal } from "./markdown.ts";
import { MissingRunError, sortCases, type BenchReport, type SweepManifest } from "./bench.ts";

interface Manifest extends SweepManifest {
  settings: { steps: number; warmup: number; tune_steps: number; tune_candidates: number; seq_lengths: number[]; ratios: Array<number | null> };
  config: { parallelism: { device: string; world_size: number; expert_model_parallel_size: number }; pipeline: { emulated_comm: { latency_us: number; world_size: number } | null } };
}

export const isTrainBenchRun = (dir: string): boolean => existsSync(join(dir, TRAIN_MANIFEST_FILE));

/** The manifest and each case's latest record, in the manifest's order. */
export function readTrainBenchRun(dir: string): { manifest: Manifest; results: TrainBenchCase[] } {
  const mPath = join(dir, TRAIN_MANIFEST_FILE);
  if (!existsSync(mPath)) throw new MissingRunError(`${dir}: ${TRAIN_MANIFEST_FILE} is missing: not an ampipe bench train directory`);
  const manifest = JSON.parse(readFileSync(mPath, "utf8")) as Manifest;
  const order = new Map(manifest.cases.map((id, i) => [id, i] as const));
  const results = readResults<TrainBenchCase>(join(dir, RESULTS_FILE)).sort((a, b) => (order.get(a.case) ?? 1e9) - (order.get(b.case) ?? 1e9));
  return { manifest, results };
}

const ratioText = (r: number | null) => (r === null ? "as configured" : String(r));
const x3 = (v: number) => `${v.toFixed(3)}x`;
const withQ = (s: Spread | null | undefined) => (s ? `${s.median.toFixed(3)} [${s.q1.toFixed(3)}, ${s.q3.toFixed(3)}]` : "–");
const ms = (v: number | null | undefined) => (typeof v === "number" ? v.toFixed(1) : "–");
const pctText = (v: number | null | undefined) => (typeof v === "number" ? `${v >= 0 ? "+" : ""}${(100 * v).toFixed(1)}%` : "–");

/** The schedules drawn, one line each per ratio. */
const SCHEDULES = ["planner's choice", "planner's best timed plan", "moe-overlap"] as const;

export interface SpeedupRow { seq_length: number; ratio: string; schedule: string; arm: string; speedup: number; q1: number; q3: number; case: string; interconnect: string }

/** The chart's rows: per finished case, the choice (1 where it is the baseline), the planner's best timed plan and moe-overlap. */
export function speedupRows(ok: TrainBenchCase[]): SpeedupRow[] {
  return ok.flatMap((r) => {
    const planned = r.arms.find((a) => a.role === "planned");
    const moe = r.arms.find((a) => a.role === "moe-overlap");
    const row = (schedule: string, arm: string, s: Spread) => ({
      seq_length: r.seq_length, ratio: ratioText(r.comm_compute_ratio), schedule, arm, speedup: s.median, q1: s.q1, q3: s.q3, case: r.case, interconnect: r.emulated ?? "real",
    });
    return [
      ...(r.speedup ? [row(SCHEDULES[0], r.chosen, r.speedup)] : []),
      ...(planned ? [row(SCHEDULES[1], planned.name, planned.speedup)] : []),
      ...(moe ? [row(SCHEDULES[2], moe.name, moe.speedup)] : []),
    ];
  });
}

function breakEvenText(b: BreakEven): string {
  return `comm/compute ${ratioText(b.ratio)}: ${b.seq_length === null ? "the planner's choice does not beat the baseline by more than the noise from any sequence length of the sweep" : `the planner's choice beats the baseline by more than the noise from seq_length ${b.seq_length} on`}` +
    `; speed-up crosses 1x ${b.interpolated === null ? "nowhere inside the sweep" : `at about ${Math.round(b.interpolated)} (interpolated in log2 sequence length)`}: ${b.note}`;
}

/** The training goals of issue 18 (docs/bench.md), judged on the finished cases with their numbers; never pass/fail tests. */
export function trainGoals(ok: TrainBenchCase[]): Goal[] {
  const at = (r: TrainBenchCase) => `${r.case} ${x3(r.speedup!.median)}`;
  const out: Goal[] = [];
  if (ok.length === 0) out.push({ name: "the planner's choice never below 0.98x of the baseline", met: null, detail: "no finished case" });
  else {
    const worst = ok.reduce((a, r) => (r.speedup!.median < a.speedup!.median ? r : a));
    out.push({ name: "the planner's choice never below 0.98x of the baseline, at any sequence length", met: worst.speedup!.median >= 0.98, detail: `lowest ${at(worst)}` });
  }
  for (const [S, want] of [[1024, 1.15], [2048, 1.25]] as const) {
    const rs = ok.filter((r) => r.seq_length === S);
    out.push(rs.length === 0
      ? { name: `the planner's choice >= ${want}x the baseline at seq_length ${S}`, met: null, detail: `no finished case at ${S}` }
      : { name: `the planner's choice >= ${want}x the baseline at seq_length ${S}`, met: rs.every((r) => r.speedup!.median >= want), detail: rs.map(at).join(", ") });
  }
  const long = ok.filter((r) => r.seq_length >= 1024 && r.chosen_vs_moe_overlap);
  out.push(long.length === 0
    ? { name: "the planner's choice >= 1.10x moe-overlap at seq_length >= 1024", met: null, detail: "no finished case at 1024 or longer with moe-overlap" }
    : { name: "the planner's choice >= 1.10x moe-overlap at seq_length >= 1024", met: long.every((r) => r.chosen_vs_moe_overlap!.median >= 1.1), detail: long.map((r) => `${r.case} ${x3(r.chosen_vs_moe_overlap!.median)}`).join(", ") });
  const pred = ok.filter((r) => r.prediction_error !== null);
  out.push(pred.length === 0
    ? { name: "predicted vs measured step time within 10% for the chosen plan", met: null, detail: "no case chose a plan" }
    : { name: "predicted vs measured step time within 10% for the chosen plan", met: pred.every((r) => Math.abs(r.prediction_error!) <= 0.1), detail: pred.map((r) => `${r.case} ${pctText(r.prediction_error)}`).join(", ") });
  return out;
}

export function buildTrainBenchReport(dir: string): BenchReport {
  const { manifest, results } = readTrainBenchRun(dir);
  const { ok, failed, missing } = sortCases(manifest.cases, results, "the sweep was interrupted; rerun ampipe bench train to resume");

  const emu = manifest.config.pipeline.emulated_comm;
  const emulatedAny = ok.some((r) => r.interconnect === "emulated");
  const par = manifest.config.parallelism;
  const device = manifest.device ?? par.device;
  const ratios = [...new Set(ok.map((r) => r.comm_compute_ratio))];
  const multiRatio = ratios.length > 1;
  const breaks = breakEven(results);
  const s = manifest.settings;
  const interconnect = emulatedAny && emu
    ? `EMULATED ${emu.world_size}-way all-to-all, latency ${emu.latency_us} us, bandwidth set per case for the stated comm/compute ratio (per case below): a modelled delay, not a real network`
    : "real interconnect";
  const subtitle = [
    `${dir} — config ${manifest.config_path}; sweep started ${manifest.created}; ${par.world_size} ranks (expert-parallel ${par.expert_model_parallel_size}) on ${device}${manifest.torch ? `, torch ${manifest.torch}` : ""}`,
    `interconnect: ${interconnect}`,
    `per case: the planner's ${s.tune_candidates} best candidate(s) timed ${s.tune_steps} training step(s) each against the baseline (as ampipe train with pipeline.degree auto), then ${s.steps} fresh ABBA rounds of the baseline, the planner's choice and moe-overlap after ${s.warmup} warm-up; per round the slowest rank's step`,
  ];

  // ---- charts ----
  const rows = speedupRows(ok);
  // Every figure of an emulated case carries its interconnect: latency, bandwidth and the ratio it was set for.
  const emulatedNote = emulatedAny
    ? ` Communication EMULATED (${ok.filter((r) => r.emulated).map((r) => `${r.case}: ${r.emulated}`).join("; ")}).`
    : "";
  const seqs = [...new Set(ok.map((r) => r.seq_length))].sort((a, b) => a - b);
  const x = { field: "seq_length", type: "quantitative", title: "sequence length", scale: { type: "log", base: 2 }, axis: { values: seqs, format: "d" } };
  const color = { field: "schedule", type: "nominal", title: "schedule", scale: { domain: [...SCHEDULES] }, legend: { labelLimit: 260 } };
  const dash = multiRatio ? { strokeDash: { field: "ratio", type: "nominal", title: "comm/compute" } } : {};
  const speedChart: ChartSpec = {
    title: "Training speed-up over the baseline block, against sequence length",
    caption: `Per case and schedule: paired per round (baseline / schedule), median over ${s.steps} ABBA rounds of whole training steps; bars: quartiles; dashed: 1x. ` +
      "The planner's choice is the baseline (1x) where its timing kept the baseline; its best timed plan is drawn beside it." +
      `${multiRatio ? " One line per schedule per comm/compute ratio (dash pattern)." : ""}${emulatedNote}`,
    spec: {
      data: { values: rows }, width: 560, height: 300,
      layer: [
        { mark: { type: "rule", strokeDash: [4, 4], color: "#888" }, encoding: { y: { datum: 1 } } },
        { mark: { type: "line", point: true }, encoding: { x, y: { field: "speedup", type: "quantitative", title: "speed-up over the baseline (x)", scale: { zero: false } }, color, detail: { field: "ratio" }, ...dash,
          tooltip: [{ field: "case" }, { field: "schedule" }, { field: "arm" }, { field: "speedup", format: ".3f" }, { field: "q1", format: ".3f" }, { field: "q3", format: ".3f" }, { field: "interconnect" }] } },
        { mark: "rule", encoding: { x, y: { field: "q1", type: "quantitative" }, y2: { field: "q3" }, color } },
      ],
    },
  };
  const tokRows = ok.flatMap((r) => r.arms.map((a: ArmResult) => ({
    seq_length: r.seq_length, ratio: ratioText(r.comm_compute_ratio), case: r.case, arm: a.name,
    schedule: a.role === "baseline" ? "baseline" : a.role === "planned" ? "planner's best timed plan" : "moe-overlap",
    tokens_per_s: a.tokens_per_s.median, q1: a.tokens_per_s.q1, q3: a.tokens_per_s.q3,
  })));
  const tokChart: ChartSpec = {
    title: "Training tokens/s, against sequence length",
    caption: `Tokens of the global batch per second of training step, median over the rounds; bars: quartiles.${emulatedNote}`,
    spec: {
      data: { values: tokRows }, width: 560, height: 300,
      layer: [
        { mark: { type: "line", point: true }, encoding: { x, y: { field: "tokens_per_s", type: "quantitative", title: "tokens/s", scale: { type: "log" } }, color: { field: "schedule", type: "nominal", title: "schedule" }, detail: { field: "ratio" }, ...dash,
          tooltip: [{ field: "case" }, { field: "arm" }, { field: "tokens_per_s", format: ".0f" }] } },
        { mark: "rule", encoding: { x, y: { field: "q1", type: "quantitative" }, y2: { field: "q3" }, color: { field: "schedule", type: "nominal" } } },
      ],
    },
  };

  // ---- tables ----
  const arm = (r: Record<string, unknown>, role: string) => (r.arms as ArmResult[]).find((a) => a.role === role);
  const columns: TableColumn[] = [
    { key: "case", label: "case", align: "left" },
    { key: "status", label: "status", align: "left" },
    { key: "seq_length", label: "seq" },
    { key: "comm_compute_ratio", label: "comm/compute set", format: (v) => ratioText(v as number | null) },
    { key: "comm_compute_measured", label: "measured", format: (v) => (typeof v === "number" ? v.toFixed(2) : "–") },
    { key: "bandwidth_gbps", label: "GB/s (emulated)", format: (v) => (typeof v === "number" ? Number(v.toPrecision(4)).toString() : "–") },
    { key: "arms", label: "baseline ms", format: (_v, r) => ms(arm(r, "baseline")?.step_ms.median) },
    { key: "arms", label: "baseline tokens/s", format: (_v, r) => { const a = arm(r, "baseline"); return a ? Math.round(a.tokens_per_s.median).toString() : "–"; } },
    { key: "chosen", label: "planner's choice", align: "left" },
    { key: "speedup", label: "choice x [q1, q3]", format: (v) => withQ(v as Spread | null) },
    { key: "beats_baseline", label: "beats (noise)", format: (v, r) => (v === null ? "–" : `${v ? "yes" : "no"} (±${(100 * (r.noise as number)).toFixed(1)}%)`) },
    { key: "arms", label: "best timed plan x", format: (_v, r) => { const a = arm(r, "planned"); return a ? `${a.name}: ${withQ(a.speedup)}` : "–"; }, align: "left" },
    { key: "arms", label: "moe-overlap x", format: (_v, r) => { const a = arm(r, "moe-overlap"); return a ? `${a.name}: ${withQ(a.speedup)}` : "–"; }, align: "left" },
    { key: "chosen_vs_moe_overlap", label: "choice vs moe-overlap", format: (v) => withQ(v as Spread | null) },
    { key: "predicted_step_ms", label: "predicted ms", format: (v) => ms(v as number | null) },
    { key: "measured_step_ms", label: "measured ms", format: (v) => ms(v as number | null) },
    { key: "prediction_error", label: "pred. error", format: (v) => pctText(v as number | null) },
    { key: "error", label: "error", align: "left", format: (v) => (typeof v === "string" ? v.split("\n")[0] : "") },
  ];
  const byRatio = ratios.map((ratio) => {
    const rs = ok.filter((r) => r.comm_compute_ratio === ratio);
    const choice = rs.map((r) => `${x3(r.speedup!.median)} at ${r.seq_length}${r.chosen === "baseline" ? " (baseline)" : ""}`).join(", ");
    const moe = rs.filter((r) => r.moe_overlap_speedup).map((r) => `${x3(r.moe_overlap_speedup!.median)} at ${r.seq_length}`).join(", ");
    return `comm/compute ${ratioText(ratio)}: the planner's choice ${choice}${moe ? `; moe-overlap ${moe}` : ""} (over the baseline)`;
  });
  const headline = [
    ...byRatio,
    ...breaks.map(breakEvenText),
    `${ok.length} of ${manifest.cases.length} cases finished (${failed.length} failed); ${emulatedAny ? "every figure EMULATED" : "real interconnect"}; ${par.world_size} ranks on ${device}`,
  ];
  const goals = trainGoals(ok);
  const doc: ReportDoc = {
    title: "ampipe bench train: where does pipelining pay in training?",
    subtitle,
    sections: [
      { title: "Headline", text: headline, notice: missing.length ? ["This run is incomplete:", ...missing] : undefined },
      { title: "Goals", text: goals.map((g) => `${g.met === null ? "NOT JUDGED" : g.met ? "MET" : "MISSED"} — ${g.name}: ${g.detail}`) },
      { title: "Speed-up", charts: [speedChart, tokChart] },
      {
        title: "Break-even sequence length",
        text: ["From the smallest sequence length of the sweep at which the planner's choice beats the baseline by more than the noise of the measured rounds (half the baseline's interquartile range over its median, at least 1%), and at every longer one; interpolated: where the paired speed-up of the planner's best timed plan last crosses 1x, linear in log2 of the sequence length between the two neighbouring lengths.", ...breaks.map(breakEvenText)],
      },
      { title: "Every case", tables: [{ columns, rows: results as unknown as Array<Record<string, unknown>> }] },
    ],
  };

  const md: string[] = ["# ampipe bench train summary", ""];
  for (const l of subtitle) md.push(`${l}  `);
  md.push("", "## Headline", "", ...headline.map((l) => `- ${l}`), "");
  if (missing.length) md.push("## Missing", "", ...missing.map((l) => `- ${l}`), "");
  md.push("## Goals", "", `Printed by the benchmark itself; no goal is a pass/fail test.${emulatedAny ? " Communication EMULATED." : ""}`, "", mdGoals(goals));
  md.push("## Break-even", "", mdTable(["comm/compute", "break-even seq_length", "crossing (interpolated)", "how"],
    breaks.map((b) => [ratioText(b.ratio), b.seq_length ?? "none in the sweep", b.interpolated === null ? "–" : Math.round(b.interpolated), b.note]), ["left", "right", "right", "left"]));
  md.push("## Every case", "", mdTable(
    ["case", "status", "GB/s (emulated)", "baseline ms", "baseline tokens/s", "choice", "choice x [q1, q3]", "beats (noise)", "moe-overlap x [q1, q3]", "choice vs moe-overlap", "predicted ms", "measured ms", "pred. error"],
    results.map((r) => {
      const b = r.arms.find((a) => a.role === "baseline");
      const m = r.arms.find((a) => a.role === "moe-overlap");
      return [r.case, r.status === "ok" ? "ok" : `error: ${(r.error ?? "").split("\n")[0]}`, r.bandwidth_gbps === null ? "–" : Number(r.bandwidth_gbps.toPrecision(4)),
        ms(b?.step_ms.median), b ? Math.round(b.tokens_per_s.median) : "–", r.chosen, withQ(r.speedup),
        r.beats_baseline === null ? "–" : `${r.beats_baseline ? "yes" : "no"} (±${(100 * r.noise!).toFixed(1)}%)`,
        m ? `${m.name}: ${withQ(m.speedup)}` : "–", withQ(r.chosen_vs_moe_overlap), ms(r.predicted_step_ms), ms(r.measured_step_ms), pctText(r.prediction_error)];
    }),
    ["left", "left", "right", "right", "right", "left", "right", "left", "left", "right", "right", "right", "right"],
  ));
  return { doc, summary: md.join("\n") + "\n", headline, missing };
}
