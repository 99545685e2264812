// The report of `ampipe compare`: report.html (the shared page writer, Vega-Lite inlined) and
// summary.md with the same numbers as tables.
import { join } from "node:path";
import { type ExperimentConfig } from "../config/index.ts";
import { writeFileAtomic } from "../plan/io.ts";
import { writeReport, type ChartSpec, type ReportDoc, type TableSpec } from "../report/html.ts";
import { mdGoals, mdTable } from "../report/markdown.ts";
import { DIVERGENCES, type Divergence } from "./envelope.ts";
import { ENDPOINTS, type Endpoint } from "./endpoints.ts";
import { fmtP } from "./stats.ts";
import { ENVELOPE_RULE, marginPct, seedsNeededSentence, tostSentence, type CompareSummary, type SeedRuns } from "./summary.ts";

const f4 = (v: number | null | undefined) => (typeof v === "number" ? v.toFixed(4) : "–");
const ci = (c: [number, number] | null) => (c ? `${c[0].toFixed(4)} .. ${c[1].toFixed(4)}` : "– (one seed)");
const sci = (v: number) => v.toExponential(2);
const sciCi = (c: [number, number] | null) => (c ? `${sci(c[0])} .. ${sci(c[1])}` : "–");
const p3 = fmtP;
/** Log-scale charts draw an exact 0 here. */
const LOG_FLOOR = 1e-12;

const DIV_TITLE: Record<Divergence, string> = {
  loss: "|Δloss| per step", grad_norm: "|Δgrad norm| per step", param_distance: "‖θ − θ_baseline‖ / ‖θ_baseline‖ per evaluation",
};

function decision(e: Endpoint): string {
  if (e.decided === "equivalent") return "equivalent";
  if (e.decided === "different") return "different (outside the margin)";
  if (e.tost.p_value === null) return "not testable (one seed)";
  const s = e.seeds_needed;
  return `undecided${s?.seeds ? `; ~${s.seeds} seeds would decide it` : s?.test ? `; > ${s.max_seeds} seeds` : ""}`;
}

/** Writes summary.md and report.html into `root`; returns their paths. */
export function writeCompareReport(root: string, doc: Record<string, unknown>, s: CompareSummary, cfg: ExperimentConfig,
  runs: SeedRuns[]): string[] {
  const emulated = doc.emulated as string | null;
  const commLabel = emulated ? `EMULATED interconnect (${emulated})` : "real communication";
  const planLabel = `${(doc.plan as { variant: string }).variant}, boundaries [${(doc.plan as { boundaries: number[] }).boundaries.join(", ")}]`;
  const capacity = cfg.model.moe_expert_capacity_factor === null ? "dropless routing" : `capacity factor ${cfg.model.moe_expert_capacity_factor} (per-chunk capacity in the pipelined arm)`;
  const control = s.arms_trained.includes("control");
  const fault = doc.fault as string[] | null;
  const env = s.envelope;

  const endpointRows = ENDPOINTS.map((n) => s.endpoints[n]).map((e) => ({
    endpoint: e.label,
    baseline: Object.values(e.baseline).reduce((a, x) => a + x, 0) / s.seeds.length,
    pipelined: Object.values(e.pipelined).reduce((a, x) => a + x, 0) / s.seeds.length,
    diff: sci(e.difference.mean), ci90: sciCi(e.tost.ci90), margin: `±${sci(e.tost.margin)}`,
    tost: p3(e.tost.p_value), outside: p3(e.outside.p_value), decision: decision(e),
  }));
  const divRows = s.seeds.map((x) => {
    const d = s.divergence[x];
    const max = (xs: number[] | null) => (xs && xs.length ? sci(Math.max(...xs)) : "–");
    const e = env?.per_seed[x];
    return {
      seed: x,
      ...(Object.fromEntries(DIVERGENCES.flatMap((k) => [[`${k}_p`, max(d[k].pipelined)], [`${k}_c`, max(d[k].control)]])) as Record<`${Divergence}_${"p" | "c"}`, string>),
      envelope: e ? (e.met ? "MET" : "MISSED") : "–",
      worst: e ? DIVERGENCES.map((k) => `${k} ${e.checks[k].worst_ratio.toPrecision(2)}x`).join(", ") : "–",
    };
  });

  // ---- summary.md ----
  const md: string[] = [];
  md.push(`# ampipe compare: baseline vs pipelined (${planLabel})`, "");
  md.push(`${s.seeds.length} seed(s) (${s.seeds.join(", ")}) x ${s.steps} steps per arm; arms ${s.arms_trained.join(", ")}; ${capacity}; ${cfg.model.dtype}; ${cfg.parallelism.world_size} ${cfg.parallelism.device} ranks, EP ${cfg.parallelism.expert_model_parallel_size}; ${commLabel}.`, "");
  if (fault) md.push(`**TEST HOOK: the pipelined arm was made wrong on purpose: ${fault.join("; ")}.**`, "");
  md.push("## Goals", "", mdGoals(s.goals.map((g) => ({ name: g.goal, met: g.met, detail: g.detail }))));
  md.push("## Divergence from the baseline", "");
  if (control) md.push(`Control arm: the baseline with every initial weight moved by one ulp. Envelope rule (K = ${env!.factor}): ${ENVELOPE_RULE}.`, "");
  md.push(mdTable(["seed", "max abs(Δloss) pipelined", "control", "max abs(Δgrad norm) pipelined", "control", "max param distance pipelined", "control", "envelope", "largest ratio to the control's running max"],
    divRows.map((r) => [r.seed, r.loss_p, r.loss_c, r.grad_norm_p, r.grad_norm_c, r.param_distance_p, r.param_distance_c, r.envelope, r.worst])));
  md.push("## Equivalence of the eval-loss curves", "", tostSentence(s.tost), "");
  md.push(mdTable(["endpoint", "baseline (mean)", "pipelined (mean)", "difference", "TOST 90% CI", "margin", "TOST p", "outside-margin p", "decision"],
    endpointRows.map((r) => [r.endpoint, f4(r.baseline), f4(r.pipelined), r.diff, r.ci90, r.margin, r.tost, r.outside, r.decision])));
  for (const n of ENDPOINTS) if (s.endpoints[n].decided === null && s.endpoints[n].seeds_needed) md.push(`- ${s.endpoints[n].label}: not decided${seedsNeededSentence(s.endpoints[n])}.`);
  md.push("");
  if (s.sequential) {
    const q = s.sequential;
    md.push(`### --seeds auto: ${q.decision}${q.decision === "continue" ? "" : ` at ${q.seeds} seeds`}`, "", `Sequential design: ${q.design.rule}.`, "");
    md.push(mdTable(["seeds", "mean difference", "margin", "TOST p", "outside-margin p", "decision"],
      q.looks.map((l) => [l.n, sci(l.mean_difference), `±${sci(l.margin)}`, p3(l.p_equivalent), p3(l.p_different), l.decision])));
  }
  md.push("### Per evaluation (pipelined − baseline, paired over seeds)", "");
  md.push(mdTable(["step", "baseline mean", "difference (mean)", "95% CI", "margin"],
    s.per_eval.map((e) => [e.step, f4(e.baseline_mean), sci(e.difference.mean), sciCi(e.difference.ci95), `±${sci(e.margin)}`])));
  md.push("### Final eval loss per seed", "");
  md.push(mdTable(["arm", "final eval loss (mean)", "95% CI", ...s.seeds.map((x) => `seed ${x}`)],
    s.arms_trained.map((a) => [a, f4(s.arms[a]!.final_eval.mean), ci(s.arms[a]!.final_eval.ci95), ...s.seeds.map((x) => f4(s.arms[a]!.final_eval_loss[x]))])));
  md.push(`## Throughput (${commLabel})`, "");
  md.push(mdTable(["arm", "tokens/s (median)", "IQR", "step ms (median)", "IQR"], s.arms_trained.map((a) => {
    const t = s.arms[a]!.throughput;
    return [a, t.tokens_per_s.median.toFixed(0), `${t.tokens_per_s.q1.toFixed(0)} .. ${t.tokens_per_s.q3.toFixed(0)}`, t.step_ms.median.toFixed(1), `${t.step_ms.q1.toFixed(1)} .. ${t.step_ms.q3.toFixed(1)}`];
  })));
  md.push(`Speed-up: ${s.speedup.median.toFixed(3)}x (median of per-step ratios baseline/pipelined, step 1 of each run left out; IQR ${s.speedup.q1.toFixed(3)} .. ${s.speedup.q3.toFixed(3)}, n = ${s.speedup.n}); ${commLabel}.`, "");
  const mdPath = join(root, "summary.md");
  writeFileAtomic(mdPath, md.join("\n") + "\n");

  // ---- report.html ----
  const curves = runs.flatMap((r) => s.arms_trained.flatMap((arm) => (r.lines[arm] ?? []).filter((l) => l.kind === "train").map((l) => ({ seed: `seed ${r.seed}`, arm, step: l.step, loss: l.loss }))));
  // The divergences, the control's and the envelope K x its running max (with the floor), on one log scale per quantity.
  const divValues = s.seeds.flatMap((x) => DIVERGENCES.flatMap((k) => {
    const d = s.divergence[x][k];
    const rows: Array<Record<string, unknown>> = [];
    let rc = 0;
    d.steps.forEach((step, i) => {
      const base = { seed: `seed ${x}`, quantity: DIV_TITLE[k], step };
      rows.push({ ...base, series: "pipelined vs baseline", value: Math.max(d.pipelined[i], LOG_FLOOR) });
      if (d.control) {
        rows.push({ ...base, series: "control vs baseline", value: Math.max(d.control[i], LOG_FLOOR) });
        rc = Math.max(rc, d.control[i], d.floor[i]);
        rows.push({ ...base, series: `envelope (${env!.factor}x control running max)`, value: Math.max(env!.factor * rc, LOG_FLOOR) });
      }
    });
    return rows;
  }));
  const perEval = s.per_eval.map((e) => ({ step: e.step, mean: e.difference.mean, lo: e.difference.ci95?.[0] ?? e.difference.mean, hi: e.difference.ci95?.[1] ?? e.difference.mean, margin: e.margin, neg: -e.margin }));
  const evalRows = s.arms_trained.map((arm) => ({ arm, mean: s.arms[arm]!.final_eval.mean, lo: s.arms[arm]!.final_eval.ci95?.[0] ?? s.arms[arm]!.final_eval.mean, hi: s.arms[arm]!.final_eval.ci95?.[1] ?? s.arms[arm]!.final_eval.mean }));
  const seedRows = s.arms_trained.flatMap((arm) => s.seeds.map((x) => ({ arm, seed: `seed ${x}`, loss: s.arms[arm]!.final_eval_loss[x] })));
  const tputRows = s.arms_trained.map((arm) => ({ arm, median: s.arms[arm]!.throughput.tokens_per_s.median, q1: s.arms[arm]!.throughput.tokens_per_s.q1, q3: s.arms[arm]!.throughput.tokens_per_s.q3 }));
  const charts: Record<string, ChartSpec> = {
    loss: { title: "Training loss per step", caption: `Every arm, every seed (lm + aux + z loss). ${capacity}.`, spec: {
      data: { values: curves }, width: 320, height: 220,
      mark: { type: "line", strokeWidth: 1.2 }, encoding: {
        x: { field: "step", type: "quantitative" }, y: { field: "loss", type: "quantitative", scale: { zero: false } },
        color: { field: "arm", type: "nominal" }, strokeDash: { field: "arm", type: "nominal" }, column: { field: "seed", type: "nominal", title: null },
        tooltip: [{ field: "seed" }, { field: "arm" }, { field: "step" }, { field: "loss", format: ".6f" }],
      } } },
    divergence: { title: control ? "Divergence from the baseline: the pipelined arm against the noise envelope (log scale)" : "Divergence of the pipelined arm from the baseline (log scale)",
      caption: (control ? `Rows: |Δloss| and |Δgrad norm| at every step, the relative parameter distance at every evaluation; columns: seeds. The control arm is the baseline with every initial weight moved by one ulp; the dashed envelope is ${env!.factor}x its running maximum (each value counted as at least fp32's resolution there). ` : "") +
        `An exact 0 is drawn at ${LOG_FLOOR.toExponential(0)}.`, spec: {
      data: { values: divValues },
      facet: { row: { field: "quantity", type: "nominal", title: null, sort: DIVERGENCES.map((k) => DIV_TITLE[k]) }, column: { field: "seed", type: "nominal", title: null } },
      spec: { width: 300, height: 160, mark: { type: "line", strokeWidth: 1.1 }, encoding: {
        x: { field: "step", type: "quantitative" }, y: { field: "value", type: "quantitative", scale: { type: "log" }, title: null },
        color: { field: "series", type: "nominal", legend: { orient: "top", title: null } }, strokeDash: { field: "series", type: "nominal", legend: { orient: "top", title: null } },
        tooltip: [{ field: "seed" }, { field: "quantity" }, { field: "series" }, { field: "step" }, { field: "value", format: ".3e" }] } },
      resolve: { scale: { y: "independent" } } } },
    perEval: { title: "Eval loss difference pipelined − baseline at each evaluation", caption: `Mean over ${s.seeds.length} seed(s) of the paired difference with its t-based 95% interval (band); the dashed lines: ±the margin (${marginPct(s.tost.relative_margin)} of the baseline's mean eval loss there).`, spec: {
      data: { values: perEval }, width: 640, height: 220, layer: [
        { mark: { type: "area", opacity: 0.25 }, encoding: { x: { field: "step", type: "quantitative" }, y: { field: "lo", type: "quantitative", title: "Δ eval loss" }, y2: { field: "hi" } } },
        { mark: { type: "line", point: true }, encoding: { x: { field: "step", type: "quantitative" }, y: { field: "mean", type: "quantitative" }, tooltip: [{ field: "step" }, { field: "mean", format: ".3e" }, { field: "lo", format: ".3e" }, { field: "hi", format: ".3e" }] } },
        { mark: { type: "line", strokeDash: [4, 3], color: "gray" }, encoding: { x: { field: "step", type: "quantitative" }, y: { field: "margin", type: "quantitative" } } },
        { mark: { type: "line", strokeDash: [4, 3], color: "gray" }, encoding: { x: { field: "step", type: "quantitative" }, y: { field: "neg", type: "quantitative" } } },
      ] } },
    final: { title: "Final eval loss with 95% confidence intervals", caption: `Mean over seeds (bars: t-based 95% CI; points: each seed's final eval loss, the mean of its last ${doc.last_evals} evaluation(s)).`, spec: {
      width: 320, height: 220, layer: [
        { data: { values: evalRows }, mark: { type: "errorbar", ticks: true }, encoding: { x: { field: "arm", type: "nominal" }, y: { field: "lo", type: "quantitative", scale: { zero: false }, title: "eval loss" }, y2: { field: "hi" } } },
        { data: { values: evalRows }, mark: { type: "point", filled: true, size: 80, color: "black" }, encoding: { x: { field: "arm", type: "nominal" }, y: { field: "mean", type: "quantitative" } } },
        { data: { values: seedRows }, mark: { type: "point", opacity: 0.6 }, encoding: { x: { field: "arm", type: "nominal" }, y: { field: "loss", type: "quantitative" }, color: { field: "seed", type: "nominal" }, tooltip: [{ field: "arm" }, { field: "seed" }, { field: "loss", format: ".5f" }] } },
      ] } },
    throughput: { title: `Throughput (${commLabel})`, caption: "Median tokens/s per arm over every step but each run's first; whiskers: quartiles.", spec: {
      width: 320, height: 220, layer: [
        { data: { values: tputRows }, mark: "bar", encoding: { x: { field: "arm", type: "nominal" }, y: { field: "median", type: "quantitative", title: "tokens/s" }, color: { field: "arm", type: "nominal" } } },
        { data: { values: tputRows }, mark: { type: "rule" }, encoding: { x: { field: "arm", type: "nominal" }, y: { field: "q1", type: "quantitative" }, y2: { field: "q3" } } },
      ] } },
  };
  const goalsTable: TableSpec = { title: "Goals", columns: [{ key: "goal", label: "goal", align: "left" }, { key: "met", label: "", align: "left", format: (v) => (v === null ? "NOT JUDGED" : v ? "MET" : "MISSED") }, { key: "detail", label: "numbers", align: "left" }], rows: s.goals };
  const endpointTable: TableSpec = { title: "Equivalence tests (paired over seeds)", columns: [
    { key: "endpoint", label: "endpoint", align: "left" }, { key: "baseline", label: "baseline" }, { key: "pipelined", label: "pipelined" }, { key: "diff", label: "difference" },
    { key: "ci90", label: "TOST 90% CI", align: "left" }, { key: "margin", label: "margin" }, { key: "tost", label: "TOST p" }, { key: "outside", label: "outside-margin p" }, { key: "decision", label: "decision", align: "left" }], rows: endpointRows };
  const report: ReportDoc = {
    title: "ampipe compare: baseline vs pipelined",
    subtitle: [`arms: ${s.arms_trained.join(", ")}; pipelined block ${planLabel}; ${s.seeds.length} seed(s) x ${s.steps} steps; ${capacity}; ${cfg.model.dtype}`, commLabel, `written ${doc.created as string}`],
    sections: [
      { title: "Result", notice: fault ? [`TEST HOOK: the pipelined arm was made wrong on purpose: ${fault.join("; ")}.`] : undefined,
        text: [tostSentence(s.tost), `Largest per-step |Δloss| pipelined vs baseline: ${sci(s.per_step_max_abs_delta.overall)} (seed ${s.per_step_max_abs_delta.at.seed}, step ${s.per_step_max_abs_delta.at.step}). Speed-up ${s.speedup.median.toFixed(3)}x (${commLabel}).`],
        tables: [goalsTable] },
      { title: "Divergence from the baseline", text: control ? [`Envelope rule (K = ${env!.factor}): ${ENVELOPE_RULE}.`] : ["No control arm (--no-control): no envelope."],
        charts: [charts.divergence], tables: [{ columns: [{ key: "seed", label: "seed" }, ...DIVERGENCES.flatMap((k) => [{ key: `${k}_p`, label: `max ${k} pipelined` }, { key: `${k}_c`, label: "control" }]),
          { key: "envelope", label: "envelope", align: "left" as const }, { key: "worst", label: "largest ratio to the control's running max", align: "left" as const }], rows: divRows }] },
      { title: "Loss curves", charts: [charts.loss] },
      { title: "Equivalence over the whole curve", text: s.sequential ? [`--seeds auto: ${s.sequential.decision} (${s.sequential.design.rule}).`] : [],
        charts: [charts.perEval], tables: [endpointTable,
          ...(s.sequential ? [{ title: "Sequential looks", columns: [{ key: "n", label: "seeds" }, { key: "mean_difference", label: "mean difference" }, { key: "p_equivalent", label: "TOST p" }, { key: "p_different", label: "outside-margin p" }, { key: "decision", label: "decision", align: "left" as const }], rows: s.sequential.looks as unknown as Array<Record<string, unknown>> }] : [])] },
      { title: "Final evaluation", charts: [charts.final], tables: [{ columns: [{ key: "arm", label: "arm", align: "left" }, { key: "mean", label: "mean" }, { key: "ci", label: "95% CI", align: "left" }, ...s.seeds.map((x) => ({ key: `s${x}`, label: `seed ${x}` }))],
        rows: s.arms_trained.map((a) => ({ arm: a, mean: s.arms[a]!.final_eval.mean, ci: ci(s.arms[a]!.final_eval.ci95), ...Object.fromEntries(s.seeds.map((x) => [`s${x}`, s.arms[a]!.final_eval_loss[x]])) })) }] },
      { title: "Throughput", charts: [charts.throughput], text: [`Speed-up ${s.speedup.median.toFixed(3)}x: the median of per-step ratios baseline/pipelined (IQR ${s.speedup.q1.toFixed(3)} .. ${s.speedup.q3.toFixed(3)}). The arms' steps alternate on the same ranks (a Williams order), so the machine's drift hits every arm.`] },
      { title: "Config", text: [JSON.stringify({ model: cfg.model, parallelism: cfg.parallelism, pipeline: cfg.pipeline, train: cfg.train, data: cfg.data })] },
    ],
  };
  const htmlPath = join(root, "report.html");
  writeReport(htmlPath, report);
  return [mdPath, htmlPath];
}
