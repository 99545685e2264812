// One run per directory: `ampipe train`, `compare` and `bench <config>` hold <dir>/ampipe.lock
// while they run, so a second command on the same directory is refused at once (naming the
// holder) instead of writing the same checkpoints and metric lines twice.
//
// Node has no flock(2), so the lock is a file created atomically (link(2) of a fully written
// temporary file: it exists whole or not at all) that names its holder: pid, host, the
// command, since when, and the process's start time and the machine's boot id. A lock whose
// holder is gone (killed with SIGKILL, the machine rebooted, the pid reused by another
// process) is stale: the next run takes it over and says so, which gives what the kernel's
// release of an flock would. A holder on another host cannot be checked from here: refused,
// naming the host and the file to remove. No dependency (proper-lockfile's mtime refresh
// would let a run whose event loop stalls lose its lock, and it does not name the holder).
import { existsSync, linkSync, mkdirSync, readFileSync, renameSync, unlinkSync, writeFileSync } from "node:fs";
import { hostname } from "node:os";
import { join } from "node:path";

export const LOCK_FILE = "ampipe.lock";

export interface LockHolder {
  pid: number;
  host: string;
  command: string;
  /** ISO time the lock was taken. */
  since: string;
  /** The holder's start time (clock ticks after boot, /proc/PID/stat field 22), where readable. */
  start: number | null;
  /** The machine's boot id, where readable: a pid from before a reboot is no one's. */
  boot: string | null;
}

/** The directory is held by another live run (or one on another host). */
export class RunDirLocked extends Error {
  constructor(message: string, readonly holder: LockHolder | null, readonly path: string) {
    super(message);
    this.name = "RunDirLocked";
  }
}

const readText = (path: string): string | null => {
  try {
    return readFileSync(path, "utf8");
  } catch {
    return null;
  }
};

const bootId = (): string | null => readText("/proc/sys/kernel/random/boot_id")?.trim() ?? null;

/** The process's start time and state from /proc (Linux); null where there is no /proc. */
function procStat(pid: number): { start: number; state: string } | null {
  const stat = readText(`/proc/${pid}/stat`);
  if (stat === null) return null;
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" "); // fields from 3 (state) on
  return { state: fields[0], start: Number(fields[19]) };
}

/** Whether `h` (a holder on this host) is still running: the same process, not a later one with its pid. */
export function holderAlive(h: LockHolder): boolean {
  if (h.boot !== null && bootId() !== null && h.boot !== bootId()) return false; // rebooted since
  try {
    process.kill(h.pid, 0);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== "EPERM") return false; // ESRCH: gone
  }
  const st = procStat(h.pid);
  if (st === null) return true; // no /proc: the pid exists, trust it
  if (st.state === "Z" || st.state === "X") return false; // exited, not yet reaped
  return h.start === null || st.start === h.start;
}

function describe(h: LockHolder): string {
  const ago = (Date.now() - Date.parse(h.since)) / 1000;
  const age = Number.isFinite(ago) ? ` (${ago < 120 ? `${ago.toFixed(0)} s` : ago < 7200 ? `${(ago / 60).toFixed(0)} min` : `${(ago / 3600).toFixed(1)} h`} ago)` : "";
  return `pid ${h.pid} on ${h.host}, \`${h.command}\`, since ${h.since}${age}`;
}

function readHolder(path: string): LockHolder | null | "unreadable" {
  const text = readText(path);
  if (text === null) return null; // gone meanwhile
  try {
    const h = JSON.parse(text) as LockHolder;
    if (typeof h.pid !== "number" || typeof h.host !== "string") return "unreadable";
    return h;
  } catch {
    return "unreadable";
  }
}

/** Creates `path` holding `text`, whole, only if it does not exist (false: it exists). */
function createExclusive(path: string, text: string): boolean {
  const tmp = `${path}.${process.pid}.${Math.random().toString(36).slice(2)}.tmp`;
  writeFileSync(tmp, text);
  try {
    linkSync(tmp, path);
    return true;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "EEXIST") return false;
    throw e;
  } finally {
    unlinkSync(tmp);
  }
}

const SIGNALS = ["SIGINT", "SIGTERM", "SIGHUP"] as const;

export class RunDirLock {
  readonly path: string;
  readonly holder: LockHolder;
  private released = false;
  private readonly onExit = () => this.release();
  private readonly onSignal = (sig: NodeJS.Signals) => {
    // Only when nothing else handles the signal (a command's own handler exits, and the exit
    // releases): release, then let the signal do what it would have done.
    if (process.listenerCount(sig) > 1) return;
    this.release(); // (also stops listening: the signal's default action is back)
    process.kill(process.pid, sig);
  };

  constructor(path: string, holder: LockHolder) {
    this.path = path;
    this.holder = holder;
    process.once("exit", this.onExit);
    for (const sig of SIGNALS) process.on(sig, this.onSignal);
  }

  /** Removes the lock file if it is still this process's (idempotent; runs at exit by itself). */
  release(): void {
    if (this.released) return;
    this.released = true;
    process.off("exit", this.onExit);
    for (const sig of SIGNALS) process.off(sig, this.onSignal);
    const h = readHolder(this.path);
    if (h && h !== "unreadable" && h.pid === this.holder.pid && h.since === this.holder.since) {
      try { unlinkSync(this.path); } catch { /* already gone */ }
    }
  }
}

/**
 * Takes `dir`'s run lock for `command` (e.g. "ampipe train") until this process exits or
 * `release()`. Throws RunDirLocked naming the holder when another live run holds it; takes over
 * (and says so through `say`) a lock whose holder is gone.
 */
export function lockRunDir(dir: string, command: string, say: (line: string) => void = (l) => process.stdout.write(l + "\n")): RunDirLock {
  mkdirSync(dir, { recursive: true });
  const path = join(dir, LOCK_FILE);
  const own = procStat(process.pid);
  const holder: LockHolder = {
    pid: process.pid, host: hostname(), since: new Date().toISOString(),
    command: /ampipe(\.js)?$/.test(process.argv[1] ?? "") ? ["ampipe", ...process.argv.slice(2)].join(" ") : command,
    start: own?.start ?? null, boot: bootId(),
  };
  const text = JSON.stringify(holder, null, 2) + "\n";
  for (let attempt = 0; attempt < 20; attempt++) {
    if (createExclusive(path, text)) return new RunDirLock(path, holder);
    const h = readHolder(path);
    if (h === null) continue; // released between our attempt and the read: try again
    if (h === "unreadable") {
      throw new RunDirLocked(`${dir} is locked by ${path}, which is unreadable; if no run uses ${dir}, remove that file`, null, path);
    }
    if (h.host !== hostname()) {
      throw new RunDirLocked(`${dir} is in use by another run: ${describe(h)}; it runs on another host, so whether it is ` +
        `still running cannot be checked from here: if it is not, remove ${path}`, h, path);
    }
    if (holderAlive(h)) {
      throw new RunDirLocked(`${dir} is in use by another run: ${describe(h)}; wait for it to end (or stop it), or choose another --out`, h, path);
    }
    // Stale: move it aside under a name of our own (rename is atomic: of two runs taking over
    // at once, one moves it, the other finds it gone and retries), then check it is the one we read.
    const aside = `${path}.stale.${process.pid}`;
    try {
      renameSync(path, aside);
    } catch {
      continue;
    }
    const moved = readHolder(aside);
    if (moved !== null && moved !== "unreadable" && (moved.pid !== h.pid || moved.since !== h.since)) {
      // A live run's fresh lock was moved (it took over in between): put it back, unless yet another appeared.
      try { linkSync(aside, path); } catch { /* another run holds it now; we will find that run */ }
      unlinkSync(aside);
      continue;
    }
    unlinkSync(aside);
    say(`${command}: took over ${dir} from a run that is gone (${describe(h)})`);
  }
  throw new RunDirLocked(`${dir}: could not take ${path} (other runs keep taking it)`, null, path);
}

/** The holder of `dir`'s lock, or null when it is free (for status lines and tests). */
export function lockHolder(dir: string): LockHolder | null {
  const path = join(dir, LOCK_FILE);
  if (!existsSync(path)) return null;
  const h = readHolder(path);
  return h === "unreadable" ? null : h;
}
