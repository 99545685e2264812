// `ampipe config show <file>`: prints the resolved config that is handed to Python.
import { Command } from "commander";
import { stringify } from "yaml";
import { ConfigError, loadConfig } from "../config/index.ts";

const collect = (v: string, acc: string[]) => [...acc, v];

export function register(program: Command): void {
  const config = program.command("config").description("inspect experiment configs");
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
        if (!(e instanceof ConfigError)) throw e;
        process.stderr.write(e.message + "\n");
        process.exitCode = 2;
      }
    });
}
