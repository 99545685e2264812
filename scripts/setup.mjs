#!/usr/bin/env node
// Provisions what `npm start` and `npm test` need, and nothing when nothing changed:
//   1. node modules        (stamp: hash of package.json + package-lock.json)
//   2. .venv with torch... (stamp: hash of py/requirements.txt + py/pyproject.toml)
//   3. the C++/CUDA extension in build/ext (its own build step decides whether to rebuild)
// Only Node built-ins are used here: this runs before node_modules exists.
import { createHash } from "node:crypto";
import { existsSync, readFileSync, writeFileSync, readdirSync, statSync } from "node:fs";
import { spawnSync } from "node:child_process";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const venv = join(root, ".venv");
const venvPython = join(venv, "bin", "python");

function hashFiles(files) {
  const h = createHash("sha256");
  for (const f of files) {
    const p = join(root, f);
    h.update(f + "\0" + (existsSync(p) ? readFileSync(p) : "") + "\0");
  }
  return h.digest("hex");
}

function run(cmd, args, what) {
  const r = spawnSync(cmd, args, { cwd: root, stdio: "inherit" });
  if (r.error || r.status !== 0) {
    const why = r.error ? r.error.message : `exit code ${r.status}`;
    console.error(`setup: ${what} failed (${cmd} ${args.join(" ")}: ${why})`);
    process.exit(1);
  }
}

function upToDate(stampFile, hash) {
  return existsSync(stampFile) && readFileSync(stampFile, "utf8") === hash;
}

// 1. node modules
{
  const stamp = join(root, "node_modules", ".ampipe-setup");
  const hash = hashFiles(["package.json", "package-lock.json"]);
  if (!upToDate(stamp, hash)) {
    // From the lock file, which `npm ci` never rewrites (`npm install` may: it once added an
    // optional Windows-only entry, leaving a fresh clone's tree dirty). A lock out of step with
    // package.json fails here, naming it, rather than being rewritten quietly.
    console.error("setup: installing node modules from package-lock.json (npm ci)");
    run("npm", ["ci", "--no-audit", "--no-fund"], "npm ci");
    writeFileSync(stamp, hash);
  }
}

// 2. Python virtual environment
{
  const stamp = join(venv, ".ampipe-setup");
  const hash = hashFiles(["py/requirements.txt", "py/pyproject.toml"]);
  if (!upToDate(stamp, hash)) {
    const python = process.env.AMPIPE_PYTHON ?? "python3";
    const probe = spawnSync(python, ["-c", "import sys; assert sys.version_info >= (3, 10), sys.version"]);
    if (probe.error || probe.status !== 0) {
      console.error(`setup: ${python} is missing or older than 3.10; install Python >= 3.10 or set AMPIPE_PYTHON`);
      process.exit(1);
    }
    if (!existsSync(venvPython)) {
      console.error("setup: creating .venv");
      run(python, ["-m", "venv", venv], "creating the virtual environment");
    }
    console.error("setup: installing Python requirements into .venv");
    run(venvPython, ["-m", "pip", "install", "-q", "-r", "py/requirements.txt"], "pip install -r py/requirements.txt");
    run(venvPython, ["-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", "py"], "pip install -e py");
    writeFileSync(stamp, hash);
  }
}

// 3. The compiled extension, once csrc/ has sources. A failed build is not fatal:
// ampipe falls back to the pure-torch reference and `ampipe doctor` says so.
{
  const hasSources = existsSync(join(root, "csrc")) &&
    readdirSync(join(root, "csrc"), { recursive: true })
      .some((f) => /\.(cpp|cu)$/.test(String(f)) && statSync(join(root, "csrc", String(f))).isFile());
  if (hasSources && existsSync(join(root, "py", "ampipe", "ops", "build.py"))) {
    const r = spawnSync(venvPython, ["-m", "ampipe.ops.build"], { cwd: root, stdio: "inherit" });
    if (r.status !== 0) {
      console.error("setup: WARNING: the ampipe extension did not build; the pure-torch reference ops will be used");
    }
  }
}
