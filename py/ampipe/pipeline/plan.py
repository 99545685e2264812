"""Loading and validating ampipe plans (docs/contracts.md section 2, format version 3).

A plan is data written by the TypeScript planner. Nothing runs until `validate_plan` has
checked that every op's data dependencies happen-before it (through `deps` edges and the
order of ops on one stream), so a wrong schedule is an error that names the op, never a
silent race or a wrong gradient.

The op kinds — their pass, stream kind, whole-sequence rule, reads (data needs), backward and
whether they differentiate parameters — come from ``op_kinds.json``, written from the
TypeScript table (src/plan/opkinds.ts) by scripts/export-schemas.ts, so both validators
read one definition.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PLAN_FORMAT = "ampipe.plan"
# The op-kind table (src/plan/opkinds.ts), for the plan version it describes.
OP_KINDS: dict[str, dict[str, Any]] = json.loads(
    (Path(__file__).with_name("op_kinds.json")).read_text())["kinds"]
SUPPORTED_VERSIONS = (3,)
# What changed, for a plan of an older version (rejected: its op lists lack an op kind).
_OLD_VERSIONS = {1: "version 2 added the per-chunk 'counts' op (the count exchange before each "
                    "dispatch) and 'capacity_scope'",
                 2: "version 3 added dims.moe_shared_expert_intermediate_size and the per-chunk "
                    "'shared'/'shared_bwd' ops of a shared expert"}
CAPACITY_SCOPES = ("chunk", "sequence")

FORWARD_KINDS = tuple(k for k, v in OP_KINDS.items() if v["pass"] == "forward")
BACKWARD_KINDS = tuple(k for k, v in OP_KINDS.items() if v["pass"] == "backward")
# The all-to-alls (and the count exchange before each dispatch): they run on communication
# streams (on CPU: started asynchronously, in list order), every other kind on a compute stream. Keeping collectives
# on comm streams also keeps their order identical on every rank.
COMM_KINDS = frozenset(k for k, v in OP_KINDS.items() if v["stream"] == "comm")
# Forward kinds whose islands differentiate parameters (`LayerAdapter.op_modules`).
PARAM_KINDS = tuple(k for k, v in OP_KINDS.items() if v.get("params"))
STREAM_KINDS = ("compute", "comm")

# dims keys a plan must carry (contracts.md section 2; the shared expert's defaults to null), each
# with the config field it comes from: the dims table (src/plan/dims.ts; `dims.py` uses it).
_DIMS_TABLE = json.loads((Path(__file__).with_name("dims.json")).read_text())
DIM_SOURCES: dict[str, str] = _DIMS_TABLE["dims"]
DIM_KEYS = tuple(DIM_SOURCES)
# The dims the block's input fixes (its shape), not the layer.
INPUT_DIMS: tuple[str, ...] = tuple(_DIMS_TABLE["input"])


class PlanError(ValueError):
    """A plan that cannot be executed; the message names the op or field at fault."""


@dataclass(frozen=True)
class StreamSpec:
    name: str
    kind: str  # "compute" | "comm"


@dataclass(frozen=True)
class PlanOp:
    id: str
    kind: str
    chunk: int | None
    stream: str
    deps: tuple[str, ...] = ()

    @property
    def is_comm(self) -> bool:
        return self.kind in COMM_KINDS


@dataclass(frozen=True)
class Plan:
    version: int
    variant: str
    dims: Mapping[str, Any]
    boundaries: tuple[int, ...]
    chunk_qkv: bool
    streams: tuple[StreamSpec, ...]
    forward: tuple[PlanOp, ...]
    backward: tuple[PlanOp, ...]
    meta: Mapping[str, Any] = field(default_factory=dict)
    # False: one whole-sequence attn/attn_bwd op (the moe-overlap variant; needs chunk_qkv false).
    chunk_attention: bool = True
    # Where a capacity is sized: per chunk (the paper's), or over the whole sequence (exact
    # with the position drop policy; route[c] then needs route[c-1]'s running counts).
    capacity_scope: str = "chunk"

    @property
    def num_chunks(self) -> int:
        return len(self.boundaries) - 1

    @property
    def shared_expert(self) -> bool:
        """Whether the block has a shared expert (the plan has `shared`/`shared_bwd` ops)."""
        return self.dims.get("moe_shared_expert_intermediate_size") is not None

    def has_kind(self, kind: str) -> bool:
        """Whether this plan has ops of `kind` (a shared expert's only with one)."""
        return OP_KINDS[kind].get("requires") != "shared_expert" or self.shared_expert

    def chunk_rows(self, chunk: int) -> tuple[int, int]:
        """[start, end) sequence rows of a chunk."""
        return self.boundaries[chunk], self.boundaries[chunk + 1]

    def stream(self, name: str) -> StreamSpec:
        for s in self.streams:
            if s.name == name:
                return s
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        def op(o: PlanOp) -> dict[str, Any]:
            return {"id": o.id, "kind": o.kind, "chunk": o.chunk, "stream": o.stream,
                    "deps": list(o.deps)}
        return {
            "format": PLAN_FORMAT, "version": self.version, "variant": self.variant,
            "dims": dict(self.dims), "boundaries": list(self.boundaries),
            "chunk_qkv": self.chunk_qkv, "capacity_scope": self.capacity_scope,
            **({} if self.chunk_attention else {"chunk_attention": False}),
            "streams": [{"name": s.name, "kind": s.kind} for s in self.streams],
            "forward": [op(o) for o in self.forward], "backward": [op(o) for o in self.backward],
            "meta": dict(self.meta),
        }


# ---------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------

def load_plan(source: str | Path | Mapping[str, Any], *,
              dims: Mapping[str, Any] | None = None) -> Plan:
    """Parse and validate a plan from a path, a JSON string or a decoded mapping.

    `dims`, when given, are the block's dimensions; a plan whose `dims` disagree is
    rejected (see `check_dims`).
    """
    if isinstance(source, Mapping):
        doc = source
    else:
        text = str(source)
        if isinstance(source, Path) or not text.lstrip().startswith("{"):
            try:
                text = Path(source).read_text()
            except OSError as e:
                raise PlanError(f"cannot read plan file {source}: {e}") from e
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"plan is not valid JSON: {e}") from e
    plan = parse_plan(doc)
    validate_plan(plan)
    if dims is not None:
        check_dims(plan, dims)
    return plan


def _require(doc: Mapping[str, Any], key: str, types: type | tuple[type, ...], where: str) -> Any:
    if key not in doc:
        raise PlanError(f"{where}: missing field '{key}'")
    value = doc[key]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        raise PlanError(f"{where}: field '{key}' has type {type(value).__name__}")
    return value


def _as_tuple(t: type | tuple[type, ...]) -> tuple[type, ...]:
    return t if isinstance(t, tuple) else (t,)


def _parse_op(raw: Any, where: str) -> PlanOp:
    if not isinstance(raw, Mapping):
        raise PlanError(f"{where}: an op must be an object")
    op_id = _require(raw, "id", str, where)
    where = f"{where} op '{op_id}'"
    kind = _require(raw, "kind", str, where)
    chunk = raw.get("chunk", None)
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int)):
        raise PlanError(f"{where}: 'chunk' must be an integer or null")
    stream = _require(raw, "stream", str, where)
    deps = raw.get("deps", [])
    if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
        raise PlanError(f"{where}: 'deps' must be a list of op ids")
    return PlanOp(op_id, kind, chunk, stream, tuple(deps))


def parse_plan(doc: Mapping[str, Any]) -> Plan:
    """Structural parse: fields, types, format and version. `validate_plan` checks the rest."""
    if not isinstance(doc, Mapping):
        raise PlanError("plan: expected a JSON object")
    fmt = doc.get("format")
    if fmt != PLAN_FORMAT:
        raise PlanError(f"plan: unknown format {fmt!r} (expected {PLAN_FORMAT!r})")
    version = doc.get("version")
    if version not in SUPPORTED_VERSIONS:
        why = f"; {_OLD_VERSIONS[version]}: regenerate it with `ampipe plan`" if version in _OLD_VERSIONS else ""
        raise PlanError(f"plan: unsupported version {version!r} "
                        f"(this ampipe reads versions {list(SUPPORTED_VERSIONS)}){why}")
    dims = {"moe_shared_expert_intermediate_size": None, **_require(doc, "dims", Mapping, "plan")}
    boundaries = _require(doc, "boundaries", list, "plan")
    if not all(isinstance(b, int) and not isinstance(b, bool) for b in boundaries):
        raise PlanError("plan: 'boundaries' must be integers")
    streams_raw = _require(doc, "streams", list, "plan")
    streams = []
    for i, s in enumerate(streams_raw):
        if not isinstance(s, Mapping):
            raise PlanError(f"plan: streams[{i}] must be an object")
        streams.append(StreamSpec(_require(s, "name", str, f"plan streams[{i}]"),
                                  _require(s, "kind", str, f"plan streams[{i}]")))
    chunk_attention = doc.get("chunk_attention", True)
    if not isinstance(chunk_attention, bool):
        raise PlanError(f"plan: 'chunk_attention' must be true or false, got {chunk_attention!r}")
    scope = _require(doc, "capacity_scope", str, "plan")
    if scope not in CAPACITY_SCOPES:
        raise PlanError(f"plan: 'capacity_scope' must be one of {list(CAPACITY_SCOPES)}, got {scope!r}")
    forward = tuple(_parse_op(o, "forward") for o in _require(doc, "forward", list, "plan"))
    backward = tuple(_parse_op(o, "backward") for o in _require(doc, "backward", list, "plan"))
    return Plan(version=version, variant=str(doc.get("variant", "unknown")), dims=dict(dims),
                boundaries=tuple(boundaries), chunk_qkv=bool(doc.get("chunk_qkv", True)),
                streams=tuple(streams), forward=forward, backward=backward,
                meta=dict(doc.get("meta") or {}), chunk_attention=chunk_attention,
                capacity_scope=scope)


# ---------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------

def validate_plan(plan: Plan) -> None:
    """Reject a plan that cannot run correctly, naming the op (or field) at fault."""
    b = plan.boundaries
    if len(b) < 2 or b[0] != 0 or any(x >= y for x, y in zip(b, b[1:])):
        raise PlanError(f"plan: 'boundaries' must increase strictly from 0, got {list(b)}")
    seq = plan.dims.get("seq_length")
    if seq is not None and b[-1] != seq:
        raise PlanError(f"plan: last boundary {b[-1]} != dims.seq_length {seq}")
    if not plan.chunk_attention and plan.chunk_qkv:
        raise PlanError("plan: 'chunk_attention' false needs 'chunk_qkv' false (a whole-sequence "
                        "attention reads one whole-sequence q)")
    names = [s.name for s in plan.streams]
    if len(set(names)) != len(names):
        raise PlanError(f"plan: duplicate stream names in {names}")
    for s in plan.streams:
        if s.kind not in STREAM_KINDS:
            raise PlanError(f"plan: stream '{s.name}' has unknown kind {s.kind!r} "
                            f"(expected one of {list(STREAM_KINDS)})")
    stream_kind = {s.name: s.kind for s in plan.streams}
    _validate_pass(plan, plan.forward, "forward", FORWARD_KINDS, stream_kind)
    _validate_pass(plan, plan.backward, "backward", BACKWARD_KINDS, stream_kind)


def _is_whole(plan: Plan, kind: str) -> bool:
    """Whether ops of `kind` cover the whole sequence (chunk null) in this plan."""
    whole = OP_KINDS[kind].get("whole")
    return (whole == "always" or (whole == "unless_chunk_qkv" and not plan.chunk_qkv)
            or (whole == "unless_chunk_attention" and not plan.chunk_attention))


def _validate_pass(plan: Plan, ops: Sequence[PlanOp], name: str, kinds: Sequence[str],
                   stream_kind: Mapping[str, str]) -> None:
    P = plan.num_chunks
    index: dict[str, int] = {}
    by_kind: dict[tuple[str, int | None], str] = {}
    for i, op in enumerate(ops):
        where = f"{name} op '{op.id}'"
        if op.id in index:
            raise PlanError(f"{where}: duplicate id")
        index[op.id] = i
        if op.kind not in kinds:
            raise PlanError(f"{where}: unknown kind {op.kind!r} for the {name} pass")
        if not plan.has_kind(op.kind):
            raise PlanError(f"{where}: kind {op.kind!r} needs a shared expert, but "
                            f"dims.moe_shared_expert_intermediate_size is null")
        if op.stream not in stream_kind:
            raise PlanError(f"{where}: unknown stream {op.stream!r}")
        want = "comm" if op.is_comm else "compute"
        if stream_kind[op.stream] != want:
            raise PlanError(f"{where}: kind {op.kind!r} must run on a {want} stream, "
                            f"'{op.stream}' is {stream_kind[op.stream]}")
        whole = _is_whole(plan, op.kind)
        if whole and op.chunk is not None:
            raise PlanError(f"{where}: kind {op.kind!r} covers the whole sequence here; "
                            f"'chunk' must be null")
        if not whole and (op.chunk is None or not 0 <= op.chunk < P):
            raise PlanError(f"{where}: 'chunk' must be in [0, {P}) , got {op.chunk!r}")
        key = (op.kind, op.chunk)
        if key in by_kind:
            raise PlanError(f"{where}: a second {op.kind!r} op for chunk {op.chunk} "
                            f"(first: '{by_kind[key]}')")
        by_kind[key] = op.id
        for d in op.deps:
            if d not in index or d == op.id:
                raise PlanError(f"{where}: dep '{d}' is not an earlier op of the {name} pass")
    # Completeness: every kind for every chunk, exactly once (duplicates rejected above).
    for kind in kinds:
        if not plan.has_kind(kind):
            continue
        whole = _is_whole(plan, kind)
        for c in ([None] if whole else range(P)):
            if (kind, c) not in by_kind:
                what = "the whole sequence" if c is None else f"chunk {c}"
                raise PlanError(f"{name} pass: no {kind!r} op for {what}")

    hb = _happens_before(ops, index)
    bit = {op.id: 1 << i for i, op in enumerate(ops)}

    def need(op: PlanOp, kind: str, chunk: int | None) -> None:
        other = by_kind[(kind, chunk)]
        if not hb[index[op.id]] & bit[other]:
            raise PlanError(f"{name} op '{op.id}' ({op.kind}, chunk {op.chunk}): its input from "
                            f"'{other}' ({kind}) is not covered by its deps or stream order")

    for op in ops:
        for kind, chunk in _needs(plan, op, name == "forward"):
            need(op, kind, chunk)
        if OP_KINDS[op.kind].get("in_place") == "prefix" and op.chunk is not None:
            # attn_bwd ops accumulate dK/dV in place into shared prefixes: any two of them
            # must be ordered one way or the other.
            what = "/".join(b[0] + b[1:].upper() for b in OP_KINDS[op.kind].get("buffers", ()))
            for j in range(P):
                other = by_kind[(op.kind, j)]
                if j != op.chunk and not (hb[index[op.id]] & bit[other]
                                          or hb[index[other]] & bit[op.id]):
                    raise PlanError(
                        f"{name} op '{op.id}' ({op.kind}, chunk {op.chunk}): not ordered with "
                        f"'{other}'; both accumulate {what} in place into shared prefixes")


def resolved_reads(plan: Plan, op: PlanOp) -> list[tuple[Mapping[str, Any], str, int | None]]:
    """`(read, kind, chunk)` for each op `op` reads, read by read (op_kinds.json, for this plan).
    A read of a kind that covers the whole sequence here is its one whole-sequence op; one of a
    kind the plan lacks (no shared expert), or under a condition the plan does not meet, is dropped."""
    c, P = op.chunk, plan.num_chunks
    out: list[tuple[Mapping[str, Any], str, int | None]] = []
    for read in OP_KINDS[op.kind]["reads"]:
        kind, rel = read["kind"], read["chunk"]
        if read.get("when") == "capacity_sequence" and plan.capacity_scope != "sequence":
            continue
        if not plan.has_kind(kind):
            continue
        if _is_whole(plan, kind):
            out.append((read, kind, None))
            continue
        chunks = {"same": range(P) if c is None else [c],
                  "prev": [c - 1] if c is not None and c > 0 else [],
                  "all": range(P),
                  "upto": range(P if c is None else c + 1),
                  "from": range(0 if c is None else c, P)}[rel]
        out.extend((read, kind, j) for j in chunks)
    return out


def _needs(plan: Plan, op: PlanOp, forward: bool = True) -> list[tuple[str, int | None]]:
    """The (kind, chunk) ops whose results `op` reads, each once (`resolved_reads`)."""
    return list(dict.fromkeys((kind, chunk) for _, kind, chunk in resolved_reads(plan, op)))


def data_needs(plan: Plan, forward: bool = True) -> dict[str, list[str]]:
    """For each op id of a pass, the ids of the ops whose results it reads: the dependencies
    every schedule must respect (the plan's deps add its own ordering choices)."""
    ops = plan.forward if forward else plan.backward
    by_kind = {(op.kind, op.chunk): op.id for op in ops}
    return {op.id: [by_kind[k] for k in _needs(plan, op, forward)] for op in ops}


def _happens_before(ops: Sequence[PlanOp], index: Mapping[str, int]) -> list[int]:
    """hb[i]: bitset of the ops that happen-before op i (deps and same-stream order, transitive)."""
    hb: list[int] = []
    last_on_stream: dict[str, int] = {}
    for i, op in enumerate(ops):
        preds = [index[d] for d in op.deps]
        if op.stream in last_on_stream:
            preds.append(last_on_stream[op.stream])
        mask = 0
        for p in preds:
            mask |= hb[p] | (1 << p)
        hb.append(mask)
        last_on_stream[op.stream] = i
    return hb


_FORWARD_OF = {v["backward"]: k for k, v in OP_KINDS.items() if v.get("backward")}


def forward_kind(backward_kind: str) -> str:
    """The forward kind whose island a backward kind differentiates (`attn_bwd` -> `attn`)."""
    return _FORWARD_OF[backward_kind]


def check_cuda_streams(plan: Plan) -> None:
    """Reject a plan the CUDA executor would not run as written: every backward op must be
    on the stream of the forward op of the same kind and chunk.

    Under autograd each backward kernel runs on the stream its forward kernel ran on (the
    engine's stream semantics), whatever stream the backward op is issued from; a backward
    op on another stream would neither run there nor overlap as planned, and the gradients
    the engine allocates would be used on a stream they were not made on. On CPU the
    assignment is only an order (every compute op runs on the calling thread), so this is
    checked where the device is CUDA (`AMPipeBlock`), not by `validate_plan`.
    """
    fwd = {(op.kind, op.chunk): op for op in plan.forward}
    for op in plan.backward:
        f = fwd.get((forward_kind(op.kind), op.chunk))
        if f is not None and f.stream != op.stream:
            raise PlanError(
                f"backward op '{op.id}' ({op.kind}) is on stream '{op.stream}' but its forward "
                f"op '{f.id}' is on '{f.stream}': on CUDA a backward op must use its forward "
                f"op's stream (autograd runs backward kernels on the forward kernels' stream)")


def compute_stream_count(plan: Plan) -> int:
    """How many distinct compute streams the plan's ops use."""
    kind = {s.name: s.kind for s in plan.streams}
    return len({op.stream for op in (*plan.forward, *plan.backward) if kind[op.stream] == "compute"})


def check_dims(plan: Plan, dims: Mapping[str, Any]) -> None:
    """Reject a plan whose dims disagree with the block it is given (naming the field)."""
    for key in DIM_KEYS:
        if key not in plan.dims:
            raise PlanError(f"plan: dims.{key} is missing")
    for key, want in dims.items():
        if key in plan.dims and plan.dims[key] != want:
            raise PlanError(f"plan: dims.{key} = {plan.dims[key]!r} but the block has {want!r}")
    if plan.boundaries[-1] != dims.get("seq_length", plan.boundaries[-1]):
        raise PlanError(f"plan: last boundary {plan.boundaries[-1]} != the block's "
                        f"seq_length {dims['seq_length']}")


def uniform_boundaries(seq_length: int, degree: int) -> list[int]:
    """P chunks of (nearly) equal length: [0, ..., seq_length]."""
    if not 1 <= degree <= seq_length:
        raise PlanError(f"pipeline degree {degree} must be in [1, seq_length={seq_length}]")
    return [round(i * seq_length / degree) for i in range(degree + 1)]


def retarget_plan(plan: Plan, dims: Mapping[str, Any],
                  boundaries: Sequence[int] | None = None) -> Plan:
    """The same op lists (same schedule) over other dims and chunk boundaries.

    A plan's op lists depend only on the variant, P and `chunk_qkv`, so a schedule can be
    reused for another block size; the result is validated like any loaded plan.
    """
    new_dims = {**plan.dims, **dims}
    b = list(boundaries) if boundaries is not None else uniform_boundaries(
        int(new_dims["seq_length"]), plan.num_chunks)
    if len(b) != len(plan.boundaries):
        raise PlanError(f"retarget_plan: {len(b) - 1} chunks given for a plan with "
                        f"{plan.num_chunks}")
    out = dataclasses.replace(plan, dims=new_dims, boundaries=tuple(b),
                              meta={**plan.meta, "retargeted_from": list(plan.boundaries)})
    validate_plan(out)
    return out
