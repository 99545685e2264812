#!/usr/bin/env node
// Runs every test: vitest (TypeScript) then pytest (Python). Both always run;
// the exit code is non-zero when either failed.
import { spawnSync } from "node:child_process";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const extra = process.argv.slice(2);

function step(name, cmd, args) {
  console.log(`\n=== ${name}: ${cmd} ${args.join(" ")}`);
  const r = spawnSync(cmd, args, { cwd: root, stdio: "inherit", env: process.env });
  return r.status ?? 1;
}

const vitest = step("vitest", join(root, "node_modules", ".bin", "vitest"), ["run", ...extra]);
const pytest = step("pytest", join(root, ".venv", "bin", "python"), ["-m", "pytest", "test/py", "-q", "--durations=10"]);
console.log(`\n=== summary: vitest ${vitest === 0 ? "passed" : `FAILED (exit ${vitest})`}, ` +
  `pytest ${pytest === 0 ? "passed" : `FAILED (exit ${pytest})`}`);
process.exit(vitest !== 0 || pytest !== 0 ? 1 : 0);
