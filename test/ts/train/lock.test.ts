// The run-directory lock (src/train/lock.ts): refusal naming a live holder, takeover of a dead
// one's lock, and release on every way a process ends (the end-to-end refusal of a second
// `ampipe train` is in train.test.ts).
import { spawn, spawnSync } from "node:child_process";
import { once } from "node:events";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { hostname, tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { afterAll, describe, expect, it } from "vitest";
import { LOCK_FILE, lockHolder, lockRunDir, RunDirLocked, type LockHolder } from "../../../src/train/lock.ts";

const root = join(import.meta.dirname, "..", "..", "..");
const dir = mkdtempSync(join(tmpdir(), "ampipe-lock-test-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
let n = 0;
const fresh = () => join(dir, `run-${n++}`);

function plant(runDir: string, h: Partial<LockHolder>): void {
  lockRunDir(runDir, "planting").release(); // makes the directory
  const holder: LockHolder = { pid: 1, host: hostname(), command: "ampipe train other.yaml", since: "2026-01-02T03:04:05.000Z", start: null, boot: null, ...h };
  writeFileSync(join(runDir, LOCK_FILE), JSON.stringify(holder));
}

/** The pid of a process that has exited (and been reaped). */
function deadPid(): number {
  const r = spawnSync(process.execPath, ["-e", "process.stdout.write(String(process.pid))"], { encoding: "utf8" });
  return Number(r.stdout);
}

describe("run-directory lock", () => {
  it("names its holder in the lock file and removes it on release", () => {
    const d = fresh();
    const lock = lockRunDir(d, "ampipe train");
    expect(lockHolder(d)).toMatchObject({ pid: process.pid, host: hostname(), command: "ampipe train" });
    expect(Date.parse(lockHolder(d)!.since)).toBeGreaterThan(0);
    lock.release();
    expect(existsSync(join(d, LOCK_FILE))).toBe(false);
  });

  it("refuses a directory that a live run holds, naming its pid, host, command and start", () => {
    const d = fresh();
    const lock = lockRunDir(d, "ampipe train");
    try {
      const e = (() => { try { lockRunDir(d, "ampipe compare"); } catch (err) { return err; } })();
      expect(e).toBeInstanceOf(RunDirLocked);
      const msg = (e as Error).message;
      expect(msg).toContain(`in use by another run: pid ${process.pid} on ${hostname()}, \`ampipe train\`, since ${lock.holder.since}`);
      expect(msg).toMatch(/choose another --out/);
      expect(lockHolder(d)!.since).toBe(lock.holder.since); // untouched
    } finally {
      lock.release();
    }
  });

  it("takes over the lock of a process that is gone, saying whose it was", () => {
    const d = fresh();
    const pid = deadPid();
    plant(d, { pid });
    const said: string[] = [];
    const lock = lockRunDir(d, "ampipe train", (l) => said.push(l));
    expect(said).toEqual([expect.stringMatching(new RegExp(`took over .* from a run that is gone \\(pid ${pid} on .*ampipe train other\\.yaml.*since 2026-01-02T03:04:05\\.000Z`))]);
    expect(lockHolder(d)!.pid).toBe(process.pid);
    lock.release();
  });

  it("takes over when the pid now belongs to another process (start time differs) or the machine rebooted", () => {
    for (const h of [{ pid: process.pid, start: 1 }, { pid: process.pid, boot: "a-boot-before-this-one" }]) {
      const d = fresh();
      plant(d, h);
      const said: string[] = [];
      lockRunDir(d, "ampipe bench", (l) => said.push(l)).release();
      expect(said.length).toBe(1);
    }
  });

  it("refuses a holder on another host (it cannot be checked), naming the host and the file", () => {
    const d = fresh();
    plant(d, { host: "some-other-node", pid: 4242 });
    expect(() => lockRunDir(d, "ampipe train")).toThrow(new RegExp(`pid 4242 on some-other-node.*another host.*remove ${join(d, LOCK_FILE).replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}`));
  });

  it("refuses an unreadable lock file, naming it", () => {
    const d = fresh();
    plant(d, {});
    writeFileSync(join(d, LOCK_FILE), "{ not json");
    expect(() => lockRunDir(d, "ampipe train")).toThrow(/unreadable; if no run uses .* remove that file/);
  });

  // A process that takes the lock, says "locked", then ends the way `mode` says.
  const child = (runDir: string, mode: string) => {
    const script = join(dir, "holder.mjs");
    writeFileSync(script, `
      const { lockRunDir } = await import(${JSON.stringify(join(root, "src", "train", "lock.ts"))});
      const mode = process.argv[3];
      lockRunDir(process.argv[2], "holder");
      if (mode === "handled") process.on("SIGINT", () => setTimeout(() => process.exit(130), 20)); // as a command's handler does
      console.log("locked");
      if (mode === "exit") process.exit(0);
      if (mode === "throw") throw new Error("failed on purpose");
      setInterval(() => {}, 1000);
    `);
    const p = spawn(process.execPath, ["--import", "tsx", script, runDir, mode], { cwd: root, stdio: ["ignore", "pipe", "pipe"] });
    const locked = once(createInterface({ input: p.stdout! }), "line");
    const exited = once(p, "exit") as Promise<[number | null, NodeJS.Signals | null]>;
    return { p, locked, exited };
  };

  it("is released when the holder exits, throws, or is stopped by SIGTERM (no handler) or SIGINT (a command's handler)", async () => {
    for (const [mode, signal, want] of [["exit", null, [0, null]], ["throw", null, [1, null]], ["wait", "SIGTERM", [null, "SIGTERM"]], ["handled", "SIGINT", [130, null]]] as const) {
      const d = fresh();
      const c = child(d, mode);
      await c.locked;
      if (signal) {
        expect(lockHolder(d)!.pid).toBe(c.p.pid);
        c.p.kill(signal);
      }
      expect(await c.exited, mode).toEqual(want);
      expect(existsSync(join(d, LOCK_FILE)), mode).toBe(false);
    }
  });

  it("is left by a holder killed with SIGKILL, and the next run takes it over", async () => {
    const d = fresh();
    const c = child(d, "wait");
    await c.locked;
    c.p.kill("SIGKILL");
    await c.exited;
    expect(JSON.parse(readFileSync(join(d, LOCK_FILE), "utf8")).pid).toBe(c.p.pid);
    const said: string[] = [];
    lockRunDir(d, "ampipe train", (l) => said.push(l)).release();
    expect(said[0]).toMatch(new RegExp(`took over .* \\(pid ${c.p.pid} on `));
  });
});
