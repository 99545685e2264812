// `ampipe bench <config>`: the experiment sweep (src/sweep/, docs/bench.md); `ampipe bench <name>`:
// the other benchmarks. Each of those has its command in src/commands/bench/<name>.ts, which
// exports `register(bench: Command)` (its measuring code lives in src/bench/<name>.ts); this
// module finds them, so adding a benchmark touches no shared file.
import { readdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { InvalidArgumentError, type Command } from "commander";
import { RESULTS_FILE, CSV_FILE } from "../sweep/results.ts";
import { CALIBRATION_FILE, Sweep, errorText, fmtMs, type SweepOptions } from "../sweep/sweep.ts";
import { makeProgress, type Progress } from "../train/progress.ts";
import { addControllerOptions } from "./options.ts";

export type BenchOptions = SweepOptions;

interface Printer { line(s: string): void }

/**
 * `ampipe bench <config>`: the sweep (src/sweep/sweep.ts) with its progress, Ctrl-C and exit code
 * (0: every case ran, 1: a case failed or the ranks could not start, 2: bad input, 130/143: interrupted).
 */
export async function benchCommand(configPath: string, o: BenchOptions, out: Printer = { line: (s) => process.stdout.write(s + "\n") }): Promise<number> {
  const t0 = performance.now();
  let sweep: Sweep;
  try {
    sweep = Sweep.open(configPath, o);
  } catch (e) {
    process.stderr.write(`ampipe bench: ${errorText(e)}\n`);
    return 2;
  }
  out.line(sweep.describe());
  const { cases, outDir } = sweep;
  const finish = () => {
    const results = sweep.finish();
    const ok = results.filter((r) => r.status === "ok");
    const errs = results.filter((r) => r.status === "error");
    out.line(`wrote ${join(outDir, RESULTS_FILE)}, ${join(outDir, CSV_FILE)}, ${join(outDir, CALIBRATION_FILE)} and ${ok.length} traces in ${join(outDir, "traces")}`);
    if (errs.length) out.line(`${errs.length} case(s) failed: ${errs.map((r) => r.case).join(", ")} (errors in ${RESULTS_FILE}; rerun to retry them)`);
    out.line(`done in ${((performance.now() - t0) / 1000).toFixed(1)} s; report: ampipe report ${outDir}`);
  };
  const pending = sweep.pending;
  if (pending.length === 0) {
    await sweep.close();
    finish();
    return 0;
  }

  let stopping: NodeJS.Signals | null = null;
  const onSignal = (sig: NodeJS.Signals) => {
    stopping = sig;
    process.stderr.write(`ampipe bench: ${sig}: stopping; finished cases are kept in ${join(outDir, RESULTS_FILE)} (rerun to resume)\n`);
    void sweep.abort();
  };
  process.on("SIGINT", onSignal);
  process.on("SIGTERM", onSignal);

  // The ETA weighs each case by its expected cost (a long sequence costs more than a short one).
  const weights = sweep.caseWeights();
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
      if (tty) progress.update(doneCount, { case: spec.id, note: "running" });
      let outcome;
      try {
        outcome = await sweep.runOne(spec, (l) => progress.log(l), () => stopping !== null);
      } catch {
        break; // stopped (a signal closed the ranks): the case is not recorded
      }
      const { result } = outcome;
      if (result.status === "error") failed++;
      if (outcome.externalLost) {
        progress.log(`case ${spec.id} failed and the external ranks are gone; stopping (restart the ranks and rerun to resume):\n${indentLines(result.error!)}`);
        externalLost = true;
        break;
      }
      if (result.equivalence_ok === false) {
        failed++;
        progress.log(`case ${spec.id}: the pipelined block DIFFERS from the sequential block (largest relative difference ${result.largest_relative_difference}); its times are kept, flagged`);
      }
      const note = result.status === "ok"
        ? `${fmtMs(result.measured_ms!)} ms, ${result.speedup!.toFixed(3)}x vs sequential${result.speedup_vs_moe_overlap !== null ? `, ${result.speedup_vs_moe_overlap.toFixed(3)}x vs moe-overlap` : ""}, predicted ${fmtMs(result.predicted_ms!)} ms`
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
    await sweep.close();
  }
  if (stopping) {
    sweep.finish();
    out.line(`interrupted: ${sweep.done.size} of ${cases.length} cases finished and kept in ${outDir}; rerun the same command to resume`);
    return stopping === "SIGINT" ? 130 : 143;
  }
  finish();
  if (externalLost) return 1;
  return failed > 0 ? 1 : 0;
}

function indentLines(s: string): string {
  return s.split("\n").map((l) => `    ${l}`).join("\n");
}

const benchDir = join(dirname(fileURLToPath(import.meta.url)), "bench");
const modules: Array<{ name: string; register(bench: Command): void }> = [];
for (const file of readdirSync(benchDir).filter((f) => f.endsWith(".ts") && !f.endsWith(".d.ts")).sort()) {
  const m = (await import(pathToFileURL(join(benchDir, file)).href)) as { register?: (bench: Command) => void };
  if (typeof m.register === "function") modules.push({ name: file, register: m.register });
}

export function register(program: Command): void {
  const bench = program
    .command("bench")
    .description("sweep a config's bench grid against the sequential block and moe-overlap (ampipe bench <config>), or run a named benchmark")
    .argument("[config]", "experiment config whose bench section is swept")
    // Options after a benchmark's name are that benchmark's (`bench train <config> --out DIR`), not the sweep's.
    .enablePositionalOptions()
    .option("--out <dir>", "output directory (default: <run.output_dir>/bench); a rerun on it resumes after the finished cases")
    .option("--cases <n>", "run only the first n cases of the grid", (v: string) => {
      const n = Number(v);
      if (!Number.isInteger(n) || n < 1) throw new InvalidArgumentError("expected a positive integer");
      return n;
    })
    .option("--quick", "the config's quick slice (bench.quick)")
    .option("--fresh", "discard what an earlier sweep left in the output directory and start over (default: resume)")
    .option("--set <field=value>", "override a config field, e.g. --set bench.steps=4 (repeatable)", (v: string, acc: string[]) => [...acc, v], []);
  addControllerOptions(bench).action(async (config: string | undefined, opts: BenchOptions) => {
    if (config === undefined) {
      bench.help({ error: true });
      return;
    }
    process.exitCode = await benchCommand(config, opts);
  });
  for (const m of modules) m.register(bench);
}
