// `ampipe bench <name>`: benchmarks. Each one lives in src/bench/<name>.ts and exports
// `register(bench: Command)`; this module finds them, so adding a benchmark touches no
// shared file.
import { readdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import type { Command } from "commander";

const benchDir = join(dirname(fileURLToPath(import.meta.url)), "..", "bench");
const modules: Array<{ name: string; register(bench: Command): void }> = [];
for (const file of readdirSync(benchDir).filter((f) => f.endsWith(".ts") && !f.endsWith(".d.ts")).sort()) {
  const m = (await import(pathToFileURL(join(benchDir, file)).href)) as { register?: (bench: Command) => void };
  if (typeof m.register === "function") modules.push({ name: file, register: m.register });
}

export function register(program: Command): void {
  const bench = program
    .command("bench")
    .description("benchmarks (speed is shown here, never by tests)");
  for (const m of modules) m.register(bench);
}
