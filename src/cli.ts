// The `ampipe` command line. Each command lives in src/commands/<name>.ts and exports
// `register(program)`; this file only wires them together.
import { Command } from "commander";

// A reader that goes away (`ampipe bench ... | head`) ends the command quietly, as SIGPIPE ends
// other tools: exit 141 (128 + SIGPIPE), no stack trace. Local ranks die with the controller,
// external ones see it gone; what a run wrote stays, and rerunning resumes.
for (const stream of [process.stdout, process.stderr]) {
  stream.on("error", (e: NodeJS.ErrnoException) => {
    if (e.code !== "EPIPE") throw e;
    process.exit(141);
  });
}

const program = new Command("ampipe")
  .description("AMPipe: intra-block pipelining of attention and the MoE all-to-all")
  .version("0.1.0")
  .showHelpAfterError()
  // Each command parses its own options in order, so a command with subcommands (bench) can give
  // the options after a subcommand's name to that subcommand (`bench train <config> --out DIR`).
  .enablePositionalOptions();

const commandModules: Array<{ register(program: Command): void }> = [
  // one line per command module, e.g. await import("./commands/ping.ts"),
  await import("./commands/config.ts"),
  await import("./commands/ping.ts"),
  await import("./commands/doctor.ts"),
  await import("./commands/bench.ts"),
  await import("./commands/plan.ts"),
  await import("./commands/run.ts"),
  await import("./commands/data.ts"),
  await import("./commands/train.ts"),
  await import("./commands/compare.ts"),
  await import("./commands/report.ts"),
];
for (const m of commandModules) m.register(program);

await program.parseAsync(process.argv);
