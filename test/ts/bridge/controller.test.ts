// The controller stays up through bad input from stray peers, binds loopback by default,
// and only lets ranks with this run's token join.
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Dealer } from "zeromq";
import { checkBindAddress, Controller, encode, PROTOCOL_VERSION, RankFailure } from "../../../src/bridge/index.ts";
import { decodeValue } from "../../../src/bridge/codec.ts";
import { launchQuiet, processesOfRun } from "./helpers.ts";

type Run = Awaited<ReturnType<typeof launchQuiet>>;
let run: Run;
const protocolErrors: string[] = [];

beforeAll(async () => {
  run = await launchQuiet({ worldSize: 1, maxMessageBytes: 64 * 1024, onProtocolError: (s, m) => protocolErrors.push(`${s}: ${m}`) });
});
afterAll(async () => {
  await run?.close();
  expect(processesOfRun(run.controller.token)).toEqual([]);
});

async function stray(routingId: string) {
  const d = new Dealer({ linger: 0, routingId, receiveTimeout: 3000 });
  d.connect(run.controller.endpoint);
  return {
    send: (frames: Buffer | Buffer[]) => d.send(frames),
    next: async () => decodeValue((await d.receive())[0]) as Record<string, unknown>,
    close: () => d.close(),
  };
}

const hello = (over: Record<string, unknown>) => encode({
  type: "hello", v: PROTOCOL_VERSION, token: run.controller.token, rank: 0, world_size: 1, local_rank: 0,
  pid: 4242, host: "stray", python: "3", torch: "2", ...over,
});

describe("controller under bad input", () => {
  it("answers each bad frame with a clear error and keeps serving the run", async () => {
    const s = await stray("stray-1");
    const cases: Array<[Buffer | Buffer[], string, RegExp]> = [
      [Buffer.from([0xc1, 0xff, 0x00]), "protocol_error", /malformed frame/],
      [encode({ type: "bogus" }), "protocol_error", /unknown message type 'bogus'/],
      [[encode({ type: "bye", reason: "x" }), Buffer.from("extra")], "protocol_error", /expected 1 message frame, got 2/],
      [encode({ type: "event", kind: "metric", pad: "x".repeat(70_000) }), "protocol_error", /exceeds the limit of 65536 bytes/],
      [encode({ type: "heartbeat", seq: 1, busy: null, dropped: 0, events: 0 }), "reject", /send 'hello' first/],
      [hello({ v: PROTOCOL_VERSION + 1 }), "reject", /protocol version mismatch: the controller speaks version 1, the rank sent version 2/],
      [hello({ token: "0".repeat(32) }), "reject", /wrong token/],
    ];
    for (const [frame, type, why] of cases) {
      await s.send(frame);
      const answer = await s.next();
      expect(answer.type).toBe(type);
      expect(String(answer.reason ?? answer.message)).toMatch(why);
    }
    s.close();
    const results = (await run.broadcast("ping", { seq: 5 })) as Array<{ all_reduce: { ok: boolean } }>;
    expect(results[0].all_reduce.ok).toBe(true);
    expect(run.failure).toBeNull();
    expect(protocolErrors.some((e) => e.startsWith("stray-1: unknown message type"))).toBe(true);
  });

  it("a stray process cannot join or take a rank's place", async () => {
    const t = await stray("rank-0-imposter");
    await t.send(hello({ token: "guess" }));
    expect((await t.next()).reason).toMatch(/wrong token/);
    // Even with the token, a peer must use the routing id of the rank it claims to be.
    await t.send(hello({}));
    expect((await t.next()).reason).toMatch(/routing id 'rank-0-imposter' does not match rank 0/);
    t.close();
    expect(run.ranks.map((r) => r.pid)).toEqual([run.processes[0].pid]);
  });

  it("survives 2,000 random and garbled frames from a stray peer", async () => {
    const s = await stray("fuzzer");
    const before = run.controller.protocolErrors;
    let seed = 12345;
    const rand = () => ((seed = (seed * 1103515245 + 12345) & 0x7fffffff) / 0x7fffffff);
    const good = encode({ type: "event", kind: "metric", name: "x", value: 1 });
    for (let i = 0; i < 2000; i++) {
      const b = i % 2 ? Buffer.from(good) : Buffer.alloc(Math.floor(rand() * 64));
      for (let j = 0; j < b.length; j++) if (i % 2 === 0 || rand() < 0.2) b[j] = Math.floor(rand() * 256);
      await s.send(b);
    }
    // Every frame from a peer without a handshake is one protocol error; wait for all of them.
    const end = Date.now() + 20_000;
    while (run.controller.protocolErrors - before < 2000 && Date.now() < end) await new Promise((r) => setTimeout(r, 20));
    s.close();
    expect(run.controller.protocolErrors - before).toBe(2000);
    const results = (await run.broadcast("ping", { seq: 6 })) as Array<{ all_reduce: { ok: boolean } }>;
    expect(results[0].all_reduce.ok).toBe(true);
    expect(run.failure).toBeNull();
  });
});

describe("binding and tokens", () => {
  it("binds loopback by default and refuses other addresses without allowRemote", async () => {
    expect(run.controller.endpoint).toMatch(/^tcp:\/\/127\.0\.0\.1:\d+$/);
    expect(() => checkBindAddress("tcp://0.0.0.0:5555", false)).toThrow(/refusing to bind tcp:\/\/0\.0\.0\.0:5555.*--allow-remote/);
    expect(() => checkBindAddress("tcp://10.1.2.3:5555", false)).toThrow(/not a loopback address/);
    expect(() => checkBindAddress("tcp://0.0.0.0:5555", true)).not.toThrow();
    expect(() => checkBindAddress("tcp://127.0.0.1:0", false)).not.toThrow();
    expect(() => checkBindAddress("tcp://127.0.0.1:99999", false)).toThrow(/port 99999 is out of range/);
    const c = new Controller({ worldSize: 1, bind: "tcp://0.0.0.0:0" });
    await expect(c.start()).rejects.toThrow(/--allow-remote/);
    c.close();
  });

  it("gives every run its own random token", () => {
    const a = new Controller({ worldSize: 1 });
    const b = new Controller({ worldSize: 1 });
    expect(a.token).toMatch(/^[0-9a-f]{32}$/);
    expect(a.token).not.toBe(b.token);
    expect(a.token).not.toBe(run.controller.token);
    a.close();
    b.close();
  });
});

describe("late replies", () => {
  it("rejects a reply to a request it never sent, but not one it gave up on (a fault, a shutdown)", async () => {
    const errors: string[] = [];
    const c = new Controller({ worldSize: 1, dist: null, heartbeatIntervalMs: 100, heartbeatTimeoutMs: 30_000 });
    c.onProtocolError((s, m) => errors.push(`${s}: ${m}`));
    await c.start();
    const d = new Dealer({ linger: 0, routingId: "rank-0", receiveTimeout: 5000 });
    d.connect(c.endpoint);
    const next = async (type: string) => {
      for (;;) {
        const m = decodeValue((await d.receive())[0]) as Record<string, unknown>;
        if (m.type === type) return m;
      }
    };
    try {
      await d.send(encode({ type: "hello", v: PROTOCOL_VERSION, token: c.token, rank: 0, world_size: 1, local_rank: 0,
        pid: 4242, host: "fake", python: "3", torch: "2" }));
      await next("welcome");
      await d.send(encode({ type: "ready", commands: ["work"], device: "cpu", backend: null }));
      await c.waitForRanks(5000);
      const pending = c.request(0, "work");
      const { id } = (await next("command")) as { id: number };
      // While the run goes on, a reply to an id never sent is an error, and the request stays pending.
      await d.send(encode({ type: "reply", id: id + 100, ok: true, result: null }));
      const end = Date.now() + 5000;
      while (!errors.length && Date.now() < end) await new Promise((r) => setTimeout(r, 10));
      expect(errors).toEqual([`rank 0: reply to unknown request #${id + 100}`]);
      // A fault elsewhere fails the request; the rank, being torn down, still answers it: expected, not printed.
      c.fault(new RankFailure("rank 1 was killed (in the test)", 1, "exited"));
      await expect(pending).rejects.toThrow(/rank 1 was killed/);
      await d.send(encode({ type: "reply", id, ok: true, result: null }));
      await d.send(encode({ type: "heartbeat", seq: 1, busy: null, dropped: 0, events: 0 })); // handled after the reply
      const hbEnd = Date.now() + 5000;
      while (c.rankStats(0)!.lastHeartbeatSeq !== 1 && Date.now() < hbEnd) await new Promise((r) => setTimeout(r, 10));
      expect(c.rankStats(0)!.lastHeartbeatSeq).toBe(1);
      expect(errors).toHaveLength(1);
    } finally {
      d.close();
      c.close();
    }
  });
});
