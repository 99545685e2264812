// Faults in ranks: each must be reported naming the rank, stop the other ranks, and leave no
// process behind (checked in the process table).
import { afterEach, describe, expect, it } from "vitest";
import { CommandError, RankFailure, type RankRun } from "../../../src/bridge/index.ts";
import { launchQuiet, processesOfRun, SHORT_DEADLINE, sleep } from "./helpers.ts";

let current: RankRun | undefined;
afterEach(async () => {
  if (!current) return;
  await current.close();
  expect(processesOfRun(current.controller.token)).toEqual([]);
  current = undefined;
});

async function expectFailure(p: Promise<unknown>): Promise<RankFailure> {
  const e = await p.then(() => null, (err: unknown) => err);
  expect(e).toBeInstanceOf(RankFailure);
  return e as RankFailure;
}

describe("rank faults", () => {
  it("a rank killed with SIGKILL mid-command is named with its signal and last stderr lines, from its exit (not a deadline)", async () => {
    const run = (current = await launchQuiet({ worldSize: 2 }));
    const pending = run.broadcast("sleep", { seconds: 30, say: "rank is about to sleep" });
    await sleep(300); // both ranks are inside the command and have written their stderr line
    const victim = run.processes[1];
    process.kill(victim.pid!, "SIGKILL");
    const f = await expectFailure(pending);
    // "exited" with its signal: the process watcher saw it (a deadline would say "unresponsive").
    expect(f.rank).toBe(1);
    expect(f.kind).toBe("exited");
    expect(f.message).toMatch(/rank 1 \(pid \d+\) was killed by SIGKILL while running 'sleep'/);
    expect(f.message).toContain("rank is about to sleep");
    expect(f.details.signal).toBe("SIGKILL");
    await run.close();
    // The other rank was stopped too.
    expect(run.processes[0].exit).not.toBeNull();
    expect(processesOfRun(run.controller.token)).toEqual([]);
  });

  it("a rank stopped with SIGSTOP is reported after the heartbeat deadline and killed", async () => {
    const run = (current = await launchQuiet({ worldSize: 2, ...SHORT_DEADLINE }));
    await run.broadcast("echo", {});
    process.kill(run.processes[0].pid!, "SIGSTOP");
    const pending = run.broadcast("echo", { x: 1 });
    const f = await expectFailure(pending);
    expect(f.rank).toBe(0);
    expect(f.kind).toBe("unresponsive");
    expect(f.message).toMatch(/rank 0 \(pid \d+ on .*\) sent nothing for [\d.]+ s \(heartbeat deadline 1\.5 s\); it was running 'echo'; its process is stopped/);
    await run.close();
    expect(run.processes.map((p) => p.exit?.signal ?? p.exit?.code)).toEqual(["SIGKILL", expect.anything()]);
  });

  it("a rank stuck in a busy loop is reported after the heartbeat deadline", async () => {
    const run = (current = await launchQuiet({ worldSize: 2, ...SHORT_DEADLINE }));
    const f = await expectFailure(run.broadcast("spin", { ranks: [1], seconds: 600 }));
    expect(f.rank).toBe(1);
    expect(f.kind).toBe("unresponsive");
    expect(f.message).toMatch(/rank 1 .* sent nothing for .*it was running 'spin'; its process is running/);
  });

  it("an exception in a rank shows its traceback, named by rank; the ranks stay usable", async () => {
    const run = (current = await launchQuiet({ worldSize: 2 }));
    const e = await run.broadcast("fail", { ranks: [1], message: "boom from the test" }).catch((err) => err);
    expect(e).toBeInstanceOf(CommandError);
    const ce = e as CommandError;
    expect(ce.errors.map((x) => x.rank)).toEqual([1]);
    expect(ce.message).toContain("rank 1: command 'fail' raised RuntimeError: boom from the test");
    expect(ce.message).toMatch(/Traceback \(most recent call last\):[\s\S]*builtin\.py[\s\S]*RuntimeError: boom from the test/);
    // An unknown command is an error reply too, naming the commands the rank knows.
    const u = await run.request(0, "no_such_command").catch((err) => err);
    expect(u).toBeInstanceOf(CommandError);
    expect((u as CommandError).message).toMatch(/unknown command 'no_such_command'; this rank knows: .*ping/);
    // Not a fault: the run goes on.
    expect(run.failure).toBeNull();
    const results = (await run.broadcast("ping", { seq: 1 })) as Array<{ all_reduce: { ok: boolean } }>;
    expect(results.map((r) => r.all_reduce.ok)).toEqual([true, true]);
  });

  it("a Python that does not exist is reported, pointing at ampipe doctor", async () => {
    const f = await expectFailure(launchQuiet({ worldSize: 2, python: "/nonexistent/python3" }));
    expect(f.message).toMatch(/rank \d could not be started \(\/nonexistent\/python3\) before joining the run; `ampipe doctor`/);
    expect(f.message).toContain("spawn /nonexistent/python3 ENOENT");
  });

  it("a rank that cannot start (a bad import) is reported with its traceback", async () => {
    const f = await expectFailure(launchQuiet({ worldSize: 1, dist: false, imports: ["ampipe.no_such_module"] }));
    expect(f.rank).toBe(0);
    expect(f.message).toMatch(/rank 0 failed to start: .*ModuleNotFoundError: No module named 'ampipe.no_such_module'/);
    expect(f.message).toContain("Traceback");
  });
});
