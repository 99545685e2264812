// Shared by the bridge tests: quiet launches and a process-table check for leftovers.
import { launchRanks, type LaunchOptions, type RankRun } from "../../../src/bridge/index.ts";
import { processesWithEnv } from "../processes.ts";

/** Fast heartbeats; the deadline is generous so a loaded CI machine does not fail a healthy rank. */
export const FAST = { heartbeatIntervalMs: 100, heartbeatTimeoutMs: 5000 } as const;
/** For the tests that wait for the deadline on purpose. */
export const SHORT_DEADLINE = { heartbeatIntervalMs: 100, heartbeatTimeoutMs: 1500 } as const;

export async function launchQuiet(o: Partial<LaunchOptions> & { worldSize: number }): Promise<RankRun & { output: string[] }> {
  const output: string[] = [];
  const run = await launchRanks({
    ...FAST, threads: 1, graceMs: 2000,
    onOutput: (rank, stream, line) => output.push(`[rank ${rank} ${stream}] ${line}`),
    ...o,
  });
  return Object.assign(run, { output });
}

/** Live processes (not zombies) whose environment carries this run's token. */
export function processesOfRun(token: string): number[] {
  return processesWithEnv(`AMPIPE_TOKEN=${token}`);
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
