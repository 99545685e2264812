// External ranks (started by torchrun or Slurm, one process per rank, no agent of ours beside
// them) watch their run: a peer killed mid-collective, or the controller killed mid-command,
// makes every other rank leave within seconds, naming what it lost; a collective that waits
// for a peer that does not come fails after the command's collective timeout.
import { spawn, type ChildProcess } from "node:child_process";
import { once } from "node:events";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { afterAll, afterEach, describe, expect, it } from "vitest";
import { attachRanks, CommandError, freePort, RankFailure } from "../../../src/bridge/index.ts";
import { pythonEnv, pythonPath } from "../../../src/python.ts";
import { FAST, launchQuiet, processesOfRun } from "./helpers.ts";

const root = join(import.meta.dirname, "..", "..", "..");
const testCommands = join(root, "test", "py", "worker");
const dir = mkdtempSync(join(tmpdir(), "ampipe-external-faults-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

interface Rank { p: ChildProcess; stderr: () => string; exited: Promise<[number | null, NodeJS.Signals | null]> }
let started: ChildProcess[] = [];
afterEach(() => {
  for (const p of started) if (p.exitCode === null && p.signalCode === null) p.kill("SIGKILL");
  started = [];
});

/** Starts one external rank by hand, as Slurm's srun would: its own env, no launcher of ours. */
async function externalRanks(endpoint: string, token: string, world: number): Promise<Rank[]> {
  const masterPort = await freePort();
  return [...Array(world).keys()].map((rank) => {
    const env = pythonEnv({
      ...process.env, PYTHONPATH: testCommands, RANK: String(rank), WORLD_SIZE: String(world), LOCAL_RANK: String(rank),
      MASTER_ADDR: "127.0.0.1", MASTER_PORT: String(masterPort), AMPIPE_TOKEN: token, OMP_NUM_THREADS: "1",
    });
    delete env.AMPIPE_PARENT_PID;
    const p = spawn(pythonPath(), ["-m", "ampipe.worker", "--controller", endpoint], { env, stdio: ["ignore", "ignore", "pipe"] });
    started.push(p);
    let err = "";
    p.stderr!.setEncoding("utf8").on("data", (d: string) => (err += d));
    return { p, stderr: () => err, exited: once(p, "exit") as Promise<[number | null, NodeJS.Signals | null]> };
  });
}

describe("external ranks on faults", { timeout: 120_000 }, () => {
  it("a rank whose peer is SIGKILLed mid-collective exits 4 within seconds, naming the lost peer", async () => {
    let ranks: Rank[] = [];
    const run = await attachRanks({
      worldSize: 2, ...FAST, imports: ["worker_test_commands"], joinTimeoutMs: 60_000,
      onListening: (endpoint, token) => { void externalRanks(endpoint, token, 2).then((r) => (ranks = r)); },
    });
    try {
      const inside = new Set<number>();
      run.onEvent((e) => { if (e.kind === "progress") inside.add(e.rank); });
      const pending = run.broadcast("test_collectives", { seconds: 90 });
      const end = Date.now() + 30_000;
      while (inside.size < 2 && Date.now() < end) await new Promise((r) => setTimeout(r, 20));
      expect(inside.size).toBe(2);
      const victim = ranks[1].p.pid!;
      const t0 = performance.now();
      ranks[1].p.kill("SIGKILL");
      const e = await pending.then(() => null, (err: unknown) => err);
      expect(e).toBeInstanceOf(RankFailure);
      expect((e as RankFailure).rank).toBe(1);
      const [code] = await ranks[0].exited;
      const stopS = (performance.now() - t0) / 1000;
      expect(code).toBe(4);
      expect(ranks[0].stderr()).toMatch(new RegExp(`ampipe rank 0: the controller ended the run \\(rank 1 \\(pid ${victim} on .*\\) disconnected`));
      console.log(`external peer SIGKILL: the other rank exited ${code} after ${stopS.toFixed(2)} s`);
    } finally {
      await run.close();
    }
    expect(processesOfRun(run.controller.token)).toEqual([]);
  });

  it("ranks whose controller is SIGKILLed mid-command exit 3 within seconds, saying the controller is lost", async () => {
    // The controller in a process of its own, so that it can be killed.
    const script = join(dir, "controller.mjs");
    writeFileSync(script, `
      const { attachRanks } = await import(${JSON.stringify(join(root, "src", "bridge", "index.ts"))});
      const run = await attachRanks({ worldSize: 2, heartbeatIntervalMs: 200, heartbeatTimeoutMs: 60000, imports: ["worker_test_commands"],
        onListening: (endpoint, token) => console.log(JSON.stringify({ endpoint, token })) });
      run.onEvent((e) => { if (e.kind === "progress") console.log("inside " + e.rank); });
      await run.broadcast("test_collectives", { seconds: 90 });
    `);
    const controller = spawn(process.execPath, ["--import", "tsx", script], { cwd: root, stdio: ["ignore", "pipe", "inherit"] });
    started.push(controller);
    const lines = createInterface({ input: controller.stdout! });
    const first = (await once(lines, "line"))[0] as string;
    const { endpoint, token } = JSON.parse(first) as { endpoint: string; token: string };
    const ranks = await externalRanks(endpoint, token, 2);
    const inside = new Set<string>();
    await new Promise<void>((resolve) => lines.on("line", (l: string) => { inside.add(l); if (inside.size === 2) resolve(); }));
    const t0 = performance.now();
    controller.kill("SIGKILL");
    for (const r of ranks) {
      const [code] = await r.exited;
      expect(code).toBe(3);
      expect(r.stderr()).toMatch(/controller lost while 'test_collectives' was running: the connection to tcp:\/\/127\.0\.0\.1:\d+ dropped/);
    }
    console.log(`external controller SIGKILL: both ranks exited 3 after ${((performance.now() - t0) / 1000).toFixed(2)} s (heartbeat timeout 60 s)`);
  });

  it("a collective whose peer never joins it fails after the collective timeout, naming it", async () => {
    const run = await launchQuiet({ worldSize: 2, imports: ["worker_test_commands"], distTimeoutS: 2, env: { PYTHONPATH: testCommands } });
    try {
      const e = await run.broadcast("test_collectives", { seconds: 60, ranks: [0] }).then(() => null, (err: unknown) => err);
      expect(e).toBeInstanceOf(CommandError);
      expect((e as CommandError).errors.map((x) => x.rank)).toEqual([0]);
      expect((e as CommandError).message).toMatch(/[Tt]imed out|[Tt]imeout/);
    } finally {
      await run.close();
    }
  });
});
