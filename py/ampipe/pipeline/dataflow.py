"""What each op of a plan hands to which, from the op-kind table (op_kinds.json).

Every kind names the values it writes and, per read, which values of the read kind it takes
(`src/plan/opkinds.ts`). For one pass of one plan, `pass_flows` resolves that into an `OpFlow`
per op: the ``(value, writer chunk)`` pairs it may take, the values it may put, the op ids whose
results it needs (the CPU executor finishes those comm ops first) and the pairs whose last
reader it is (freed once it ran). `Values` holds a step's values; an op sees them through its
`OpIO`, which refuses, naming the op and the value, anything its kind does not declare. So the
executor's handlers (`ops.py`) and the validator read one definition of the dataflow: a value
an op takes is one the validator checked happens before it.

A value written by a whole-sequence op is stored once (chunk ``None``) and read whole by the
ops of every chunk (their rows, or their entry of a per-chunk list, are theirs to pick).
Sequence buffers written in place (K/V, dK/dV: the table's ``buffers``) and the pass's results
(``outputs``) belong to the step, not to this store.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

from .plan import OP_KINDS, Plan, PlanOp, resolved_reads

__all__ = ["OpFlow", "OpIO", "Values", "pass_flows"]

_Key = tuple[str, Optional[int]]  # (value name, the chunk of the op that wrote it; None: whole sequence)


@dataclass(frozen=True)
class OpFlow:
    op: PlanOp
    # (value, writer chunk) pairs the op may take, and per value name the chunks it may take it of
    reads: frozenset[_Key]
    chunks_of: Mapping[str, tuple[int | None, ...]]
    writes: frozenset[str]
    needs: tuple[str, ...]  # ids of the ops whose results it reads (plan.data_needs)
    release: tuple[_Key, ...]  # values whose last reader it is


def pass_flows(plan: Plan, forward: bool) -> dict[str, OpFlow]:
    """The `OpFlow` of every op of one pass, by op id."""
    ops = plan.forward if forward else plan.backward
    by_kind = {(op.kind, op.chunk): op.id for op in ops}
    reads: dict[str, dict[_Key, None]] = {}
    needs: dict[str, dict[str, None]] = {}
    last: dict[_Key, str] = {}
    for op in ops:  # list order: a later reader replaces an earlier one as the last
        keys: dict[_Key, None] = {}
        ids: dict[str, None] = {}
        for read, kind, chunk in resolved_reads(plan, op):
            ids[by_kind[(kind, chunk)]] = None
            stored = set(OP_KINDS[kind]["writes"])  # buffers are the step's, not values
            for v in read["values"]:
                if v in stored:
                    keys[(v, chunk)] = None
                    last[(v, chunk)] = op.id
        reads[op.id], needs[op.id] = keys, ids
    release: dict[str, list[_Key]] = {}
    for key, op_id in last.items():
        release.setdefault(op_id, []).append(key)
    out = {}
    for op in ops:
        chunks_of: dict[str, tuple[int | None, ...]] = {}
        for v, c in reads[op.id]:
            chunks_of[v] = (*chunks_of.get(v, ()), c)
        out[op.id] = OpFlow(op, frozenset(reads[op.id]), chunks_of,
                            frozenset(OP_KINDS[op.kind]["writes"]), tuple(needs[op.id]),
                            tuple(release.get(op.id, ())))
    return out


class _Missing:
    pass


_MISSING: Any = _Missing()


class Values:
    """The values of one pass of a step, keyed ``(name, writer chunk)``."""

    __slots__ = ("data",)

    def __init__(self) -> None:
        self.data: dict[_Key, Any] = {}

    def io(self, flow: OpFlow) -> "OpIO":
        return OpIO(flow, self.data)

    def clear(self) -> None:
        self.data.clear()


class OpIO:
    """One op's view of the step's values: what its kind reads and writes, nothing else."""

    __slots__ = ("flow", "op", "chunk", "_data")

    def __init__(self, flow: OpFlow, data: dict[_Key, Any]) -> None:
        self.flow, self.op, self.chunk, self._data = flow, flow.op, flow.op.chunk, data

    def _key(self, name: str, chunk: Any) -> _Key:
        if chunk is _MISSING:
            chunks = self.flow.chunks_of.get(name, ())
            if len(chunks) != 1:
                raise self._undeclared(name, "read", f"say which chunk of {list(chunks)}" if chunks else "")
            return name, chunks[0]
        if (name, chunk) not in self.flow.reads:
            raise self._undeclared(name, "read", f"chunk {chunk}")
        return name, chunk

    def take(self, name: str, chunk: Any = _MISSING) -> Any:
        """The value `name` (of the writer's chunk `chunk`; omitted: the one chunk it reads)."""
        key = self._key(name, chunk)
        try:
            return self._data[key]
        except KeyError:
            raise RuntimeError(f"op '{self.op.id}': {name} of chunk {key[1]} was not written before it "
                               f"(the validator orders its writer first)") from None

    def put(self, name: str, value: Any) -> None:
        if name not in self.flow.writes:
            raise self._undeclared(name, "write", "")
        self._data[(name, self.chunk)] = value

    def release(self) -> None:
        """Drop the values whose last reader this op is."""
        for key in self.flow.release:
            self._data.pop(key, None)

    def _undeclared(self, name: str, what: str, detail: str) -> RuntimeError:
        declared = sorted(self.flow.writes) if what == "write" else sorted(self.flow.chunks_of)
        return RuntimeError(f"op '{self.op.id}' ({self.op.kind}) would {what} {name!r}"
                            f"{' (' + detail + ')' if detail else ''}, which op_kinds.json does not "
                            f"declare for it (it {what}s {declared})")
