// `ampipe doctor`: is everything ampipe needs here? Node and the Python side (through
// pythonia: torch, pyzmq, devices, backends, kernels). Each line says OK, or what is wrong
// and how to fix it; the exit code is non-zero when something required is missing.
import { spawnSync } from "node:child_process";
import { join } from "node:path";
import { Command } from "commander";
import { pythonChoice, pythonEnv, repoRoot } from "../python.ts";

export interface Check { name: string; ok: boolean; required: boolean; value: string; fix: string | null }

const MIN_NODE = 20;

/** Runs every check. Never throws: a broken install is a report. */
export async function runChecks(): Promise<Check[]> {
  const checks: Check[] = [];
  const nodeMajor = Number(process.versions.node.split(".")[0]);
  checks.push({
    name: "node", ok: nodeMajor >= MIN_NODE, required: true, value: `${process.versions.node} at ${process.execPath}`,
    fix: nodeMajor >= MIN_NODE ? null : `install Node.js >= ${MIN_NODE}`,
  });

  const py = pythonChoice();
  const where = py.source === "AMPIPE_PYTHON" ? "AMPIPE_PYTHON" : "the repository's .venv";
  const setupFix = py.source === "AMPIPE_PYTHON"
    ? "point AMPIPE_PYTHON at a Python >= 3.10, or unset it to use .venv"
    : "run `npm start` or `npm test` once (they create .venv), or set AMPIPE_PYTHON";
  // A plain subprocess first: pythonia cannot report a Python that does not start.
  const r = spawnSync(py.path, ["-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"], { encoding: "utf8", timeout: 30_000 });
  if (r.error || r.status !== 0) {
    const why = r.error ? (r.error as NodeJS.ErrnoException).code === "ENOENT" ? "not found" : r.error.message : r.stderr.trim().split("\n").pop();
    checks.push({ name: "python", ok: false, required: true, value: `${py.path} (from ${where}): ${why}`, fix: setupFix });
    return checks;
  }
  const [maj, min] = r.stdout.trim().split(".").map(Number);
  if (maj < 3 || (maj === 3 && min < 8)) {
    // too old even for the probe
    checks.push({ name: "python", ok: false, required: true, value: `${r.stdout.trim()} at ${py.path} (from ${where}), older than 3.10`, fix: setupFix });
    return checks;
  }

  try {
    checks.push(...(await probeThroughPythonia(py.path)));
  } catch (e) {
    const err = e as Error;
    checks.push({
      name: "python probe", ok: false, required: true,
      value: `pythonia could not run ${py.path}: ${err.message || err.stack?.split("\n").slice(-3).join(" ") || String(e)}`,
      fix: setupFix,
    });
  }
  return checks;
}

async function probeThroughPythonia(pythonBin: string): Promise<Check[]> {
  // pythonia starts PYTHON_BIN when it is first imported: set it (and PYTHONPATH) before.
  process.env.PYTHON_BIN = pythonBin;
  process.env.PYTHONPATH = pythonEnv().PYTHONPATH;
  const { python } = await import("pythonia");
  try {
    const probe = await python(join(repoRoot, "py", "ampipe", "env_probe.py"));
    const text: string = await probe.probe_json();
    return JSON.parse(text) as Check[];
  } finally {
    python.exit();
  }
}

export function formatChecks(checks: Check[]): string {
  const width = Math.max(...checks.map((c) => c.name.length));
  return checks
    .map((c) => {
      const tag = c.ok ? "OK  " : c.required ? "FAIL" : "WARN";
      return `${tag} ${c.name.padEnd(width)}  ${c.value}` + (c.fix ? `\n     ${"".padEnd(width)}  fix: ${c.fix}` : "");
    })
    .join("\n");
}

export function register(program: Command): void {
  program
    .command("doctor")
    .description("check Node, Python, torch, pyzmq, CUDA devices, gloo/NCCL and the active kernels")
    .option("--json", "print the checks as JSON")
    .action(async (o: { json?: boolean }) => {
      const checks = await runChecks();
      const missing = checks.filter((c) => c.required && !c.ok);
      if (o.json) {
        console.log(JSON.stringify({ ok: missing.length === 0, checks }, null, 2));
      } else {
        console.log(formatChecks(checks));
        console.log(missing.length ? `\n${missing.length} required check(s) failed: ${missing.map((c) => c.name).join(", ")}` : "\nall required checks passed");
      }
      process.exitCode = missing.length ? 1 : 0;
    });
}
