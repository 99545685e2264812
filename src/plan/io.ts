// Reading and writing plan files. Plans are written with one op per line so that they diff well.
import { closeSync, fsyncSync, mkdirSync, openSync, readFileSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { dirname } from "node:path";
import { validatePlan } from "./check.ts";
import type { Plan } from "./ir.ts";

/** Serialises a plan: two-space indentation, each op and stream on a single line, trailing newline. */
export function planToJson(plan: Plan): string {
  const lines: string[] = ["{"];
  const entries = Object.entries(plan).filter(([, v]) => v !== undefined);
  entries.forEach(([k, v], i) => {
    const comma = i < entries.length - 1 ? "," : "";
    if (Array.isArray(v) && v.length > 0 && typeof v[0] === "object") {
      lines.push(`  ${JSON.stringify(k)}: [`);
      v.forEach((item, j) => lines.push(`    ${JSON.stringify(item)}${j < v.length - 1 ? "," : ""}`));
      lines.push(`  ]${comma}`);
    } else if (k === "dims" || Array.isArray(v)) {
      lines.push(`  ${JSON.stringify(k)}: ${JSON.stringify(v)}${comma}`);
    } else {
      const body = JSON.stringify(v, null, 2).replace(/\n/g, "\n  ");
      lines.push(`  ${JSON.stringify(k)}: ${body}${comma}`);
    }
  });
  lines.push("}");
  return lines.join("\n") + "\n";
}

/** Reads and fully validates a plan file; errors name the file and the offending op or field. */
export function readPlan(path: string): Plan {
  let value: unknown;
  try {
    value = JSON.parse(readFileSync(path, "utf8"));
  } catch (e) {
    throw new Error(`${path}: cannot read plan: ${(e as Error).message}`);
  }
  try {
    return validatePlan(value);
  } catch (e) {
    throw new Error(`${path}: ${(e as Error).message}`);
  }
}

/**
 * Writes a file whole or not at all, creating its folder: a reader never sees half a plan, and
 * an interrupted run (or a crash of the machine) leaves the old file. As Python's
 * `ampipe.atomic`: a temporary file in the same folder, fsynced, renamed over the target, then
 * the folder fsynced so that the rename itself is on disk. A failure removes the temporary file.
 */
export function writeFileAtomic(path: string, text: string): void {
  const dir = dirname(path);
  mkdirSync(dir, { recursive: true });
  const tmp = `${path}.tmp-${process.pid}`;
  try {
    const fd = openSync(tmp, "w");
    try {
      writeFileSync(fd, text);
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
    renameSync(tmp, path);
  } catch (e) {
    rmSync(tmp, { force: true });
    throw e;
  }
  fsyncDir(dir);
}

/** fsync of a folder (where the platform allows opening one: not on Windows). */
export function fsyncDir(dir: string): void {
  let fd: number;
  try {
    fd = openSync(dir, "r");
  } catch {
    return;
  }
  try {
    fsyncSync(fd);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== "EISDIR" && (e as NodeJS.ErrnoException).code !== "EINVAL") throw e;
  } finally {
    closeSync(fd);
  }
}

export function writePlan(path: string, plan: Plan): void {
  writeFileAtomic(path, planToJson(plan));
}
