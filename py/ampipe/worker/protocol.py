"""The wire protocol between the TypeScript controller and a rank (docs/protocol.md).

One msgpack map per ZeroMQ frame, with a ``type`` field. This module only encodes, decodes
and validates; it does not import pyzmq, so it can be tested (and fuzzed) on its own.
"""

from __future__ import annotations

from typing import Any

import msgpack

PROTOCOL_VERSION = 1
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# Messages the controller sends to a rank, and the fields each must carry (name -> types).
_CONTROLLER_MESSAGES: dict[str, dict[str, tuple[type, ...]]] = {
    "welcome": {"v": (int,), "heartbeat_interval_s": (int, float), "heartbeat_timeout_s": (int, float)},
    "reject": {"reason": (str,)},
    "command": {"id": (int,), "name": (str,), "args": (dict, type(None))},
    "heartbeat": {"seq": (int,)},
    "shutdown": {},
    "cancel": {},  # stop the running command at its next safe point (CommandContext.cancel_requested)
    "protocol_error": {"message": (str,)},
}


class ProtocolError(ValueError):
    """A frame that is not a valid message of this protocol version."""


def _to_plain(obj: Any) -> Any:
    """msgpack's fallback: numpy scalars and 0-d tensors by value, arrays and tensors as lists."""
    if hasattr(obj, "item") and getattr(obj, "ndim", getattr(obj, "dim", lambda: None)()) == 0:
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"cannot send a {type(obj).__module__}.{type(obj).__qualname__} over the bridge "
                    "(send numbers, strings, bytes, lists and dicts)")


def encode(msg: dict[str, Any]) -> bytes:
    return msgpack.packb(msg, use_bin_type=True, default=_to_plain)


def decode(frame: bytes, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> dict[str, Any]:
    """Decodes and validates one controller -> rank frame, or raises ProtocolError."""
    if len(frame) > max_bytes:
        raise ProtocolError(f"message of {len(frame)} bytes exceeds the limit of {max_bytes} bytes")
    try:
        msg = msgpack.unpackb(
            frame,
            raw=False,
            strict_map_key=False,
            # ext types are not part of the protocol
            ext_hook=_reject_ext,
        )
    except ProtocolError:
        raise
    except Exception as e:  # msgpack raises several exception types on garbage
        raise ProtocolError(f"malformed frame ({len(frame)} bytes): {type(e).__name__}: {e}") from None
    if not isinstance(msg, dict):
        raise ProtocolError(f"malformed frame: expected a map, got {type(msg).__name__}")
    kind = msg.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("malformed frame: no string field 'type'")
    spec = _CONTROLLER_MESSAGES.get(kind)
    if spec is None:
        raise ProtocolError(f"unknown message type {kind!r}")
    for field, types in spec.items():
        value = msg.get(field)
        # bool is an int subclass; no protocol field is a bool where an int is expected
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            names = "/".join(t.__name__ for t in types)
            raise ProtocolError(f"{kind!r} message: field {field!r} must be {names}, got {type(value).__name__}")
    if kind == "welcome" and msg["v"] != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version mismatch: rank speaks {PROTOCOL_VERSION}, controller sent {msg['v']}")
    return msg


def _reject_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"malformed frame: msgpack extension type {code} is not part of the protocol")
