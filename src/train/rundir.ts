// A training run's directory: the resolved config it was started with, the metric log, and
// what a rerun of the same command does with them (resume; --fresh starts over).
//
//   <run_dir>/config.json    the resolved config (a rerun with another config is refused)
//   <run_dir>/plan.json      the plan the pipelined blocks executed (absent for the baseline)
//   <run_dir>/metrics.jsonl  one line per train step and per eval, as the ranks sent them
//   <run_dir>/tb/            TensorBoard events (written by rank 0)
//   <run_dir>/checkpoints/   step-NNNNNNNN/ shards + manifest (py/ampipe/train/checkpoint.py)
//   <run_dir>/train.json     the summary of the last invocation
//   <run_dir>/tune.json      pipeline.degree auto: the blocks timed and the one chosen (src/train/tune.ts),
//                            with the calibrated model's step predictions (src/train/predict.ts)
//   <run_dir>/calibration.json  the timed steps' op times (ampipe plan --calibration reads it)
//   <run_dir>/profile/       --profile: trace.json (every rank), breakdown.md/.json (src/train/profile.ts)
import { appendFileSync, existsSync, mkdirSync, readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import { writeFileAtomic } from "../plan/io.ts";

export class RunDirError extends Error {}

/** Dotted paths where two JSON values differ (for "this run directory was started with ..."). */
export function differingFields(a: unknown, b: unknown, prefix = ""): string[] {
  const isObj = (v: unknown): v is Record<string, unknown> => v !== null && typeof v === "object" && !Array.isArray(v);
  if (isObj(a) && isObj(b)) {
    const keys = [...new Set([...Object.keys(a), ...Object.keys(b)])].sort();
    return keys.flatMap((k) => differingFields(a[k], b[k], prefix ? `${prefix}.${k}` : k));
  }
  return JSON.stringify(a) === JSON.stringify(b) ? [] : [prefix || "(root)"];
}

const RESULTS = ["checkpoints", "tb", "metrics.jsonl", "config.json", "plan.json", "train.json", "tune.json", "calibration.json", "profile"];

/**
 * Makes `dir` ready for a run of `config`. With `fresh`, what an earlier run left is removed.
 * Otherwise an existing config.json must equal `config` (fields that only say where results go
 * are ignored): resuming a run under another config would mix two experiments.
 * Returns whether an earlier run's results are there to resume.
 */
export function prepareRunDir(dir: string, config: Record<string, unknown>, fresh: boolean, ignore: string[] = ["run.output_dir"]): boolean {
  mkdirSync(dir, { recursive: true });
  const cfgPath = join(dir, "config.json");
  if (fresh) {
    for (const name of RESULTS) rmSync(join(dir, name), { recursive: true, force: true });
  } else if (existsSync(cfgPath)) {
    let previous: unknown;
    try {
      previous = JSON.parse(readFileSync(cfgPath, "utf8"));
    } catch (e) {
      throw new RunDirError(`${cfgPath}: unreadable (${(e as Error).message}); rerun with --fresh to start over`);
    }
    const diff = differingFields(previous, config).filter((f) => !ignore.includes(f));
    if (diff.length) {
      throw new RunDirError(`${dir} holds a run with another config (differs in ${diff.join(", ")}); ` +
        `rerun with --fresh to start over there, or choose another --out`);
    }
  }
  const resuming = existsSync(join(dir, "checkpoints"));
  writeFileAtomic(cfgPath, JSON.stringify(config, null, 2) + "\n");
  return resuming;
}

/** metrics.jsonl: appended line by line as events arrive. */
export class MetricsLog {
  readonly path: string;
  constructor(dir: string) {
    this.path = join(dir, "metrics.jsonl");
  }

  /**
   * A run resumed from the checkpoint of step `step`: lines a killed run wrote for later steps
   * are dropped (the resumed run computes them again), so every step appears once.
   */
  truncateAfter(step: number): number {
    if (!existsSync(this.path)) return 0;
    const lines = readFileSync(this.path, "utf8").split("\n").filter((l) => l.trim());
    const keep = lines.filter((l) => {
      try {
        return (JSON.parse(l) as { step?: number }).step! <= step;
      } catch {
        return false; // a line cut short by a kill
      }
    });
    writeFileAtomic(this.path, keep.map((l) => l + "\n").join(""));
    return lines.length - keep.length;
  }

  /**
   * Appends a rank's `train_step` or `eval` metric event as a line (without the event's routing
   * fields); returns which it was, or null for any other event.
   */
  record(ev: Record<string, unknown>): "train" | "eval" | null {
    if (ev.kind !== "metric" || (ev.name !== "train_step" && ev.name !== "eval")) return null;
    const { rank: _r, kind: _k, name, steps: _s, arm: _a, seed: _sd, ...rest } = ev;
    const kind = name === "train_step" ? "train" : "eval";
    this.append({ kind, ...rest });
    return kind;
  }

  append(record: Record<string, unknown>): void {
    appendFileSync(this.path, JSON.stringify(record) + "\n");
  }

  read(): Array<Record<string, unknown>> {
    if (!existsSync(this.path)) return [];
    return readFileSync(this.path, "utf8").split("\n").filter((l) => l.trim()).map((l) => JSON.parse(l));
  }
}
