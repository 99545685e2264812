// The controller: a ZeroMQ ROUTER that ranks (DEALERs, routing id `rank-N`) connect to.
// It owns the handshake, request/reply with ids, the event stream, application-level
// heartbeats and protocol-error handling. It knows nothing about processes: faults are
// reported through `onFault`, and src/bridge/run.ts decides what to do with them.
import { randomBytes, timingSafeEqual } from "node:crypto";
import { isIP } from "node:net";
import { Router } from "zeromq";
import { decode, encode } from "./codec.ts";
import { BridgeError, CommandError, RankFailure, RunClosedError } from "./errors.ts";
import {
  DEFAULT_MAX_MESSAGE_BYTES, PROTOCOL_VERSION, ProtocolError,
  type ControllerMessage, type Hello, type RankMessage, type Reply, type Welcome,
} from "./protocol.ts";

export interface ControllerOptions {
  worldSize: number;
  /** Endpoint to bind; default tcp://127.0.0.1:0 (loopback, a free port). */
  bind?: string;
  /** Binding anything but loopback needs this explicit opt-in. */
  allowRemote?: boolean;
  /** The run's token; default 16 random bytes, hex. */
  token?: string;
  heartbeatIntervalMs?: number;
  /** A rank silent for longer than this is reported as unresponsive. */
  heartbeatTimeoutMs?: number;
  maxMessageBytes?: number;
  /** Python modules each rank imports at start (they register commands). */
  imports?: string[];
  /** torch.distributed set-up for the ranks, or null for none. */
  dist?: { backend: string; device: string; timeoutS?: number } | null;
  /** Pin ZeroMQ disconnects to ranks (external ranks; local ones are watched as processes). */
  detectDisconnects?: boolean;
  /** Adds what the caller knows (exit status, stderr) to a fault before it is reported. */
  enrichFault?: (f: RankFailure) => RankFailure;
}

export interface RankInfo {
  rank: number; localRank: number; pid: number; host: string; python: string; torch: string;
  device: string; backend: string | null; commands: string[];
}

/** An event streamed by a rank (metric, log, error, ...). */
export interface RankEvent { rank: number; kind: string; [field: string]: unknown }

export interface RankStats { events: number; dropped: number; lastHeartbeatSeq: number; busy: number | null }

interface RankState {
  hello: Hello;
  routingId: Buffer;
  ready: RankInfo | null;
  lastSeen: number;
  stats: RankStats;
  left: string | null;
}

interface Pending { rank: number; name: string; resolve(r: unknown): void; reject(e: Error): void }

const LOOPBACK = new Set(["127.0.0.1", "::1", "localhost", "[::1]"]);

/** Refuses a non-loopback bind unless allowRemote is set (docs/bridge.md, "Security"). */
export function checkBindAddress(endpoint: string, allowRemote: boolean): void {
  const m = /^tcp:\/\/(\[[^\]]+\]|[^:]+):(\d+|\*)$/.exec(endpoint);
  if (!m) {
    if (endpoint.startsWith("ipc://") || endpoint.startsWith("inproc://")) return;
    throw new BridgeError(`cannot bind '${endpoint}': expected tcp://HOST:PORT (or ipc://PATH)`);
  }
  const host = m[1];
  if (m[2] !== "*" && Number(m[2]) > 65535) throw new BridgeError(`cannot bind '${endpoint}': port ${m[2]} is out of range`);
  if (!LOOPBACK.has(host) && !allowRemote) {
    throw new BridgeError(
      `refusing to bind ${endpoint}: it is not a loopback address, so other machines could reach the ` +
      `controller; pass --allow-remote (allowRemote: true) to bind ${host}` +
      (isIP(host) === 0 && host !== "*" ? " (or use an IP address)" : ""),
    );
  }
}

export class Controller {
  readonly worldSize: number;
  readonly token: string;
  readonly heartbeatIntervalMs: number;
  readonly heartbeatTimeoutMs: number;
  readonly maxMessageBytes: number;
  endpoint = "";

  private readonly sock: Router;
  private readonly opts: ControllerOptions;
  private readonly ranks = new Map<number, RankState>();
  private readonly pending = new Map<number, Pending>();
  /** Requests given up on (a fault, a shutdown): their late replies are expected, not errors. */
  private readonly abandoned = new Set<number>();
  private readonly sendQueue: Array<{ to: Buffer; frame: Buffer; rank: number | null; critical: boolean }> = [];
  private sending = false;
  private nextId = 1;
  private hbSeq = 0;
  private hbTimer: NodeJS.Timeout | null = null;
  private lastTick = 0;
  private closed = false;
  /** shutdownRanks() was called: ranks leaving now is expected, not a fault. */
  private stopping = false;
  private failure: Error | null = null;
  private joinWaiters: Array<{ resolve(): void; reject(e: Error): void }> = [];
  private eventListeners: Array<(e: RankEvent) => void> = [];
  private protocolErrorListeners: Array<(source: string, message: string) => void> = [];
  private faultListeners: Array<(f: RankFailure) => void> = [];
  /** Protocol errors seen (rejected frames), for tests and stats. */
  protocolErrors = 0;

  constructor(opts: ControllerOptions) {
    this.opts = opts;
    this.worldSize = opts.worldSize;
    this.token = opts.token ?? randomBytes(16).toString("hex");
    this.heartbeatIntervalMs = opts.heartbeatIntervalMs ?? 1000;
    this.heartbeatTimeoutMs = opts.heartbeatTimeoutMs ?? 60_000;
    this.maxMessageBytes = opts.maxMessageBytes ?? DEFAULT_MAX_MESSAGE_BYTES;
    if (this.heartbeatTimeoutMs <= this.heartbeatIntervalMs) {
      throw new BridgeError(`heartbeat timeout (${this.heartbeatTimeoutMs} ms) must exceed the heartbeat interval (${this.heartbeatIntervalMs} ms)`);
    }
    // linger 0: never hang at exit on unsent messages. sendTimeout 0: a full peer pipe is an
    // error we handle, never a send that waits forever. mandatory: an unknown or gone peer
    // is an error (EHOSTUNREACH), which is how a disconnect is pinned to a rank.
    this.sock = new Router({ linger: 0, mandatory: true, sendTimeout: 0, receiveHighWaterMark: 10_000, sendHighWaterMark: 10_000 });
  }

  /** Binds the ROUTER and starts receiving. */
  async start(): Promise<void> {
    const bind = this.opts.bind ?? "tcp://127.0.0.1:0";
    try {
      checkBindAddress(bind, this.opts.allowRemote ?? false);
      await this.sock.bind(bind.replace(/:0$/, ":*"));
    } catch (e) {
      this.close();
      if (e instanceof BridgeError) throw e;
      throw new BridgeError(`cannot bind ${bind}: ${(e as Error).message}`);
    }
    this.endpoint = this.sock.lastEndpoint ?? bind;
    if (this.opts.detectDisconnects ?? true) this.sock.events.on("disconnect", () => this.probeRanks());
    void this.receiveLoop();
    this.lastTick = Date.now();
    this.hbTimer = setInterval(() => this.tick(), this.heartbeatIntervalMs);
  }

  // ---- listeners -----------------------------------------------------------------------
  onEvent(fn: (e: RankEvent) => void): () => void {
    this.eventListeners.push(fn);
    return () => { this.eventListeners = this.eventListeners.filter((f) => f !== fn); };
  }
  onProtocolError(fn: (source: string, message: string) => void): void { this.protocolErrorListeners.push(fn); }
  onFault(fn: (f: RankFailure) => void): void { this.faultListeners.push(fn); }

  rankInfo(): RankInfo[] {
    return [...this.ranks.values()].filter((r) => r.ready).map((r) => r.ready!).sort((a, b) => a.rank - b.rank);
  }
  rankStats(rank: number): RankStats | undefined { return this.ranks.get(rank)?.stats; }
  /** Whether the rank's handshake was accepted (it may still be starting). */
  hasJoined(rank: number): boolean { return this.ranks.has(rank); }

  /** Resolves when all worldSize ranks are ready; rejects on failure or timeout. */
  waitForRanks(timeoutMs: number): Promise<void> {
    if (this.failure) return Promise.reject(this.failure);
    if (this.readyCount() === this.worldSize) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        const missing = [...Array(this.worldSize).keys()].filter((r) => !this.ranks.get(r)?.ready);
        const f = new RankFailure(
          `rank ${missing[0]} did not join within ${(timeoutMs / 1000).toFixed(1)} s ` +
          `(missing: ${missing.join(", ")}; controller at ${this.endpoint})`, missing[0], "join-timeout");
        this.fault(f);
      }, timeoutMs);
      this.joinWaiters.push({
        resolve: () => { clearTimeout(timer); resolve(); },
        reject: (e) => { clearTimeout(timer); reject(e); },
      });
    });
  }

  private readyCount(): number {
    let n = 0;
    for (const r of this.ranks.values()) if (r.ready) n++;
    return n;
  }

  // ---- commands -------------------------------------------------------------------------
  /** Sends one command to one rank; resolves with its result, rejects with CommandError or a failure. */
  request(rank: number, name: string, args: Record<string, unknown> = {}): Promise<unknown> {
    if (this.failure) return Promise.reject(this.failure);
    if (this.closed || this.stopping) return Promise.reject(new RunClosedError(`command '${name}' on rank ${rank}`));
    const st = this.ranks.get(rank);
    if (!st?.ready) return Promise.reject(new Error(`rank ${rank} is not ready`));
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { rank, name, resolve, reject });
      this.enqueue(rank, { type: "command", id, name, args }, true);
    });
  }

  /** Sends a command to every rank; resolves with the results in rank order. */
  async broadcast(name: string, args: Record<string, unknown> = {}): Promise<unknown[]> {
    const settled = await Promise.allSettled([...Array(this.worldSize).keys()].map((r) => this.request(r, name, args)));
    const failure = settled.find((s) => s.status === "rejected" && !(s.reason instanceof CommandError));
    if (failure) throw (failure as PromiseRejectedResult).reason;
    const errors = settled.flatMap((s) => (s.status === "rejected" ? (s.reason as CommandError).errors : []));
    if (errors.length) throw new CommandError(name, errors);
    return settled.map((s) => (s as PromiseFulfilledResult<unknown>).value);
  }

  // ---- sending ------------------------------------------------------------------------
  private enqueue(rank: number, msg: ControllerMessage, critical: boolean): void {
    const st = this.ranks.get(rank);
    if (!st) return;
    this.sendRaw(st.routingId, msg, rank, critical);
  }

  private sendRaw(to: Buffer, msg: ControllerMessage, rank: number | null, critical: boolean): void {
    this.sendQueue.push({ to, frame: encode(msg), rank, critical });
    if (!this.sending) void this.pump();
  }

  private async pump(): Promise<void> {
    this.sending = true;
    try {
      while (this.sendQueue.length && !this.closed) {
        const item = this.sendQueue.shift()!;
        try {
          await this.sock.send([item.to, item.frame]);
        } catch (e) {
          const code = (e as { code?: string }).code;
          if (item.rank === null || this.closed) continue; // a reject to a stray peer, or shutting down
          if (code === "EHOSTUNREACH") {
            this.rankGone(item.rank, "disconnected");
          } else if (code === "EAGAIN" && item.critical) {
            this.fault(new RankFailure(
              `rank ${item.rank} is not reading its messages (its queue is full)`, item.rank, "unresponsive",
              { pid: this.ranks.get(item.rank)?.hello.pid }));
          }
          // a dropped heartbeat to a slow rank is harmless: its deadline check is ours
        }
      }
    } finally {
      this.sending = false;
    }
  }

  private rankGone(rank: number, why: string): void {
    const st = this.ranks.get(rank);
    if (!st || this.closed || this.stopping || this.failure) return;
    const report = () => this.fault(new RankFailure(
      `rank ${rank} (pid ${st.hello.pid} on ${st.hello.host}) ${why}` + (st.left ? ` after saying bye (${st.left})` : ""),
      rank, "disconnected", { pid: st.hello.pid }));
    // For local ranks the process watcher gives the better report (exit code or signal and
    // stderr), and its news can trail the socket's by a few hundred ms: give it a second.
    if (this.opts.detectDisconnects ?? true) report();
    else setTimeout(report, 1000).unref();
  }

  /** On a ZeroMQ disconnect (which does not say who), find out which rank went away. */
  private probeRanks(): void {
    if (this.closed) return;
    for (const [rank] of this.ranks) this.enqueue(rank, { type: "heartbeat", seq: this.hbSeq }, false);
  }

  // ---- heartbeats ----------------------------------------------------------------------
  private tick(): void {
    const now = Date.now();
    const stalled = now - this.lastTick > 2 * this.heartbeatIntervalMs;
    this.lastTick = now;
    this.hbSeq++;
    for (const [rank, st] of this.ranks) {
      if (!st.ready) continue;
      this.enqueue(rank, { type: "heartbeat", seq: this.hbSeq }, false);
      // If our own event loop stalled, messages may be waiting unread: do not blame the ranks.
      if (stalled) {
        st.lastSeen = Math.max(st.lastSeen, now - this.heartbeatIntervalMs);
        continue;
      }
      const silent = now - st.lastSeen;
      if (silent > this.heartbeatTimeoutMs && !this.failure && !this.closed && !this.stopping) {
        this.fault(new RankFailure(
          `rank ${rank} (pid ${st.hello.pid} on ${st.hello.host}) sent nothing for ${(silent / 1000).toFixed(1)} s ` +
          `(heartbeat deadline ${(this.heartbeatTimeoutMs / 1000).toFixed(1)} s)` +
          (this.pendingFor(rank).length ? `; it was running '${this.pendingFor(rank).join("', '")}'` : ""),
          rank, "unresponsive", { pid: st.hello.pid }));
      }
    }
  }

  // ---- receiving -----------------------------------------------------------------------
  private async receiveLoop(): Promise<void> {
    while (!this.closed) {
      let frames: Buffer[];
      try {
        frames = await this.sock.receive();
      } catch (e) {
        if (this.closed) return;
        this.protocolError("socket", `receive failed: ${(e as Error).message}`);
        continue;
      }
      try {
        this.handleFrames(frames);
      } catch (e) {
        // A bug in a handler must not kill the receive loop.
        this.protocolError("controller", `internal error while handling a message: ${(e as Error).stack ?? e}`);
      }
    }
  }

  private handleFrames(frames: Buffer[]): void {
    const id = frames[0];
    const source = printable(id);
    if (frames.length !== 2) {
      this.protocolError(source, `expected 1 message frame, got ${frames.length - 1}`, id);
      return;
    }
    let msg: RankMessage;
    try {
      msg = decode(frames[1], this.maxMessageBytes);
    } catch (e) {
      if (!(e instanceof ProtocolError)) throw e;
      this.protocolError(source, e.message, id);
      return;
    }
    const rank = /^rank-(\d+)$/.exec(source);
    const st = rank ? this.ranks.get(Number(rank[1])) : undefined;
    if (msg.type === "hello") return this.handleHello(id, source, msg);
    if (!st || !st.routingId.equals(id)) {
      this.protocolError(source, `'${msg.type}' message before a handshake`);
      this.sendRaw(id, { type: "reject", reason: "send 'hello' first" }, null, false);
      return;
    }
    st.lastSeen = Date.now();
    const r = st.hello.rank;
    switch (msg.type) {
      case "ready":
        st.ready = {
          rank: r, localRank: st.hello.local_rank, pid: st.hello.pid, host: st.hello.host, python: st.hello.python,
          torch: st.hello.torch, device: msg.device, backend: msg.backend, commands: msg.commands,
        };
        if (this.readyCount() === this.worldSize) {
          for (const w of this.joinWaiters.splice(0)) w.resolve();
        }
        return;
      case "reply":
        return this.handleReply(r, msg);
      case "event":
        return this.handleEvent(st, msg);
      case "events":
        for (const item of msg.items) this.handleEvent(st, item);
        return;
      case "heartbeat":
        st.stats.lastHeartbeatSeq = msg.seq;
        st.stats.dropped = msg.dropped;
        st.stats.busy = msg.busy;
        return;
      case "bye":
        st.left = msg.reason;
        if (!this.closed && !this.stopping && !this.failure && msg.reason !== "shutdown") {
          this.fault(new RankFailure(`rank ${r} left the run: ${msg.reason}`, r, "left", { pid: st.hello.pid }));
        }
        return;
      case "protocol_error":
        this.protocolError(`rank ${r}`, `the rank rejected a message from the controller: ${msg.message}`);
        return;
    }
  }

  private handleHello(id: Buffer, source: string, h: Hello): void {
    const reject = (reason: string) => {
      this.protocolError(source, `handshake rejected: ${reason}`);
      this.sendRaw(id, { type: "reject", reason }, null, false);
    };
    if (h.v !== PROTOCOL_VERSION) {
      return reject(`protocol version mismatch: the controller speaks version ${PROTOCOL_VERSION}, the rank sent version ${h.v}`);
    }
    if (!tokenMatches(h.token, this.token)) return reject("wrong token: this rank does not belong to this run");
    if (h.world_size !== this.worldSize) {
      return reject(`world size mismatch: the run has ${this.worldSize} ranks, the rank says ${h.world_size}`);
    }
    if (h.rank < 0 || h.rank >= this.worldSize) return reject(`rank ${h.rank} is outside 0..${this.worldSize - 1}`);
    if (source !== `rank-${h.rank}`) return reject(`routing id '${source}' does not match rank ${h.rank} (expected 'rank-${h.rank}')`);
    const existing = this.ranks.get(h.rank);
    if (existing && existing.hello.pid !== h.pid) {
      return reject(`rank ${h.rank} has already joined (pid ${existing.hello.pid})`);
    }
    this.ranks.set(h.rank, {
      hello: h, routingId: Buffer.from(id), ready: null, lastSeen: Date.now(), left: null,
      stats: { events: 0, dropped: 0, lastHeartbeatSeq: 0, busy: null },
    });
    const dist = this.opts.dist;
    const welcome: Welcome = {
      type: "welcome", v: PROTOCOL_VERSION,
      heartbeat_interval_s: this.heartbeatIntervalMs / 1000, heartbeat_timeout_s: this.heartbeatTimeoutMs / 1000,
      max_message_bytes: this.maxMessageBytes, imports: this.opts.imports ?? [],
      dist: dist ? { backend: dist.backend, device: dist.device, timeout_s: dist.timeoutS ?? 300 } : null,
    };
    this.enqueue(h.rank, welcome, true);
  }

  private handleReply(rank: number, msg: Reply): void {
    const p = this.pending.get(msg.id);
    if (!p && this.abandoned.delete(msg.id)) return; // a rank finishing what we gave up on
    if (!p || p.rank !== rank) {
      this.protocolError(`rank ${rank}`, `reply to unknown request #${msg.id}`);
      return;
    }
    this.pending.delete(msg.id);
    if (msg.ok) p.resolve(msg.result);
    else p.reject(new CommandError(p.name, [{ rank, ...msg.error! }]));
  }

  private handleEvent(st: RankState, msg: { kind: string; type?: string; [field: string]: unknown }): void {
    const r = st.hello.rank;
    st.stats.events++;
    if (msg.kind === "error" && msg.fatal === true) {
      this.fault(new RankFailure(`rank ${r} failed to start: ${String(msg.message)}`, r, "startup",
        { pid: st.hello.pid, traceback: typeof msg.traceback === "string" ? msg.traceback : undefined }));
    }
    if (!this.eventListeners.length) return;
    // The decoded map is ours alone: label it in place rather than copying (this is the hot path).
    delete msg.type;
    const ev = msg as RankEvent;
    ev.rank = r;
    for (const fn of this.eventListeners) fn(ev);
  }

  private protocolError(source: string, message: string, replyTo?: Buffer): void {
    this.protocolErrors++;
    for (const fn of this.protocolErrorListeners) fn(source, message);
    if (replyTo && !this.closed) this.sendRaw(replyTo, { type: "protocol_error", message }, null, false);
  }

  // ---- faults and shutdown ------------------------------------------------------------
  /** Records the first fault, fails every pending request with it and tells the listeners. */
  fault(fault: RankFailure): void {
    if (this.failure || this.closed || this.stopping) return;
    const f = this.opts.enrichFault ? this.opts.enrichFault(fault) : fault;
    this.failure = f;
    for (const [id, p] of this.pending) {
      this.pending.delete(id);
      this.abandoned.add(id);
      p.reject(f);
    }
    for (const w of this.joinWaiters.splice(0)) w.reject(f);
    for (const fn of this.faultListeners) fn(f);
  }

  get failed(): Error | null { return this.failure; }

  /** Names of the commands a rank is running (sent, not yet answered). */
  pendingFor(rank: number): string[] {
    return [...this.pending.values()].filter((p) => p.rank === rank).map((p) => p.name);
  }

  /** Asks every rank that joined to exit; `reason` says why when the run failed. */
  shutdownRanks(reason?: string): void {
    this.stopping = true;
    for (const [id, p] of this.pending) {
      this.pending.delete(id);
      this.abandoned.add(id);
      p.reject(new RunClosedError(`command '${p.name}' on rank ${p.rank}`));
    }
    for (const w of this.joinWaiters.splice(0)) w.reject(new RunClosedError("the ranks' start-up"));
    for (const [rank] of this.ranks) this.enqueue(rank, reason ? { type: "shutdown", reason } : { type: "shutdown" }, false);
  }

  /**
   * Asks every rank to stop its running command at the command's next safe point (the training
   * loop checks after each step). The command still replies; nothing is rejected here.
   */
  cancelCommands(): void {
    for (const [rank] of this.ranks) this.enqueue(rank, { type: "cancel" }, false);
  }

  /** Resolves when every queued message has been handed to ZeroMQ (or maxMs passed). */
  async flush(maxMs = 500): Promise<void> {
    const end = Date.now() + maxMs;
    while ((this.sendQueue.length || this.sending) && Date.now() < end) await new Promise((r) => setTimeout(r, 5));
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    if (this.hbTimer) clearInterval(this.hbTimer);
    const err = this.failure ?? new Error("the controller closed");
    for (const [id, p] of this.pending) {
      this.pending.delete(id);
      this.abandoned.add(id);
      p.reject(err);
    }
    for (const w of this.joinWaiters.splice(0)) w.reject(err);
    this.sock.close();
  }
}

function tokenMatches(given: string, expected: string): boolean {
  const a = Buffer.from(given);
  const b = Buffer.from(expected);
  return a.length === b.length && timingSafeEqual(a, b);
}

function printable(id: Buffer): string {
  const s = id.toString("utf8");
  return /^[\x20-\x7e]{1,64}$/.test(s) ? s : `peer 0x${id.subarray(0, 16).toString("hex")}`;
}
