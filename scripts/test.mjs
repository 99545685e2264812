#!/usr/bin/env node
// Runs every test: vitest (TypeScript), pytest (Python), then the README's other command,
// `npm start` (the main job on configs/default.yaml; set-up has just run, so it starts at once).
// All three always run; the exit code is non-zero when any failed. The main job runs last so that
// it competes with no timing-sensitive test; .ci/run then checks that set-up, tests and the main
// job left a clean clone's tree unchanged.
import { spawnSync } from "node:child_process";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const extra = process.argv.slice(2);

function step(name, cmd, args, timeoutMs = undefined) {
  console.log(`\n=== ${name}: ${cmd} ${args.join(" ")}`);
  const r = spawnSync(cmd, args, { cwd: root, stdio: "inherit", env: process.env, timeout: timeoutMs });
  if (r.error) console.log(`=== ${name}: ${r.error.message}`);
  return r.status ?? 1;
}

const verdict = (code) => (code === 0 ? "passed" : `FAILED (exit ${code})`);

const vitest = step("vitest", join(root, "node_modules", ".bin", "vitest"), ["run", ...extra]);
const pytest = step("pytest", join(root, ".venv", "bin", "python"), ["-m", "pytest", "test/py", "-q", "--durations=10"]);
// The main job takes about half a minute here; ten minutes means it hung.
const start = step("npm start", "npm", ["start"], 600_000);
console.log(`\n=== summary: vitest ${verdict(vitest)}, pytest ${verdict(pytest)}, npm start ${verdict(start)}`);
process.exit(vitest !== 0 || pytest !== 0 || start !== 0 ? 1 : 0);
