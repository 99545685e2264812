// `ampipe ping --ranks N`: every rank initialises torch.distributed, runs an all_reduce and
// an all_to_all_single and checks them; the controller prints the results with the round trip.
import { Command, InvalidArgumentError, Option } from "commander";
import {
  attachRanks, BridgeError, closeOnSignals, CommandError, launchRanks, RankFailure, RunClosedError, type RankRun, type RunOptions,
} from "../bridge/index.ts";
import { ConfigError, loadConfig, type ParallelismConfig } from "../config/index.ts";

interface PingResult {
  rank: number; pid: number; host: string; backend: string; device: string;
  all_reduce: { ok: boolean; value: number; expected: number; seconds: number };
  all_to_all: { ok: boolean; received: number[]; expected: number[]; seconds: number };
}

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

export interface RunCliOptions {
  ranks: number; device: "cpu" | "cuda" | "auto"; backend: "gloo" | "nccl" | "auto"; bind: string;
  allowRemote?: boolean; external?: boolean; heartbeatInterval: number; heartbeatTimeout: number; joinTimeout: number;
  collectiveTimeout?: number;
}

/** The controller options of a command whose ranks come from the config's parallelism section. */
export type ControllerCliOptions = Pick<RunCliOptions, "bind" | "allowRemote" | "external" | "heartbeatInterval" | "heartbeatTimeout" | "joinTimeout" | "collectiveTimeout">;

/** `startRun` for the config's ranks (world size, device, backend) with the command's controller options. */
export function startConfigRun(par: ParallelismConfig, o: ControllerCliOptions, extra: Partial<RunOptions> = {}): Promise<RankRun> {
  return startRun({
    ranks: par.world_size, device: par.device, backend: par.backend, bind: o.bind, allowRemote: o.allowRemote, external: o.external,
    heartbeatInterval: o.heartbeatInterval, heartbeatTimeout: o.heartbeatTimeout, joinTimeout: o.joinTimeout,
    collectiveTimeout: o.collectiveTimeout,
  }, extra);
}

/** Starts the ranks the options describe (spawned, or external) and prints what a user needs. */
export async function startRun(o: RunCliOptions, extra: Partial<RunOptions> = {}): Promise<RankRun> {
  const common: RunOptions = {
    worldSize: o.ranks, device: o.device, backend: o.backend, bind: o.bind, allowRemote: o.allowRemote,
    heartbeatIntervalMs: o.heartbeatInterval, heartbeatTimeoutMs: o.heartbeatTimeout,
    joinTimeoutMs: o.joinTimeout * 1000, distTimeoutS: o.collectiveTimeout,
    onProtocolError: (src, msg) => process.stderr.write(`ampipe: rejected a message from ${src}: ${msg}\n`),
    ...extra,
  };
  if (!o.external) return launchRanks(common);
  return attachRanks({
    ...common,
    onListening: (endpoint, token) => {
      process.stderr.write(
        `ampipe: waiting for ${o.ranks} ranks at ${endpoint}; start them with\n` +
        `  AMPIPE_TOKEN=${token} python -m torch.distributed.run --standalone --nproc-per-node ${o.ranks} ` +
        `-m ampipe.worker --controller ${endpoint.replace("0.0.0.0", "<this host>")}\n` +
        `(several machines: replace --standalone with torchrun's --nnodes/--rdzv-* options)\n`);
    },
  });
}

/** Prints a run failure or command error (as `prog: message`) and sets a non-zero exit code. */
export function reportFailure(e: unknown, prog = "ampipe"): void {
  if (e instanceof RunClosedError) {
    process.exitCode ||= 1;
    return; // closed on purpose (SIGINT/SIGTERM): closeOnSignals reports it and sets the exit code
  }
  if (e instanceof RankFailure || e instanceof CommandError || e instanceof BridgeError) {
    process.stderr.write(`${prog}: ${e.message}\n`);
    process.exitCode = 1;
    return;
  }
  throw e;
}

function checkPing(results: PingResult[], worldSize: number): string[] {
  const problems: string[] = [];
  results.forEach((r, i) => {
    if (r.rank !== i) problems.push(`rank ${i} answered as rank ${r.rank}`);
    if (!r.all_reduce.ok) problems.push(`rank ${i}: all_reduce gave ${r.all_reduce.value}, expected ${r.all_reduce.expected}`);
    if (!r.all_to_all.ok) {
      problems.push(`rank ${i}: all_to_all_single received [${r.all_to_all.received}], expected [${r.all_to_all.expected}]`);
    }
  });
  if (results.length !== worldSize) problems.push(`${results.length} of ${worldSize} ranks answered`);
  return problems;
}

export function register(program: Command): void {
  addRunOptions(program.command("ping"))
    .description("check the ranks and torch.distributed: all_reduce + all_to_all_single on every rank")
    .option("--seconds <s>", "keep pinging for this long (try faults by hand meanwhile)", nonNegative, 0)
    .option("--json", "print one JSON object per round")
    .action(async (o: RunCliOptions & { seconds: number; json?: boolean }) => {
      let run: RankRun | undefined;
      try {
        const t0 = performance.now();
        run = await startRun(o);
        const startup = performance.now() - t0;
        closeOnSignals(run);
        const r0 = run.ranks[0];
        if (!o.json) {
          console.log(`${run.worldSize} ranks ready in ${(startup / 1000).toFixed(2)} s ` +
            `(torch ${r0.torch}, ${r0.backend} on ${r0.device}; controller ${run.controller.endpoint})`);
        }
        const end = Date.now() + o.seconds * 1000;
        let seq = 0;
        let failed = false;
        do {
          const t = performance.now();
          const results = (await run.broadcast("ping", { seq })) as PingResult[];
          const rttMs = performance.now() - t;
          const problems = checkPing(results, run.worldSize);
          if (o.json) {
            console.log(JSON.stringify({ seq, rtt_ms: rttMs, ok: problems.length === 0, problems, results }));
          } else {
            const okIf = (op: "all_reduce" | "all_to_all") => (results.every((r) => r[op].ok) ? "ok" : "FAILED");
            console.log(`ping ${seq}: all_reduce ${okIf("all_reduce")} (sum ${results[0].all_reduce.value}), ` +
              `all_to_all_single ${okIf("all_to_all")}, round trip ${rttMs.toFixed(2)} ms ` +
              `(slowest rank: all_reduce ${ms(results, "all_reduce")} ms, all_to_all ${ms(results, "all_to_all")} ms)`);
            for (const p of problems) console.log(`  ${p}`);
          }
          if (problems.length) failed = true;
          seq++;
          if (Date.now() < end) await new Promise((r) => setTimeout(r, 200));
        } while (Date.now() < end && !failed);
        if (failed) process.exitCode = 1;
      } catch (e) {
        reportFailure(e);
      } finally {
        await run?.close();
      }
    });
}

function ms(results: PingResult[], op: "all_reduce" | "all_to_all"): string {
  return (Math.max(...results.map((r) => r[op].seconds)) * 1000).toFixed(2);
}
