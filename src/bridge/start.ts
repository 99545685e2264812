// Starting the ranks of a run from a command's options: spawned here, or external ones (torchrun,
// Slurm) told how to join. Every command that launches ranks starts them through `startRun`.
import type { ParallelismConfig } from "../config/index.ts";
import { attachRanks, launchRanks, type RankRun, type RunOptions } from "./run.ts";

/** Where the ranks come from and how the controller watches them (the commands' options). */
export interface StartOptions {
  ranks: number; device: "cpu" | "cuda" | "auto"; backend: "gloo" | "nccl" | "auto"; bind: string;
  allowRemote?: boolean; external?: boolean; heartbeatInterval: number; heartbeatTimeout: number; joinTimeout: number;
  /** Seconds a rank's collective may wait for its peers (torch.distributed's timeout). */
  collectiveTimeout?: number;
}

/** The controller's part of `StartOptions`, for commands whose ranks come from a config. */
export type ControllerStartOptions = Pick<StartOptions, "bind" | "allowRemote" | "external" | "heartbeatInterval" | "heartbeatTimeout" | "joinTimeout" | "collectiveTimeout">;

/** `startRun` for the config's ranks (world size, device, backend) with the command's controller options. */
export function startConfigRun(par: ParallelismConfig, o: ControllerStartOptions, extra: Partial<RunOptions> = {}): Promise<RankRun> {
  return startRun({
    ranks: par.world_size, device: par.device, backend: par.backend, bind: o.bind, allowRemote: o.allowRemote, external: o.external,
    heartbeatInterval: o.heartbeatInterval, heartbeatTimeout: o.heartbeatTimeout, joinTimeout: o.joinTimeout,
    collectiveTimeout: o.collectiveTimeout,
  }, extra);
}

/** Starts the ranks the options describe (spawned, or external: how to start them goes to stderr). */
export async function startRun(o: StartOptions, extra: Partial<RunOptions> = {}): Promise<RankRun> {
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
