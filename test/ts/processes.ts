// The process-table check the bridge and run tests share: which live processes carry an
// environment entry (the bridge's AMPIPE_TOKEN=..., the CLI's AMPIPE_PARENT_PID=...).
import { readdirSync, readFileSync } from "node:fs";

/** Pids of live processes (zombies excluded) whose environment holds `entry` ("NAME=value"). */
export function processesWithEnv(entry: string): number[] {
  const found: number[] = [];
  for (const d of readdirSync("/proc")) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const env = readFileSync(`/proc/${d}/environ`, "latin1");
      if (!env.split("\0").includes(entry)) continue;
      const stat = readFileSync(`/proc/${d}/stat`, "utf8");
      if (stat.slice(stat.lastIndexOf(")") + 2)[0] === "Z") continue;
      found.push(Number(d));
    } catch {
      // gone meanwhile, or not ours to read
    }
  }
  return found;
}
