// `ampipe train --profile`: every rank profiles a few training steps of the baseline block and
// of the pipelined block (rank command `train_profile`, py/ampipe/train/profile.py) and writes
// its Chrome trace events; here they become one trace (ranks side by side, on the machine's
// monotonic clock) and one breakdown, printed and kept in the run directory. docs/train.md#profile.
import { readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import type { z } from "zod";
import { writeFileAtomic } from "../plan/io.ts";
import type { ArmBreakdownSchema, ProfileResultSchema } from "./results.ts";

export const PROFILE_FORMAT = "ampipe.profile";

/** One arm's medians over the quiet steps of one rank (the `train_profile` result's breakdown). */
export type ArmBreakdown = z.output<typeof ArmBreakdownSchema>;
/** One rank's `train_profile` result. */
export type RankProfile = z.output<typeof ProfileResultSchema>;

/** Concatenates the ranks' trace files into `<dir>/trace.json` (then removes them). Returns its path. */
export function mergeTraces(dir: string, ranks: RankProfile[]): string {
  const events: unknown[] = [];
  for (const r of ranks) {
    const doc = JSON.parse(readFileSync(r.trace, "utf8")) as { traceEvents: unknown[] };
    for (const e of doc.traceEvents) events.push(e);
  }
  const out = join(dir, "trace.json");
  writeFileAtomic(out, JSON.stringify({ traceEvents: events, displayTimeUnit: "ms" }) + "\n");
  for (const r of ranks) rmSync(r.trace, { force: true });
  return out;
}

const f1 = (x: number | undefined) => (x === undefined ? "-" : x.toFixed(1));

/** Mean over ranks of one figure. */
function meanOver(ranks: RankProfile[], arm: string, get: (b: ArmBreakdown) => number | undefined): number | undefined {
  const xs = ranks.map((r) => r.breakdown[arm]).filter((b) => b !== undefined).map(get).filter((x): x is number => x !== undefined);
  return xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : undefined;
}

/** The breakdown as a markdown table: rows are figures, columns the arms (means over ranks of per-step medians, ms). */
export function breakdownTable(ranks: RankProfile[], arms: string[]): string {
  const kinds = (key: "waits_on" | "collectives") =>
    [...new Set(ranks.flatMap((r) => arms.flatMap((a) => Object.keys(r.breakdown[a]?.[key] ?? {}))))].sort();
  const phases = ["forward", "backward", "grad_sync", "clip", "optimizer", "data", "zero_grad", "loss_read", "metrics", "loss_scale"];
  const rows: [string, (b: ArmBreakdown) => number | undefined][] = [
    ["step", (b) => b.step_ms],
    ["  phases, summed (coverage of the step)", (b) => b.phases_sum],
    ...phases.filter((p) => ranks.some((r) => arms.some((a) => (r.breakdown[a]?.phases[p] ?? 0) > 0)))
      .map((p): [string, (b: ArmBreakdown) => number | undefined] => [`    ${p}`, (b) => b.phases[p] ?? 0]),
    ["  Python garbage collection (inside or between phases)", (b) => b.python_gc],
    ["    between phases (counted in the coverage)", (b) => b.python_gc_between_phases],
    ["  MoE layers (forward + backward)", (b) => b.moe_layers],
    ["  outside the MoE layers", (b) => b.outside_moe_layers],
    ["  pipelined passes", (b) => (b.block_passes ? b.block_passes : undefined)],
    ["    ops on the compute thread (comm ops' local parts included)", (b) => (b.block_passes ? b.compute_ops : undefined)],
    ["      inside autograd islands (the model's functions forward, the engine backward)", (b) => (b.block_passes ? b.island_compute : undefined)],
    ["      the ops' bookkeeping (detach inputs, keep islands, hand values on, route gradients)", (b) => (b.block_passes ? b.op_bookkeeping : undefined)],
    ["    compute thread waiting", (b) => (b.block_passes ? b.compute_waits : undefined)],
    ...kinds("waits_on").map((k): [string, (b: ArmBreakdown) => number | undefined] => [`      on ${k}`, (b) => (b.block_passes ? b.waits_on[k] ?? 0 : undefined)]),
    ["    executor overhead (pass - ops - waits)", (b) => (b.block_passes ? b.executor_overhead : undefined)],
    ["    comm ops, time on their stream", (b) => (b.block_passes ? b.comm_stream_ops : undefined)],
    ...kinds("collectives").map((k): [string, (b: ArmBreakdown) => number | undefined] => [`  collective: ${k}`, (b) => b.collectives[k] ?? 0]),
    ["  emulated delay (baseline: slept; pipelined: modelled on the comm stream)", (b) => b.emulated_delay],
  ];
  const head = `| ms per step | ${arms.join(" | ")} |\n|---|${arms.map(() => "---:").join("|")}|\n`;
  return head + rows.map(([label, get]) => {
    const cells = arms.map((a) => f1(meanOver(ranks, a, get)));
    if (label.includes("coverage")) {
      return `| ${label.replace("  ", "&nbsp;&nbsp;")} | ${arms.map((a, i) => `${cells[i]} (${(100 * (meanOver(ranks, a, (b) => b.coverage) ?? 0)).toFixed(1)}%)`).join(" | ")} |`;
    }
    return `| ${label.replace(/^( +)/, (m) => "&nbsp;".repeat(m.length))} | ${cells.join(" | ")} |`;
  }).join("\n") + "\n";
}

/** Writes `<dir>/breakdown.json` and `<dir>/breakdown.md`; returns the table. */
export function writeBreakdown(dir: string, ranks: RankProfile[], arms: string[], note: string): string {
  const table = breakdownTable(ranks, arms);
  writeFileAtomic(join(dir, "breakdown.json"), JSON.stringify({ format: PROFILE_FORMAT, version: 1, arms, note, ranks: ranks.map((r) => ({ rank: r.rank, breakdown: r.breakdown, torch_profiler: r.torch_profiler })) }, null, 2) + "\n");
  writeFileAtomic(join(dir, "breakdown.md"), `# Training step profile\n\n${note}\n\n${table}`);
  return table;
}
