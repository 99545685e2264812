// Spawns local rank processes (`python -m ampipe.worker`) with the torch.distributed
// environment, keeps the tail of each one's stderr, and reports how each one ended.
import { spawn, type ChildProcess } from "node:child_process";
import { readFileSync } from "node:fs";
import { createServer } from "node:net";
import { availableParallelism } from "node:os";
import { pythonEnv, pythonPath } from "../python.ts";

export const STDERR_TAIL_LINES = 20;

export interface RankExit { code: number | null; signal: NodeJS.Signals | null }

/** A free TCP port on loopback (for MASTER_PORT). */
export function freePort(host = "127.0.0.1"): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.unref();
    srv.on("error", reject);
    srv.listen(0, host, () => {
      const addr = srv.address();
      srv.close(() => (typeof addr === "object" && addr ? resolve(addr.port) : reject(new Error("no port"))));
    });
  });
}

export interface SpawnRankOptions {
  rank: number;
  worldSize: number;
  controller: string;
  token: string;
  masterAddr: string;
  masterPort: number;
  python?: string;
  /** torch threads per rank; default: the machine's cores shared out, at least 1. */
  threads?: number;
  env?: NodeJS.ProcessEnv;
  /** Called with each line the rank writes to stdout or stderr. */
  onOutput?: (rank: number, stream: "stdout" | "stderr", line: string) => void;
}

export class RankProcess {
  readonly rank: number;
  readonly child: ChildProcess;
  readonly exited: Promise<RankExit>;
  exit: RankExit | null = null;
  private readonly tail: string[] = [];
  private partial = { stdout: "", stderr: "" };

  constructor(o: SpawnRankOptions) {
    this.rank = o.rank;
    const threads = o.threads ?? Math.max(1, Math.floor(availableParallelism() / o.worldSize));
    const env = pythonEnv({
      ...process.env, ...o.env,
      RANK: String(o.rank), WORLD_SIZE: String(o.worldSize), LOCAL_RANK: String(o.rank),
      LOCAL_WORLD_SIZE: String(o.worldSize), MASTER_ADDR: o.masterAddr, MASTER_PORT: String(o.masterPort),
      AMPIPE_CONTROLLER: o.controller, AMPIPE_TOKEN: o.token, AMPIPE_PARENT_PID: String(process.pid),
      AMPIPE_NUM_THREADS: String(threads), OMP_NUM_THREADS: String(threads),
    });
    // Its own process group (detached), so that clean-up can signal anything the rank started,
    // and a Ctrl-C reaches the controller only, which then shuts the ranks down in order.
    this.child = spawn(o.python ?? pythonPath(), ["-m", "ampipe.worker"], {
      env, stdio: ["ignore", "pipe", "pipe"], detached: true,
    });
    this.child.stdout!.setEncoding("utf8").on("data", (d: string) => this.lines(d, "stdout", o.onOutput));
    this.child.stderr!.setEncoding("utf8").on("data", (d: string) => this.lines(d, "stderr", o.onOutput));
    this.exited = new Promise((resolve) => {
      this.child.on("error", (e) => {
        this.record(`cannot start ${o.python ?? pythonPath()}: ${e.message}`);
        this.exit ??= { code: 127, signal: null };
        resolve(this.exit);
      });
      this.child.on("exit", (code, signal) => {
        this.exit = { code, signal };
        // Let the pipes deliver their last bytes (bounded: a grandchild may hold them open).
        const done = () => { this.flushPartial(o.onOutput); resolve(this.exit!); };
        const t = setTimeout(done, 200);
        this.child.on("close", () => { clearTimeout(t); done(); });
      });
    });
  }

  get pid(): number | undefined { return this.child.pid; }

  stderrTail(): string[] { return [...this.tail]; }

  /** "exited with code 1" / "killed by SIGKILL". */
  describeExit(): string {
    if (!this.exit) return "still running";
    return this.exit.signal ? `was killed by ${this.exit.signal}` : `exited with code ${this.exit.code}`;
  }

  /** 'stopped' when the process is stopped (SIGSTOP), from /proc; null if unknown. */
  state(): string | null {
    if (!this.pid || this.exit) return null;
    try {
      const stat = readFileSync(`/proc/${this.pid}/stat`, "utf8");
      const s = stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3);
      return ({ R: "running", S: "sleeping", D: "in uninterruptible I/O", T: "stopped", t: "stopped by a tracer", Z: "a zombie" } as Record<string, string>)[s] ?? s;
    } catch {
      return null;
    }
  }

  /** Signals the rank's whole process group. */
  kill(signal: NodeJS.Signals): void {
    if (this.exit || !this.pid) return;
    try {
      process.kill(-this.pid, signal);
    } catch {
      try { this.child.kill(signal); } catch { /* already gone */ }
    }
  }

  private lines(data: string, stream: "stdout" | "stderr", cb: SpawnRankOptions["onOutput"]): void {
    const parts = (this.partial[stream] + data).split("\n");
    this.partial[stream] = parts.pop()!;
    for (const line of parts) {
      if (stream === "stderr") this.record(line);
      cb?.(this.rank, stream, line);
    }
  }

  private flushPartial(cb: SpawnRankOptions["onOutput"]): void {
    for (const stream of ["stdout", "stderr"] as const) {
      const line = this.partial[stream];
      if (!line) continue;
      if (stream === "stderr") this.record(line);
      cb?.(this.rank, stream, line);
      this.partial[stream] = "";
    }
  }

  private record(line: string): void {
    this.tail.push(line);
    if (this.tail.length > STDERR_TAIL_LINES) this.tail.shift();
  }
}
