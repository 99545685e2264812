// `ampipe plan <config> --out plan.json`: choose the pipe degree, variant and chunk boundaries for
// a config's block under the cost model (src/plan/for-config.ts), write the plan and its Chrome
// trace, and print the predicted timeline and the speed-up over the sequential block.
import { Command, Option } from "commander";
import { ConfigError, loadConfig, type ExperimentConfig } from "../config/index.ts";
import { configFromMegatron } from "../config/megatron.ts";
import { PROFILES } from "../plan/costs.ts";
import { planForConfig, type PlanForConfigResult } from "../plan/for-config.ts";
import { VARIANTS, type Variant } from "../plan/ir.ts";

export interface PlanCommandOptions {
  set?: string[];
  /** The config comes from these Megatron-LM flags (the config path is then unused). */
  fromMegatron?: boolean;
  out?: string;
  trace?: string | false;
  calibration?: string;
  variant?: string;
  degree?: string;
  profile?: string;
  granularity?: string;
  bandwidthGbps?: string;
  latencyUs?: string;
  overlapSlowdown?: string;
  json?: boolean;
}

const num = (flag: string, v: string | undefined, check: (x: number) => boolean, rule: string): number | undefined => {
  if (v === undefined) return undefined;
  const x = Number(v);
  if (!Number.isFinite(x) || !check(x)) throw new Error(`${flag}: ${rule}, got "${v}"`);
  return x;
};

/** `ampipe plan`'s options as given (strings), checked and handed to `planForConfig`. */
export function runPlan(source: string | ExperimentConfig, o: PlanCommandOptions): PlanForConfigResult {
  const cfg = typeof source === "string" ? loadConfig(source, o.set ?? []) : source;
  if (o.variant !== undefined && o.variant !== "auto" && !VARIANTS.includes(o.variant as Variant))
    throw new Error(`--variant: must be one of ${[...VARIANTS, "auto"].join(", ")}, got "${o.variant}"`);
  const seq = cfg.model.seq_length;
  const degree = o.degree === undefined || o.degree === "auto" ? o.degree
    : num("--degree", o.degree, (x) => Number.isInteger(x) && x >= 1 && x <= seq, `must be "auto" or an integer in [1, ${seq}]`);
  return planForConfig(cfg, {
    out: o.out, trace: o.trace, calibration: o.calibration, variant: o.variant as Variant | "auto" | undefined, degree,
    profile: o.profile,
    bandwidthGbps: num("--bandwidth-gbps", o.bandwidthGbps, (x) => x > 0, "must be > 0"),
    latencyUs: num("--latency-us", o.latencyUs, (x) => x >= 0, "must be >= 0"),
    overlapSlowdown: num("--overlap-slowdown", o.overlapSlowdown, (x) => x >= 1, "must be >= 1"),
    granularity: num("--granularity", o.granularity, (x) => Number.isInteger(x) && x >= 1, "must be a positive integer"),
  });
}

export function register(program: Command): void {
  program
    .command("plan")
    .description("choose pipe degree, variant and chunk boundaries under the cost model; write the plan and its trace")
    .argument("[config]", "experiment config (.yaml, .yml or .json); with --from-megatron, the flags after --")
    .argument("[flags...]")
    .option("--from-megatron", "read the block from Megatron-LM flags given after -- instead of a config file")
    .option("--out <file>", "where to write the plan (default: <run.output_dir>/plan.json)")
    .option("--trace <file>", "where to write the Chrome trace (default: the plan path with .trace.json)")
    .option("--no-trace", "do not write a trace")
    .option("--calibration <file>", "measured op times to fit the cost model to (docs/plan.md)")
    .option("--variant <variant>", "sequential | grouped | interleaved | moe-overlap (the peer baseline) | auto (default: pipeline.variant)")
    .option("--degree <P>", "pipe degree or auto (default: pipeline.degree)")
    .addOption(new Option("--profile <name>", "device profile for the default costs (default: h100 on cuda, else cpu)").choices(Object.keys(PROFILES)))
    .option("--granularity <tokens>", "interior chunk boundaries are multiples of this (default: 64 on GPU profiles, 8 on cpu)")
    .option("--bandwidth-gbps <x>", "interconnect bandwidth per rank in GB/s, 1e9 bytes/s (default: pipeline.emulated_comm or the profile's)")
    .option("--latency-us <x>", "interconnect latency (default: pipeline.emulated_comm or the profile's)")
    .option("--overlap-slowdown <x>", "compute/comm slowdown factor while both run (default: profile or calibration)")
    .option("--set <field=value>", "override a config field, e.g. --set model.seq_length=4096 (repeatable)", (v: string, acc: string[]) => [...acc, v], [])
    .option("--json", "print a JSON summary instead of the text report")
    .action((config: string | undefined, flags: string[], opts: PlanCommandOptions) => {
      try {
        let source: string | ExperimentConfig;
        if (opts.fromMegatron) {
          const argv = [...(config !== undefined ? [config] : []), ...flags];
          if (!argv.length) throw new Error("--from-megatron: give the Megatron-LM flags after --");
          const r = configFromMegatron(argv, opts.set ?? []);
          for (const w of r.warnings) process.stderr.write(`warning: ${w}\n`);
          source = r.config;
        } else {
          if (config === undefined) throw new Error("missing the config argument (or use --from-megatron -- <flags>)");
          if (flags.length) throw new Error(`unexpected argument(s) after the config: ${flags.join(" ")}`);
          source = config;
        }
        const r = runPlan(source, opts);
        process.stdout.write(opts.json ? JSON.stringify(r.summary, null, 2) + "\n" : r.text);
      } catch (e) {
        process.stderr.write(`${e instanceof ConfigError ? "" : "ampipe plan: "}${(e as Error).message}\n`);
        process.exitCode = 2;
      }
    });
}
