// What the commands share on the command line: option parsers, the controller's and the ranks'
// options, the tuning options of the block choice, and how a run's failure is printed.
import { Command, InvalidArgumentError, Option } from "commander";
import { BridgeError, CommandError, RankFailure, ResultError, RunClosedError } from "../bridge/index.ts";
import type { ControllerStartOptions, StartOptions } from "../bridge/start.ts";
import { ConfigError, loadConfig } from "../config/index.ts";

export function positiveInt(v: string): number {
  const n = Number(v);
  if (!Number.isInteger(n) || n < 1) throw new InvalidArgumentError("expected a positive integer");
  return n;
}
export function positiveNumber(v: string): number {
  const n = Number(v);
  if (!Number.isFinite(n) || n <= 0) throw new InvalidArgumentError("expected a positive number");
  return n;
}
export function nonNegative(v: string): number {
  const n = Number(v);
  if (!Number.isFinite(n) || n < 0) throw new InvalidArgumentError("expected a number >= 0");
  return n;
}

/** The options of a command that starts ranks (ping): how many, where, and the controller's. */
export type RunCliOptions = StartOptions;
/** The controller options of a command whose ranks come from the config's parallelism section. */
export type ControllerCliOptions = ControllerStartOptions;

/**
 * How long a rank's collective may wait for its peers before torch.distributed fails it, per
 * command (instead of gloo's 300 s): long enough for the work between two collectives (a ping
 * has none; a block comparison a step; training a checkpoint write and an evaluation), and
 * longer than the default heartbeat deadline (60 s), so that a hung rank is reported by name
 * first. A peer that dies ends its peers' collectives at once (its connections close), and a
 * failed run's ranks leave when the controller ends it; this is the last guard.
 */
export const COLLECTIVE_TIMEOUT_S: Record<string, number> = { ping: 30, run: 120, bench: 120, train: 180, compare: 180 };

/** The controller's options, shared by the commands that launch ranks (ping, run). */
export function addControllerOptions(cmd: Command): Command {
  return cmd
    .option("--bind <endpoint>", "controller endpoint to bind", "tcp://127.0.0.1:0")
    .option("--allow-remote", "allow binding a non-loopback address (needed for ranks on other machines)")
    .option("--external", "do not spawn ranks: wait for ranks started by torchrun/Slurm to connect")
    .option("--heartbeat-interval <ms>", "application heartbeat interval", positiveNumber, 1000)
    .option("--heartbeat-timeout <ms>", "a rank silent this long is reported as stuck", positiveNumber, 60_000)
    .option("--join-timeout <s>", "seconds to wait for all ranks to join", positiveNumber, 120)
    .option("--collective-timeout <s>", "seconds a rank's collective may wait for its peers (torch.distributed timeout)",
      positiveNumber, COLLECTIVE_TIMEOUT_S[cmd.name()] ?? 120);
}

/** The ranks' options (count, device, backend, or --config), then the controller's: for commands not given a config (ping). */
export function addRunOptions(cmd: Command): Command {
  return addControllerOptions(cmd
    .option("--ranks <n>", "number of ranks (world size)", positiveInt, 2)
    .addOption(new Option("--device <device>", "device of the ranks").choices(["cpu", "cuda", "auto"]).default("cpu"))
    .addOption(new Option("--backend <backend>", "torch.distributed backend (auto: gloo on cpu, nccl on cuda)")
      .choices(["gloo", "nccl", "auto"]).default("auto")))
    .option("--config <file>", "take --ranks/--device/--backend from this experiment config's parallelism section")
    .hook("preAction", (c) => {
      // Options given on the command line win over the config file.
      const file = c.getOptionValue("config") as string | undefined;
      if (!file) return;
      let p;
      try {
        p = loadConfig(file).parallelism;
      } catch (e) {
        if (e instanceof ConfigError) c.error(e.message, { exitCode: 2, code: "ampipe.config" });
        throw e;
      }
      const fromConfig: Record<string, unknown> = { ranks: p.world_size, device: p.device, backend: p.backend };
      for (const [k, v] of Object.entries(fromConfig)) {
        if (c.getOptionValueSource(k) === "default") c.setOptionValueWithSource(k, v, "config");
      }
    });
}

/** The options that steer the block choice (src/train/choose.ts), for `ampipe train` and `ampipe compare`. */
export function addTuneOptions(cmd: Command): Command {
  return cmd
    .option("--no-tune", "with pipeline.degree auto: take the cost model's plan without timing candidates in training steps")
    .option("--tune-steps <n>", "measured training steps per candidate block when timing them (default 4)", positiveInt)
    .option("--tune-candidates <n>", "planned candidates timed against the baseline (default 3)", positiveInt);
}

/** Prints a run failure, command error or mistyped result (as `prog: message`) and sets a non-zero exit code. */
export function reportFailure(e: unknown, prog = "ampipe"): void {
  if (e instanceof RunClosedError) {
    process.exitCode ||= 1;
    return; // closed on purpose (SIGINT/SIGTERM): closeOnSignals reports it and sets the exit code
  }
  if (e instanceof RankFailure || e instanceof CommandError || e instanceof BridgeError || e instanceof ResultError) {
    process.stderr.write(`${prog}: ${e.message}\n`);
    process.exitCode = 1;
    return;
  }
  throw e;
}
