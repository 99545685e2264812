"""The bytes an expert-parallel all-to-all puts on the wire: the one model, shared with
TypeScript (src/plan/wire.ts, the same functions; test/ts/plan/wire.test.ts holds the
two to the same numbers). The emulated interconnect delays each comm op by it, and the
benchmarks set their emulated bandwidth from it."""

from __future__ import annotations

import math

__all__ = ["expert_capacity", "a2a_rows", "wire_bytes"]


def expert_capacity(tokens: int, topk: int, experts: int, capacity_factor: float | None) -> int | None:
    """Slots per expert for `tokens` tokens: ceil((tokens x topk / E) x factor), in Megatron's
    order of operations (`get_capacity`), so a value that rounds to just above an integer rounds
    the same way in both; None when dropless (no factor)."""
    if capacity_factor is None:
        return None
    return math.ceil((tokens * topk / experts) * capacity_factor)


def a2a_rows(tokens: int, topk: int, experts: int, capacity_factor: float | None) -> int:
    """Rows of a chunk's dispatch (and combine) buffer: every token's top-k slots when dropless,
    else E x capacity rows."""
    cap = expert_capacity(tokens, topk, experts, capacity_factor)
    return tokens * topk if cap is None else experts * cap


def wire_bytes(buffer_bytes: float, world: int) -> float:
    """Bytes a rank sends for a buffer of `buffer_bytes` among `world` ranks: all but its own
    1/world share."""
    return buffer_bytes * (world - 1) / world
