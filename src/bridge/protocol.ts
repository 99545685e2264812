// The wire protocol, version 1 (docs/protocol.md): one msgpack map per ZeroMQ frame, with a
// `type` field. These types and checks are the controller's half; py/ampipe/worker/protocol.py
// is the rank's.

export const PROTOCOL_VERSION = 1;
export const DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024;

/** A frame that is not a valid message of this protocol version. */
export class ProtocolError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "ProtocolError";
  }
}

// ---- rank -> controller ----------------------------------------------------------------
export interface Hello {
  type: "hello"; v: number; token: string; rank: number; world_size: number; local_rank: number;
  pid: number; host: string; python: string; torch: string;
}
export interface Ready { type: "ready"; commands: string[]; device: string; backend: string | null }
export interface RemoteError { type: string; message: string; traceback: string }
export interface Reply {
  type: "reply"; id: number; ok: boolean; result?: unknown; error?: RemoteError; elapsed_s?: number;
}
export interface RankEventMsg { type: "event"; kind: string; [field: string]: unknown }
/** A batch of events (what a rank streams under load). */
export interface RankEventBatch { type: "events"; items: Array<{ kind: string; [field: string]: unknown }> }
export interface RankHeartbeat { type: "heartbeat"; seq: number; busy: number | null; dropped: number; events: number }
export interface Bye { type: "bye"; reason: string }
export interface PeerProtocolError { type: "protocol_error"; message: string }

export type RankMessage = Hello | Ready | Reply | RankEventMsg | RankEventBatch | RankHeartbeat | Bye | PeerProtocolError;

// ---- controller -> rank ----------------------------------------------------------------
export interface Welcome {
  type: "welcome"; v: number; heartbeat_interval_s: number; heartbeat_timeout_s: number;
  max_message_bytes: number; imports: string[];
  dist: { backend: string; device: string; timeout_s: number } | null;
}
export interface Reject { type: "reject"; reason: string }
export interface CommandMsg { type: "command"; id: number; name: string; args: Record<string, unknown> | null }
export interface ControllerHeartbeat { type: "heartbeat"; seq: number }
/** `reason`: why the run ended when it failed (the rank says what was lost and exits 4); absent on a normal end. */
export interface Shutdown { type: "shutdown"; reason?: string }
/** Asks the running command to stop at its next safe point (a training step): `ctx.cancel_requested`. */
export interface Cancel { type: "cancel" }

export type ControllerMessage = Welcome | Reject | CommandMsg | ControllerHeartbeat | Shutdown | Cancel | PeerProtocolError;

type Check = (v: unknown) => boolean;
const isInt: Check = (v) => typeof v === "number" && Number.isSafeInteger(v);
const isNum: Check = (v) => typeof v === "number" && Number.isFinite(v);
const isStr: Check = (v) => typeof v === "string";
const isBool: Check = (v) => typeof v === "boolean";
// A plain msgpack map: msgpackr also produces class instances (Date, its C1Type, ...) for
// types that are not part of the protocol; those are rejected here.
const isMap: Check = (v) => {
  if (v === null || typeof v !== "object") return false;
  const proto = Object.getPrototypeOf(v);
  return proto === Object.prototype || proto === null;
};
const isStrList: Check = (v) => Array.isArray(v) && v.every((x) => typeof x === "string");
const isEventList: Check = (v) => Array.isArray(v) && v.every((e) => isMap(e) && typeof (e as { kind?: unknown }).kind === "string");
const orNull = (c: Check): Check => (v) => v === null || v === undefined || c(v);
const optional = orNull;

const RANK_FIELDS: Record<string, Record<string, [Check, string]>> = {
  hello: {
    v: [isInt, "an integer"], token: [isStr, "a string"], rank: [isInt, "an integer"],
    world_size: [isInt, "an integer"], local_rank: [isInt, "an integer"], pid: [isInt, "an integer"],
    host: [isStr, "a string"], python: [isStr, "a string"], torch: [isStr, "a string"],
  },
  ready: { commands: [isStrList, "a list of strings"], device: [isStr, "a string"], backend: [orNull(isStr), "a string or nil"] },
  reply: {
    id: [isInt, "an integer"], ok: [isBool, "a boolean"], elapsed_s: [optional(isNum), "a number"],
    error: [optional(isMap), "a map"],
  },
  event: { kind: [isStr, "a string"] },
  events: { items: [isEventList, "a list of maps, each with a string 'kind'"] },
  heartbeat: {
    seq: [isInt, "an integer"], busy: [orNull(isInt), "an integer or nil"],
    dropped: [isInt, "an integer"], events: [isInt, "an integer"],
  },
  bye: { reason: [isStr, "a string"] },
  protocol_error: { message: [isStr, "a string"] },
};

/** Checks that a decoded value is a rank -> controller message; throws ProtocolError if not. */
export function validateRankMessage(msg: unknown): RankMessage {
  if (!isMap(msg)) throw new ProtocolError(`malformed frame: expected a map, got ${describe(msg)}`);
  const m = msg as Record<string, unknown>;
  const type = Object.hasOwn(m, "type") ? m.type : undefined;
  if (typeof type !== "string") throw new ProtocolError("malformed frame: no string field 'type'");
  if (!Object.hasOwn(RANK_FIELDS, type)) throw new ProtocolError(`unknown message type '${truncate(type)}'`);
  for (const [field, [check, what]] of Object.entries(RANK_FIELDS[type])) {
    const v = Object.hasOwn(m, field) ? m[field] : undefined;
    if (!check(v)) throw new ProtocolError(`'${type}' message: field '${field}' must be ${what}, got ${describe(v)}`);
  }
  if (type === "reply" && m.ok === false) {
    const e = m.error as Record<string, unknown> | undefined;
    if (!e || !isStr(e.type) || !isStr(e.message) || !isStr(e.traceback)) {
      throw new ProtocolError("'reply' message: a failed reply needs error {type, message, traceback} strings");
    }
  }
  return m as unknown as RankMessage;
}

function describe(v: unknown): string {
  if (v === null) return "nil";
  if (v === undefined) return "nothing";
  if (Array.isArray(v)) return "a list";
  if (v instanceof Uint8Array) return "bytes";
  if (typeof v === "bigint") return "a 64-bit integer";
  return typeof v === "object" ? "a map" : `${typeof v} ${truncate(String(v))}`;
}

function truncate(s: string, n = 40): string {
  return s.length > n ? `${s.slice(0, n)}...` : s;
}
