// `ampipe bench <config>`: the experiment sweep (src/sweep/, docs/bench.md); `ampipe bench <name>`:
// the other benchmarks. Each of those lives in src/bench/<name>.ts and exports
// `register(bench: Command)`; this module finds them, so adding a benchmark touches no
// shared file.
import { readdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { InvalidArgumentError, type Command } from "commander";
import { benchCommand, type BenchOptions } from "../sweep/run.ts";
import { addControllerOptions } from "./ping.ts";

const benchDir = join(dirname(fileURLToPath(import.meta.url)), "..", "bench");
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
