"""The rank's decoder: valid controller messages pass, anything else is a ProtocolError."""

import random

import msgpack
import pytest

from ampipe.worker.protocol import PROTOCOL_VERSION, ProtocolError, decode, encode

VALID = [
    {"type": "welcome", "v": PROTOCOL_VERSION, "heartbeat_interval_s": 0.1, "heartbeat_timeout_s": 1,
     "max_message_bytes": 1 << 20, "imports": [], "dist": None},
    {"type": "command", "id": 3, "name": "ping", "args": {"seq": 1}},
    {"type": "command", "id": 4, "name": "echo", "args": None},
    {"type": "heartbeat", "seq": 9},
    {"type": "shutdown"},
    {"type": "reject", "reason": "wrong token"},
    {"type": "protocol_error", "message": "x"},
]


@pytest.mark.parametrize("msg", VALID, ids=[m["type"] for m in VALID])
def test_round_trip(msg):
    assert decode(encode(msg)) == msg


@pytest.mark.parametrize(
    "frame, why",
    [
        (b"\xc1", "malformed frame"),
        (b"", "malformed frame"),
        (msgpack.packb([1, 2]), "expected a map, got list"),
        (msgpack.packb({"kind": 1}), "no string field 'type'"),
        (msgpack.packb({"type": "fire"}), "unknown message type 'fire'"),
        (msgpack.packb({"type": "command", "id": "1", "name": "x", "args": {}}), "field 'id' must be int, got str"),
        (msgpack.packb({"type": "command", "id": True, "name": "x", "args": {}}), "field 'id' must be int, got bool"),
        (msgpack.packb({"type": "welcome", "v": PROTOCOL_VERSION + 1, "heartbeat_interval_s": 1,
                        "heartbeat_timeout_s": 2}), "protocol version mismatch: rank speaks 1, controller sent 2"),
        (msgpack.packb(msgpack.ExtType(5, b"xx")), "extension type 5"),
        (msgpack.packb({"type": "heartbeat", "seq": 1}) + b"\x00", "malformed frame"),
    ],
)
def test_rejects(frame, why):
    with pytest.raises(ProtocolError, match=why):
        decode(frame)


def test_rejects_oversize_before_decoding():
    frame = encode({"type": "protocol_error", "message": "x" * 5000})
    with pytest.raises(ProtocolError, match=r"message of \d+ bytes exceeds the limit of 4096 bytes"):
        decode(frame, max_bytes=4096)


def _only_protocol_errors(frame: bytes) -> None:
    try:
        decode(frame, max_bytes=1 << 20)
    except ProtocolError:
        pass


def test_fuzz_random_and_mutated_frames():
    """10,000 random frames and 10,000 mutations of valid ones: only ProtocolError, no hang."""
    rng = random.Random(1234)
    for _ in range(10_000):
        _only_protocol_errors(bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 128))))
    seeds = [bytearray(encode(m)) for m in VALID]
    for _ in range(10_000):
        b = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 6)):
            op = rng.randrange(3)
            pos = rng.randrange(len(b) + 1)
            if op == 0 and b:
                b[pos % len(b)] = rng.getrandbits(8)
            elif op == 1:
                b.insert(pos, rng.getrandbits(8))
            elif b:
                del b[pos % len(b)]
        if rng.random() < 0.2:
            b = b[: rng.randrange(len(b) + 1)]
        _only_protocol_errors(bytes(b))
