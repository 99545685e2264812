// msgpack framing for the controller. msgpackr must not use its record extension (Python
// cannot read it), and int64 values that do not fit a double arrive as BigInt.
import { Packr } from "msgpackr";
import {
  DEFAULT_MAX_MESSAGE_BYTES, ProtocolError, validateRankMessage,
  type ControllerMessage, type RankMessage,
} from "./protocol.ts";

// "auto" (numbers when safe, BigInt beyond 2^53) is supported at runtime but missing from
// msgpackr's type declarations, hence the cast.
const packr = new Packr({ useRecords: false, int64AsType: "auto" as "bigint", mapsAsObjects: true });

export function encode(msg: ControllerMessage | Record<string, unknown> | unknown[]): Buffer {
  // pack() returns a view of msgpackr's working buffer: copy before handing it to ZeroMQ.
  return Buffer.from(packr.pack(msg));
}

/** Decodes any msgpack value (no protocol check), throwing ProtocolError on garbage. */
export function decodeValue(frame: Uint8Array, maxBytes = DEFAULT_MAX_MESSAGE_BYTES): unknown {
  if (frame.length > maxBytes) {
    throw new ProtocolError(`message of ${frame.length} bytes exceeds the limit of ${maxBytes} bytes`);
  }
  if (frame.length === 0) throw new ProtocolError("malformed frame: empty");
  try {
    return packr.unpack(frame);
  } catch (e) {
    throw new ProtocolError(`malformed frame (${frame.length} bytes): ${(e as Error).message}`);
  }
}

/** Decodes and validates one rank -> controller frame, or throws ProtocolError. */
export function decode(frame: Uint8Array, maxBytes = DEFAULT_MAX_MESSAGE_BYTES): RankMessage {
  return validateRankMessage(decodeValue(frame, maxBytes));
}
