// External mode: ranks started by torchrun join a controller that waits for them; the CLI
// (`ampipe ping`) exits non-zero on a killed rank and leaves nothing behind.
import { spawn } from "node:child_process";
import { once } from "node:events";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { afterEach, describe, expect, it } from "vitest";
import { attachRanks } from "../../../src/bridge/index.ts";
import { pythonEnv, pythonPath } from "../../../src/python.ts";
import { FAST, processesOfRun } from "./helpers.ts";

const root = join(import.meta.dirname, "..", "..", "..");

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

describe("external ranks", () => {
  let torchrun: ReturnType<typeof spawn> | undefined;
  afterEach(() => {
    // If the test failed before the ranks exited, do not leave torchrun and its ranks behind.
    if (torchrun?.exitCode === null && torchrun.signalCode === null) torchrun.kill("SIGKILL");
  });

  it("ranks started by torchrun join, ping, and exit on shutdown", async () => {
    const run = await attachRanks({
      worldSize: 2, ...FAST, joinTimeoutMs: 60_000,
      onListening: (endpoint, token) => {
        torchrun = spawn(pythonPath(), [
          "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
          "-m", "ampipe.worker", "--controller", endpoint,
        ], { env: pythonEnv({ ...process.env, AMPIPE_TOKEN: token, OMP_NUM_THREADS: "1" }), stdio: ["ignore", "ignore", "pipe"] });
      },
    });
    const stopTorchrun = () => { if (torchrun?.exitCode === null) torchrun.kill("SIGKILL"); };
    try {
      expect(run.ranks.map((r) => [r.rank, r.backend, r.device])).toEqual([[0, "gloo", "cpu"], [1, "gloo", "cpu"]]);
      const results = (await run.broadcast("ping", { seq: 2 })) as Array<{ all_reduce: { ok: boolean }; all_to_all: { ok: boolean } }>;
      expect(results.every((r) => r.all_reduce.ok && r.all_to_all.ok)).toBe(true);
    } catch (e) {
      stopTorchrun();
      throw e;
    } finally {
      await run.close();
    }
    const timer = setTimeout(stopTorchrun, 20_000);
    const [code] = torchrun!.exitCode !== null ? [torchrun!.exitCode] : await once(torchrun!, "exit");
    clearTimeout(timer);
    expect(code).toBe(0);
    expect(processesOfRun(run.controller.token)).toEqual([]);
  });
});

describe("ampipe ping (CLI)", () => {
  it("exits non-zero naming a rank killed mid-run, with no process left behind", async () => {
    const cli = spawn(process.execPath, [join(root, "bin", "ampipe.js"), "ping", "--ranks", "2", "--seconds", "60", "--json",
      "--heartbeat-interval", "100", "--heartbeat-timeout", "60000"], { stdio: ["ignore", "pipe", "pipe"] });
    let stderr = "";
    cli.stderr!.setEncoding("utf8").on("data", (d: string) => (stderr += d));
    const lines = createInterface({ input: cli.stdout! });
    const [first] = (await once(lines, "line")) as [string];
    const round = JSON.parse(first) as { ok: boolean; results: Array<{ pid: number }> };
    expect(round.ok).toBe(true);
    const pids = round.results.map((r) => r.pid);
    process.kill(pids[1], "SIGKILL");
    const [code] = await once(cli, "exit"); // the heartbeat deadline is 60 s: only the exit can end it sooner
    expect(code).toBe(1);
    expect(stderr).toMatch(new RegExp(`rank 1 \\(pid ${pids[1]}\\) was killed by SIGKILL`));
    expect(pids.filter(alive)).toEqual([]);
  });

  it("ends quietly with exit 141 when its reader goes away (| head), leaving no rank behind", async () => {
    const cli = spawn(process.execPath, [join(root, "bin", "ampipe.js"), "ping", "--ranks", "2", "--seconds", "60", "--json"],
      { stdio: ["ignore", "pipe", "pipe"] });
    let stderr = "";
    cli.stderr!.setEncoding("utf8").on("data", (d: string) => (stderr += d));
    const exited = once(cli, "exit");
    const [first] = (await once(createInterface({ input: cli.stdout! }), "line")) as [string];
    const pids = (JSON.parse(first) as { results: Array<{ pid: number }> }).results.map((r) => r.pid);
    cli.stdout!.destroy(); // the reader is gone: the next round's line meets EPIPE
    const [code] = await exited;
    expect(code).toBe(141);
    expect(stderr).toBe("");
    const end = Date.now() + 5000;
    while (pids.some(alive) && Date.now() < end) await new Promise((r) => setTimeout(r, 50));
    expect(pids.filter(alive)).toEqual([]);
  });

  it("ranks die with the controller when it is killed with SIGKILL", async () => {
    const cli = spawn(process.execPath, [join(root, "bin", "ampipe.js"), "ping", "--ranks", "2", "--seconds", "60", "--json"],
      { stdio: ["ignore", "pipe", "ignore"] });
    const [first] = (await once(createInterface({ input: cli.stdout! }), "line")) as [string];
    const pids = (JSON.parse(first) as { results: Array<{ pid: number }> }).results.map((r) => r.pid);
    expect(pids.filter(alive)).toEqual(pids);
    cli.kill("SIGKILL");
    await once(cli, "exit");
    const end = Date.now() + 5000;
    while (pids.some(alive) && Date.now() < end) await new Promise((r) => setTimeout(r, 50));
    expect(pids.filter(alive)).toEqual([]);
  });
});
