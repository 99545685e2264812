// A run: a controller plus its ranks, local (spawned here) or external (torchrun, Slurm).
// This is the API other commands use:
//
//   const run = await launchRanks({ worldSize: 2 });
//   const results = await run.broadcast("ping", { seq: 0 });
//   await run.close();
//
// Any fault (a rank exits, hangs, disconnects, fails to start) fails every pending request
// with a RankFailure that names the rank, stops the other ranks and leaves no process behind.
import type { z } from "zod";
import { indent, RankFailure } from "./errors.ts";
import { checkResult } from "./results.ts";
import { Controller, type ControllerOptions, type RankEvent, type RankInfo } from "./controller.ts";
import { freePort, RankProcess } from "./launcher.ts";
import { pythonPath } from "../python.ts";

export interface RunOptions extends Omit<ControllerOptions, "dist" | "detectDisconnects" | "enrichFault"> {
  /** torch.distributed for the ranks (default true), on this device with this backend. */
  dist?: boolean;
  device?: "cpu" | "cuda" | "auto";
  backend?: "gloo" | "nccl" | "auto";
  distTimeoutS?: number;
  /** How long to wait for every rank to join (default 120 s). */
  joinTimeoutMs?: number;
  /** How long ranks get to exit after `shutdown` before they are killed (default 5 s). */
  graceMs?: number;
  onEvent?: (e: RankEvent) => void;
  onProtocolError?: (source: string, message: string) => void;
}

export interface LaunchOptions extends RunOptions {
  python?: string;
  threads?: number;
  env?: NodeJS.ProcessEnv;
  /** Each line a rank prints; default: stderr lines go to our stderr as `[rank N] ...`. */
  onOutput?: (rank: number, stream: "stdout" | "stderr", line: string) => void;
}

export class RankRun {
  readonly controller: Controller;
  readonly processes: RankProcess[];
  private teardownDone: Promise<void> | null = null;
  private failureListeners: Array<(f: RankFailure) => void> = [];
  private readonly graceMs: number;

  constructor(controller: Controller, processes: RankProcess[], graceMs: number) {
    this.controller = controller;
    this.processes = processes;
    this.graceMs = graceMs;
    controller.onFault((f) => {
      for (const fn of this.failureListeners) fn(f);
      void this.teardown(Math.min(this.graceMs, 500));
    });
  }

  get worldSize(): number { return this.controller.worldSize; }
  get ranks(): RankInfo[] { return this.controller.rankInfo(); }
  get failure(): RankFailure | null { return this.controller.failed as RankFailure | null; }
  /** True once close() (or a fault's teardown) has begun: ranks exiting then are not faults. */
  get closing(): boolean { return this.teardownDone !== null; }

  broadcast(name: string, args: Record<string, unknown> = {}): Promise<unknown[]> {
    return this.controller.broadcast(name, args);
  }
  request(rank: number, name: string, args: Record<string, unknown> = {}): Promise<unknown> {
    return this.controller.request(rank, name, args);
  }
  /** `request`, its result checked against the command's schema on receipt (`ResultError` names the field). */
  async call<S extends z.ZodType>(rank: number, name: string, args: Record<string, unknown>, schema: S): Promise<z.output<S>> {
    return checkResult(schema, await this.request(rank, name, args), name, rank);
  }
  /** `call` on every rank at once; the first failure (a rank's error, a result of the wrong shape) fails it. */
  callAll<S extends z.ZodType>(name: string, args: Record<string, unknown>, schema: S): Promise<Array<z.output<S>>> {
    return Promise.all([...Array(this.worldSize).keys()].map((r) => this.call(r, name, args, schema)));
  }
  /** `broadcast` (every rank's error collected), each result checked against the command's schema. */
  async broadcastAs<S extends z.ZodType>(name: string, args: Record<string, unknown>, schema: S): Promise<Array<z.output<S>>> {
    return (await this.broadcast(name, args)).map((v, rank) => checkResult(schema, v, name, rank));
  }
  onEvent(fn: (e: RankEvent) => void): () => void { return this.controller.onEvent(fn); }
  /** Asks the ranks' running commands to stop at their next safe point (see Controller.cancelCommands). */
  cancel(): void { this.controller.cancelCommands(); }
  onFailure(fn: (f: RankFailure) => void): void {
    if (this.failure) fn(this.failure);
    else this.failureListeners.push(fn);
  }

  /** Shuts the ranks down (graceful, then killed after graceMs) and closes the controller. */
  close(): Promise<void> {
    return this.teardown(this.graceMs);
  }

  private teardown(graceMs: number): Promise<void> {
    this.teardownDone ??= (async () => {
      // A failed run tells the ranks what was lost (an external rank prints it as it leaves).
      this.controller.shutdownRanks(this.failure?.message.split("\n")[0]);
      await this.controller.flush(Math.min(graceMs, 500));
      if (this.processes.length) {
        const all = Promise.all(this.processes.map((p) => p.exited));
        let timer: NodeJS.Timeout | undefined;
        await Promise.race([all, new Promise((r) => { timer = setTimeout(r, graceMs); })]);
        clearTimeout(timer);
        for (const p of this.processes) p.kill("SIGKILL");
        await all;
      }
      this.controller.close();
    })();
    return this.teardownDone;
  }
}

/** Spawns worldSize local ranks and waits until all of them are ready. */
export async function launchRanks(o: LaunchOptions): Promise<RankRun> {
  const processes: RankProcess[] = [];
  const describe = (f: RankFailure): RankFailure => {
    const p = processes[f.rank];
    if (!p) return f;
    const tail = p.stderrTail();
    const running = controller.pendingFor(f.rank);
    let msg = f.message;
    if (f.kind === "unresponsive") {
      const state = p.state();
      if (state) msg += `; its process is ${state}`;
    }
    if (running.length && f.kind !== "unresponsive") msg += ` while running '${running.join("', '")}'`;
    if (tail.length) msg += `\nlast stderr lines of rank ${f.rank}:\n${indent(tail.join("\n"))}`;
    if (f.details.traceback && !tail.some((l) => l.includes("Traceback"))) msg += `\n${indent(f.details.traceback.trimEnd())}`;
    return new RankFailure(msg, f.rank, f.kind, { ...f.details, pid: p.pid, stderr: tail, ...p.exit });
  };
  const controller = await startController(o, "cpu", { detectDisconnects: false, enrichFault: describe });
  const run = new RankRun(controller, processes, o.graceMs ?? 5000);
  const masterPort = await freePort();
  const onOutput = o.onOutput ?? ((rank, stream, line) => {
    if (stream === "stderr") process.stderr.write(`[rank ${rank}] ${line}\n`);
  });
  for (let rank = 0; rank < o.worldSize; rank++) {
    const p = new RankProcess({
      rank, worldSize: o.worldSize, controller: controller.endpoint, token: controller.token,
      masterAddr: "127.0.0.1", masterPort, python: o.python, threads: o.threads, env: o.env, onOutput,
    });
    processes.push(p);
    void p.exited.then(() => {
      if (run.failure) return;
      if (controller.failed || run.closing) return;
      const joined = controller.hasJoined(rank);
      const what = p.pid === undefined ? `could not be started (${o.python ?? pythonPath()})` : `(pid ${p.pid}) ${p.describeExit()}`;
      controller.fault(new RankFailure(
        `rank ${rank} ${what}` + (joined ? "" : " before joining the run; `ampipe doctor` checks the Python side"),
        rank, "exited"));
    });
  }
  return whenJoined(run, o.joinTimeoutMs ?? 120_000);
}

export interface AttachOptions extends RunOptions {
  /** Told the endpoint and token once the controller listens (print the torchrun line here). */
  onListening?: (endpoint: string, token: string) => void;
}

/** Binds a controller and waits for externally started ranks (torchrun, Slurm) to join. */
export async function attachRanks(o: AttachOptions): Promise<RankRun> {
  const controller = await startController(o, "auto", { detectDisconnects: true });
  o.onListening?.(controller.endpoint, controller.token);
  return whenJoined(new RankRun(controller, [], o.graceMs ?? 5000), o.joinTimeoutMs ?? 300_000);
}

/** A listening controller for a run's options; `device` is the ranks' device when none is given. */
async function startController(o: RunOptions, device: string, extra: Partial<ControllerOptions>): Promise<Controller> {
  const controller = new Controller({
    ...o,
    dist: o.dist === false ? null : { backend: o.backend ?? "auto", device: o.device ?? device, timeoutS: o.distTimeoutS },
    ...extra,
  });
  if (o.onEvent) controller.onEvent(o.onEvent);
  if (o.onProtocolError) controller.onProtocolError(o.onProtocolError);
  await controller.start();
  return controller;
}

/** Resolves once every rank is ready; a run whose ranks do not all join is closed first. */
async function whenJoined(run: RankRun, timeoutMs: number): Promise<RankRun> {
  try {
    await run.controller.waitForRanks(timeoutMs);
  } catch (e) {
    await run.close();
    throw e;
  }
  return run;
}

/** On SIGINT/SIGTERM: close the run (ranks shut down, none left behind), then exit 130/143. */
export function closeOnSignals(run: RankRun): () => void {
  const handler = (sig: NodeJS.Signals) => {
    process.stderr.write(`ampipe: ${sig}: stopping the ranks\n`);
    void run.close().finally(() => process.exit(sig === "SIGINT" ? 130 : 143));
  };
  process.once("SIGINT", handler);
  process.once("SIGTERM", handler);
  return () => {
    process.off("SIGINT", handler);
    process.off("SIGTERM", handler);
  };
}
