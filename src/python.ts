// Which Python runs ranks and probes: $AMPIPE_PYTHON, else the repository's .venv.
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

/** The repository root (the folder holding package.json). */
export const repoRoot = join(dirname(fileURLToPath(import.meta.url)), "..");

export interface PythonChoice {
  path: string;
  /** Where the choice came from, for messages. */
  source: "AMPIPE_PYTHON" | ".venv";
}

export function pythonChoice(): PythonChoice {
  const env = process.env.AMPIPE_PYTHON;
  if (env) return { path: env, source: "AMPIPE_PYTHON" };
  return { path: join(repoRoot, ".venv", "bin", "python"), source: ".venv" };
}

export function pythonPath(): string {
  return pythonChoice().path;
}

/** The environment a Python child needs to import `ampipe` from this checkout. */
export function pythonEnv(base: NodeJS.ProcessEnv = process.env): NodeJS.ProcessEnv {
  const pyDir = join(repoRoot, "py");
  const pp = base.PYTHONPATH ? `${pyDir}:${base.PYTHONPATH}` : pyDir;
  return { ...base, PYTHONPATH: pp, PYTHONUNBUFFERED: "1" };
}
