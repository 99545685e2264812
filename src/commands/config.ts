// `ampipe config show <file>`: prints the resolved config that is handed to Python.
// `ampipe config from-megatron -- <flags>` / `to-megatron <file>`: Megatron-LM flags to and
// from a config (src/config/megatron.ts).
import { writeFileSync } from "node:fs";
import { Command } from "commander";
import { stringify } from "yaml";
import { ConfigError, loadConfig } from "../config/index.ts";
import { configFromMegatron, megatronFromConfig, shellJoin } from "../config/megatron.ts";

const collect = (v: string, acc: string[]) => [...acc, v];

function handleConfigError(e: unknown): void {
  if (!(e instanceof ConfigError)) throw e;
  process.stderr.write(e.message + "\n");
  process.exitCode = 2;
}

export function register(program: Command): void {
  const config = program.command("config").description("inspect experiment configs; Megatron-LM flags to and from configs");
  config
    .command("show")
    .description("validate a YAML/JSON config and print it resolved (defaults filled, derived fields concrete)")
    .argument("<file>", "config file (.yaml, .yml or .json)")
    .option("--set <field=value>", "override a field, e.g. --set model.seq_length=512 (repeatable)", collect, [])
    .option("--json", "print JSON instead of YAML")
    .action((file: string, opts: { set: string[]; json?: boolean }) => {
      try {
        const cfg = loadConfig(file, opts.set);
        process.stdout.write(opts.json ? JSON.stringify(cfg, null, 2) + "\n" : stringify(cfg));
      } catch (e) {
        handleConfigError(e);
      }
    });
  config
    .command("from-megatron")
    .description("turn Megatron-LM pretrain_gpt.py flags (after --) into an ampipe config; warns about each flag it ignores")
    .argument("<flags...>", "Megatron-LM flags, after --, e.g. -- --num-layers 2 --hidden-size 128 ...")
    .showHelpAfterError("(the Megatron-LM flags go after --: ampipe config from-megatron -- --num-layers 2 ...)")
    .option("--set <field=value>", "override a field after the flags are read (repeatable)", collect, [])
    .option("--out <file>", "write the config here (YAML, or JSON for .json) instead of printing it")
    .option("--json", "print JSON instead of YAML")
    .action((flags: string[], opts: { set: string[]; out?: string; json?: boolean }) => {
      try {
        const { config: cfg, warnings } = configFromMegatron(flags, opts.set);
        for (const w of warnings) process.stderr.write(`warning: ${w}\n`);
        const json = opts.json || opts.out?.endsWith(".json");
        const text = json ? JSON.stringify(cfg, null, 2) + "\n" : stringify(cfg);
        if (opts.out) {
          writeFileSync(opts.out, text);
          process.stderr.write(`wrote ${opts.out}\n`);
        } else process.stdout.write(text);
      } catch (e) {
        handleConfigError(e);
      }
    });
  config
    .command("to-megatron")
    .description("print the Megatron-LM flags of a config (config -> flags -> config is the identity)")
    .argument("<file>", "config file (.yaml, .yml or .json)")
    .option("--set <field=value>", "override a field (repeatable)", collect, [])
    .option("--json", "print the flags as a JSON array")
    .action((file: string, opts: { set: string[]; json?: boolean }) => {
      try {
        const { flags, warnings } = megatronFromConfig(loadConfig(file, opts.set));
        for (const w of warnings) process.stderr.write(`warning: ${w}\n`);
        process.stdout.write((opts.json ? JSON.stringify(flags) : shellJoin(flags)) + "\n");
      } catch (e) {
        handleConfigError(e);
      }
    });
}
