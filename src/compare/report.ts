// The report of `ampipe compare`: report.html (the shared page writer, Vega-Lite inlined) and
// summary.md with the same numbers as tables.
import { join } from "node:path";
import { type ExperimentConfig } from "../config/index.ts";
import { writeFileAtomic } from "../plan/io.ts";
import { writeReport, type ChartSpec, type ReportDoc } from "../report/html.ts";
import { mdGoals, mdTable } from "../report/markdown.ts";
import { ARMS, tostSentence, type CompareSummary, type SeedRuns } from "./summary.ts";

const f4 = (v: number | null | undefined) => (typeof v === "number" ? v.toFixed(4) : "–");
const ci = (c: [number, number] | null) => (c ? `${c[0].toFixed(4)} .. ${c[1].toFixed(4)}` : "– (one seed)");
const sci = (v: number) => v.toExponential(2);

/** Writes summary.md and report.html into `root`; returns their paths. */
export function writeCompareReport(root: string, doc: Record<string, unknown>, s: CompareSummary, cfg: ExperimentConfig,
  runs: SeedRuns[]): string[] {
  const emulated = doc.emulated as string | null;
  const commLabel = emulated ? `EMULATED interconnect (${emulated})` : "real communication";
  const planLabel = `${(doc.plan as { variant: string }).variant}, boundaries [${(doc.plan as { boundaries: number[] }).boundaries.join(", ")}]`;
  const capacity = cfg.model.moe_expert_capacity_factor === null ? "dropless routing" : `capacity factor ${cfg.model.moe_expert_capacity_factor} (per-chunk capacity in the pipelined arm)`;

  // ---- summary.md ----
  const md: string[] = [];
  md.push(`# ampipe compare: baseline vs pipelined (${planLabel})`, "");
  md.push(`${s.seeds.length} seed(s) (${s.seeds.join(", ")}) x ${s.steps} steps per arm; ${capacity}; ${cfg.model.dtype}; ${cfg.parallelism.world_size} ${cfg.parallelism.device} ranks, EP ${cfg.parallelism.expert_model_parallel_size}; ${commLabel}.`, "");
  md.push("## Goals", "", mdGoals(s.goals.map((g) => ({ name: g.goal, met: g.met, detail: g.detail }))));
  md.push("## Equivalence", "", tostSentence(s.tost), "");
  md.push(mdTable(["arm", "final eval loss (mean)", "95% CI", ...s.seeds.map((x) => `seed ${x}`)],
    ARMS.map((a) => [a, f4(s.arms[a].final_eval.mean), ci(s.arms[a].final_eval.ci95), ...s.seeds.map((x) => f4(s.arms[a].final_eval_loss[x]))])));
  md.push(mdTable(["", "value"], [
    ["difference pipelined − baseline (mean)", sci(s.difference.mean)],
    ["its 95% CI", s.difference.ci95 ? `${sci(s.difference.ci95[0])} .. ${sci(s.difference.ci95[1])}` : "–"],
    ["TOST margin", `±${(100 * s.tost.relative_margin).toFixed(2)}% = ±${sci(s.tost.margin)}`],
    ["TOST p-value", s.tost.p_value === null ? "–" : s.tost.p_value.toPrecision(3)],
    ["TOST 90% CI of the difference", s.tost.ci90 ? `${sci(s.tost.ci90[0])} .. ${sci(s.tost.ci90[1])}` : "–"],
    ["equivalent", s.tost.equivalent === null ? "not testable" : s.tost.equivalent ? "yes" : "not shown"],
  ]));
  md.push("## Per-step loss difference", "");
  md.push(mdTable(["seed", "largest abs(Δloss)", "final ‖θ_p − θ_b‖ / ‖θ_b‖", "max abs(θ_p − θ_b)"],
    s.seeds.map((x) => [x, sci(s.per_step_max_abs_delta.per_seed[x]), s.parameter_distance[x] ? sci(s.parameter_distance[x]!.relative) : "–",
      s.parameter_distance[x] ? sci(s.parameter_distance[x]!.max_abs) : "–"])));
  md.push(`## Throughput (${commLabel})`, "");
  md.push(mdTable(["arm", "tokens/s (median)", "IQR", "step ms (median)", "IQR"], ARMS.map((a) => {
    const t = s.arms[a].throughput;
    return [a, t.tokens_per_s.median.toFixed(0), `${t.tokens_per_s.q1.toFixed(0)} .. ${t.tokens_per_s.q3.toFixed(0)}`, t.step_ms.median.toFixed(1), `${t.step_ms.q1.toFixed(1)} .. ${t.step_ms.q3.toFixed(1)}`];
  })));
  md.push(`Speed-up: ${s.speedup.median.toFixed(3)}x (median of per-step ratios baseline/pipelined, step 1 of each run left out; IQR ${s.speedup.q1.toFixed(3)} .. ${s.speedup.q3.toFixed(3)}, n = ${s.speedup.n}); ${commLabel}.`, "");
  const mdPath = join(root, "summary.md");
  writeFileAtomic(mdPath, md.join("\n") + "\n");

  // ---- report.html ----
  const curves = runs.flatMap((r) => ARMS.flatMap((arm) => r.lines[arm].filter((l) => l.kind === "train").map((l) => ({ seed: `seed ${r.seed}`, arm, step: l.step, loss: l.loss }))));
  const deltas = s.seeds.flatMap((x) => s.per_step_abs_delta[x].map(([step, d]) => ({ seed: `seed ${x}`, step, delta: Math.max(d, 1e-12) })));
  const evalRows = ARMS.map((arm) => ({ arm, mean: s.arms[arm].final_eval.mean, lo: s.arms[arm].final_eval.ci95?.[0] ?? s.arms[arm].final_eval.mean, hi: s.arms[arm].final_eval.ci95?.[1] ?? s.arms[arm].final_eval.mean }));
  const seedRows = ARMS.flatMap((arm) => s.seeds.map((x) => ({ arm, seed: `seed ${x}`, loss: s.arms[arm].final_eval_loss[x] })));
  const tputRows = ARMS.map((arm) => ({ arm, median: s.arms[arm].throughput.tokens_per_s.median, q1: s.arms[arm].throughput.tokens_per_s.q1, q3: s.arms[arm].throughput.tokens_per_s.q3 }));
  const charts: ChartSpec[] = [
    { title: "Training loss per step", caption: `Both arms, every seed (lm + aux + z loss). ${capacity}.`, spec: {
      data: { values: curves }, width: 320, height: 220,
      mark: { type: "line", strokeWidth: 1.2 }, encoding: {
        x: { field: "step", type: "quantitative" }, y: { field: "loss", type: "quantitative", scale: { zero: false } },
        color: { field: "arm", type: "nominal" }, strokeDash: { field: "arm", type: "nominal" }, column: { field: "seed", type: "nominal", title: null },
        tooltip: [{ field: "seed" }, { field: "arm" }, { field: "step" }, { field: "loss", format: ".6f" }],
      } } },
    { title: "|Δloss| per step (pipelined − baseline)", caption: "Log scale; a difference of exactly 0 is drawn at 1e-12.", spec: {
      data: { values: deltas }, width: 640, height: 220, mark: { type: "line", point: false },
      encoding: { x: { field: "step", type: "quantitative" }, y: { field: "delta", type: "quantitative", scale: { type: "log" }, title: "|Δloss|" },
        color: { field: "seed", type: "nominal" }, tooltip: [{ field: "seed" }, { field: "step" }, { field: "delta", format: ".3e" }] } } },
    { title: "Final eval loss with 95% confidence intervals", caption: `Mean over seeds (bars: t-based 95% CI; points: each seed's final eval loss, the mean of its last ${doc.last_evals} evaluation(s)).`, spec: {
      width: 320, height: 220, layer: [
        { data: { values: evalRows }, mark: { type: "errorbar", ticks: true }, encoding: { x: { field: "arm", type: "nominal" }, y: { field: "lo", type: "quantitative", scale: { zero: false }, title: "eval loss" }, y2: { field: "hi" } } },
        { data: { values: evalRows }, mark: { type: "point", filled: true, size: 80, color: "black" }, encoding: { x: { field: "arm", type: "nominal" }, y: { field: "mean", type: "quantitative" } } },
        { data: { values: seedRows }, mark: { type: "point", opacity: 0.6 }, encoding: { x: { field: "arm", type: "nominal" }, y: { field: "loss", type: "quantitative" }, color: { field: "seed", type: "nominal" }, tooltip: [{ field: "arm" }, { field: "seed" }, { field: "loss", format: ".5f" }] } },
      ] } },
    { title: `Throughput (${commLabel})`, caption: "Median tokens/s per arm over every step but each run's first; whiskers: quartiles.", spec: {
      width: 320, height: 220, layer: [
        { data: { values: tputRows }, mark: "bar", encoding: { x: { field: "arm", type: "nominal" }, y: { field: "median", type: "quantitative", title: "tokens/s" }, color: { field: "arm", type: "nominal" } } },
        { data: { values: tputRows }, mark: { type: "rule" }, encoding: { x: { field: "arm", type: "nominal" }, y: { field: "q1", type: "quantitative" }, y2: { field: "q3" } } },
      ] } },
  ];
  const report: ReportDoc = {
    title: "ampipe compare: baseline vs pipelined",
    subtitle: [`arms: baseline block and pipelined block (${planLabel}); ${s.seeds.length} seed(s) x ${s.steps} steps; ${capacity}; ${cfg.model.dtype}`, commLabel, `written ${doc.created as string}`],
    sections: [
      { title: "Result", text: [tostSentence(s.tost), `Largest per-step |Δloss|: ${sci(s.per_step_max_abs_delta.overall)} (seed ${s.per_step_max_abs_delta.at.seed}, step ${s.per_step_max_abs_delta.at.step}). Speed-up ${s.speedup.median.toFixed(3)}x (${commLabel}).`],
        tables: [{ title: "Goals", columns: [{ key: "goal", label: "goal", align: "left" }, { key: "met", label: "", align: "left", format: (v) => (v === null ? "NOT JUDGED" : v ? "MET" : "MISSED") }, { key: "detail", label: "numbers", align: "left" }], rows: s.goals }] },
      { title: "Loss curves", charts: charts.slice(0, 2) },
      { title: "Final evaluation", charts: [charts[2]], tables: [{ columns: [{ key: "arm", label: "arm", align: "left" }, { key: "mean", label: "mean" }, { key: "ci", label: "95% CI", align: "left" }, ...s.seeds.map((x) => ({ key: `s${x}`, label: `seed ${x}` }))],
        rows: ARMS.map((a) => ({ arm: a, mean: s.arms[a].final_eval.mean, ci: ci(s.arms[a].final_eval.ci95), ...Object.fromEntries(s.seeds.map((x) => [`s${x}`, s.arms[a].final_eval_loss[x]])) })) }] },
      { title: "Throughput", charts: [charts[3]], text: [`Speed-up ${s.speedup.median.toFixed(3)}x: the median of per-step ratios baseline/pipelined (IQR ${s.speedup.q1.toFixed(3)} .. ${s.speedup.q3.toFixed(3)}). The arms' steps alternate on the same ranks (ABBA), so the machine's drift hits both.`] },
      { title: "Config", text: [JSON.stringify({ model: cfg.model, parallelism: cfg.parallelism, pipeline: cfg.pipeline, train: cfg.train, data: cfg.data })] },
    ],
  };
  const htmlPath = join(root, "report.html");
  writeReport(htmlPath, report);
  return [mdPath, htmlPath];
}
