// The controller's decoder: valid messages pass, everything else is a ProtocolError (never
// another exception, never a hang), including 10,000+ random and mutated frames.
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { decode, decodeValue, encode, ProtocolError, PROTOCOL_VERSION } from "../../../src/bridge/index.ts";

const hello = {
  type: "hello", v: PROTOCOL_VERSION, token: "t", rank: 0, world_size: 2, local_rank: 0,
  pid: 1, host: "h", python: "3.11", torch: "2.13",
};
const valid = [
  hello,
  { type: "ready", commands: ["ping"], device: "cpu", backend: "gloo" },
  { type: "reply", id: 7, ok: true, result: { x: [1, 2] }, elapsed_s: 0.1 },
  { type: "reply", id: 7, ok: false, error: { type: "ValueError", message: "m", traceback: "tb" } },
  { type: "event", kind: "metric", name: "loss", value: 1.5, step: 3 },
  { type: "events", items: [{ kind: "metric", name: "loss", value: 1.5 }, { kind: "log", level: "info", message: "m" }] },
  { type: "heartbeat", seq: 1, busy: null, dropped: 0, events: 10 },
  { type: "bye", reason: "shutdown" },
  { type: "protocol_error", message: "x" },
];

describe("codec", () => {
  it("round-trips every message type", () => {
    for (const m of valid) expect(decode(encode(m))).toEqual(m);
  });

  it("keeps 64-bit integers exact (BigInt beyond 2^53) and small ones as numbers", () => {
    const v = decodeValue(encode({ type: "x", big: 2n ** 60n + 1n, small: 42 })) as Record<string, unknown>;
    expect(v.big).toBe(2n ** 60n + 1n);
    expect(v.small).toBe(42);
  });

  it.each([
    [Buffer.from([0xc1]), /expected a map/],
    [Buffer.alloc(0), /empty/],
    [Buffer.from([0x92, 1, 2, 3]), /malformed frame/],
    [encode({ kind: "metric" }), /no string field 'type'/],
    [encode({ type: "launch_missiles" }), /unknown message type 'launch_missiles'/],
    [encode({ ...hello, rank: "zero" }), /'hello' message: field 'rank' must be an integer, got string zero/],
    [encode({ type: "reply", id: 1, ok: false }), /a failed reply needs error/],
    [encode({ type: "heartbeat", seq: 2n ** 60n, busy: null, dropped: 0, events: 0 }), /field 'seq' must be an integer, got a 64-bit integer/],
    [encode([1, 2, 3]), /expected a map, got a list/],
    [encode({ type: "events", items: [{ kind: "metric" }, { name: "no kind" }] }), /field 'items' must be a list of maps, each with a string 'kind'/],
  ])("rejects %s", (frame, why) => {
    expect(() => decode(frame)).toThrow(ProtocolError);
    expect(() => decode(frame)).toThrow(why);
  });

  it("rejects an oversize message before decoding it", () => {
    const big = encode({ type: "event", kind: "log", message: "x".repeat(5000) });
    expect(() => decode(big, 4096)).toThrow(/message of \d+ bytes exceeds the limit of 4096 bytes/);
  });

  it("fuzz: 10,000 random frames and 10,000 mutations of valid frames only ever raise ProtocolError", () => {
    const onlyProtocolErrors = (frame: Uint8Array) => {
      try {
        decode(frame, 1 << 20);
      } catch (e) {
        if (!(e instanceof ProtocolError)) throw e;
      }
    };
    fc.assert(fc.property(fc.uint8Array({ maxLength: 256 }), (b) => onlyProtocolErrors(b)), { numRuns: 10_000, seed: 1 });
    const seeds = valid.map((m) => new Uint8Array(encode(m)));
    const mutated = fc
      .tuple(
        fc.integer({ min: 0, max: seeds.length - 1 }),
        fc.array(fc.tuple(fc.nat(), fc.integer({ min: 0, max: 255 }), fc.constantFrom("set", "insert", "delete")), { minLength: 1, maxLength: 6 }),
        fc.option(fc.nat(), { nil: undefined }),
      )
      .map(([i, edits, cut]) => {
        const b = [...seeds[i]];
        for (const [pos, byte, op] of edits) {
          const at = pos % (b.length + 1);
          if (op === "set" && b.length) b[at % b.length] = byte;
          else if (op === "insert") b.splice(at, 0, byte);
          else if (b.length) b.splice(at % b.length, 1);
        }
        return new Uint8Array(cut === undefined ? b : b.slice(0, cut % (b.length + 1)));
      });
    fc.assert(fc.property(mutated, (b) => onlyProtocolErrors(b)), { numRuns: 10_000, seed: 2 });
  });
});
