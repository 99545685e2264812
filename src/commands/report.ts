// `ampipe report <run-dir>`: report.html (self-contained, charts inlined) and summary.md for a
// run directory: a bench sweep (bench.json + results.jsonl) or an `ampipe bench train` run
// (bench-train.json + results.jsonl); a directory that is neither says what it lacks.
import { join } from "node:path";
import type { Command } from "commander";
import { MissingRunError, buildBenchReport } from "../report/bench.ts";
import { writeReport } from "../report/html.ts";
import { buildTrainBenchReport, isTrainBenchRun } from "../report/train-bench.ts";
import { writeFileAtomic } from "../plan/io.ts";

export const REPORT_FILE = "report.html";
export const SUMMARY_FILE = "summary.md";

interface Printer { line(s: string): void }

/** Writes the report; returns the exit code (0 written, possibly of a partial run; 2 not a run directory). */
export function reportCommand(dir: string, o: { out?: string } = {}, out: Printer = { line: (s) => process.stdout.write(s + "\n") }): number {
  let r;
  try {
    r = isTrainBenchRun(dir) ? buildTrainBenchReport(dir) : buildBenchReport(dir);
  } catch (e) {
    if (!(e instanceof MissingRunError)) throw e;
    process.stderr.write(`ampipe report: ${e.message}\n`);
    return 2;
  }
  const outDir = o.out ?? dir;
  const html = join(outDir, REPORT_FILE);
  const md = join(outDir, SUMMARY_FILE);
  writeReport(html, r.doc);
  writeFileAtomic(md, r.summary);
  for (const m of r.missing) out.line(`incomplete: ${m}`);
  out.line(`wrote ${md} and ${html} (opens offline)`);
  for (const l of r.headline) out.line(l);
  return 0;
}

export function register(program: Command): void {
  program
    .command("report")
    .description("write report.html (charts, offline) and summary.md for a run directory (ampipe bench or ampipe bench train output)")
    .argument("<run-dir>", "the directory ampipe bench or ampipe bench train wrote")
    .option("--out <dir>", "where to write report.html and summary.md (default: the run directory)")
    .action((dir: string, opts: { out?: string }) => {
      process.exitCode = reportCommand(dir, opts);
    });
}
