// Plan generators: sequential (the baseline), grouped (the paper's main variant), interleaved
// (software-pipelined) and moe-overlap (the peer baseline: Tutel's all-to-all/expert overlap inside
// the MoE layer, attention whole). Each builds the forward and the backward list over one compute and one
// comm stream. A generator only decides each stream's op order; deps are derived from the data
// dependencies (check.ts needsOf) and only cross-stream edges not already implied are written.
import { readFileSync } from "node:fs";
import { inPlacePrefix, needsOf } from "./check.ts";
import {
  CAPACITY_SCOPES, PLAN_FORMAT, PLAN_VERSION, VARIANTS, checkBoundaries, hasSharedExpert, opId, parseDims, uniformBoundaries,
  type BlockDims, type CapacityScope, type Op, type OpKind, type Plan, type Stream, type Variant,
} from "./ir.ts";

export const COMPUTE = "compute";
export const COMM = "comm";
export const DEFAULT_STREAMS: Stream[] = [
  { name: COMPUTE, kind: "compute" },
  { name: COMM, kind: "comm" },
];

const packageVersion: string = JSON.parse(
  readFileSync(new URL("../../package.json", import.meta.url), "utf8"),
).version;
export const GENERATOR = `ampipe ${packageVersion}`;

export interface PlanOptions {
  /** Explicit chunk boundaries [0, ..., seq_length]; otherwise uniform boundaries for `degree`. */
  boundaries?: readonly number[];
  /** Pipe degree P (number of chunks); default 1. Must agree with `boundaries` when both are given. */
  degree?: number;
  /** QKV projection per chunk (default true) or one whole-sequence op. Ignored by moe-overlap (always one). */
  chunkQkv?: boolean;
  /** Where a capacity is sized (default chunk); sequence orders each route after the previous one. */
  capacityScope?: CapacityScope;
  /** Extra fields for `meta` (the generator name is always set). */
  meta?: Record<string, unknown>;
}

interface Slot {
  kind: OpKind;
  chunk: number | null;
}

/** Resolves the chunk boundaries from options, with errors that name the field. */
export function resolveBoundaries(dims: BlockDims, opts: PlanOptions): number[] {
  if (opts.boundaries) {
    const b = [...opts.boundaries];
    checkBoundaries(b, dims.seq_length);
    if (opts.degree !== undefined && opts.degree !== b.length - 1)
      throw new Error(`degree (${opts.degree}) disagrees with boundaries, which give ${b.length - 1} chunks`);
    return b;
  }
  const degree = opts.degree ?? 1;
  if (!Number.isInteger(degree) || degree < 1) throw new Error(`degree must be a positive integer, got ${degree}`);
  if (degree > dims.seq_length) throw new Error(`degree (${degree}) must be <= seq_length (${dims.seq_length})`);
  return uniformBoundaries(dims.seq_length, degree);
}

// --- per-chunk stages --------------------------------------------------------------------------

/** Forward compute before the dispatch: (qkv), attention, out-projection, router. */
function front(c: number, chunkQkv: boolean): Slot[] {
  return [
    ...(chunkQkv ? [{ kind: "qkv" as OpKind, chunk: c }] : []),
    { kind: "attn", chunk: c }, { kind: "proj", chunk: c }, { kind: "route", chunk: c },
  ];
}
/** Backward compute after dispatch_bwd: router, out-projection, attention (and qkv) backward. */
function back(c: number, chunkQkv: boolean): Slot[] {
  return [
    { kind: "route_bwd", chunk: c }, { kind: "proj_bwd", chunk: c }, { kind: "attn_bwd", chunk: c },
    ...(chunkQkv ? [{ kind: "qkv_bwd" as OpKind, chunk: c }] : []),
  ];
}
const one = (kind: OpKind, chunk: number | null): Slot[] => [{ kind, chunk }];

interface StreamOrders {
  compute: Slot[];
  comm: Slot[];
  /** Orderings a schedule adds beyond the data needs: op id -> ids it must also wait for. */
  waits?: Map<string, string[]>;
}

/** A shared expert's op of chunk c (none without a shared expert). */
const sharedOf = (kind: "shared" | "shared_bwd", c: number, shared: boolean): Slot[] => (shared ? one(kind, c) : []);

/**
 * The MoE side that grouped and moe-overlap share, once every chunk is routed: experts and
 * unpermute of chunk c on the compute stream, counts, dispatch and combine on the comm stream,
 * so chunk c's exchange overlaps its neighbours' experts. A shared expert's op of chunk c
 * follows its experts: it computes while chunk c-1's combine is in flight, before the
 * unpermute that waits for it. Appends to `fc`; returns the comm order.
 */
function moeForward(P: number, fc: Slot[], shared: boolean): Slot[] {
  const fm: Slot[] = [];
  for (let s = 0; s <= P; s++) {
    if (s < P) fc.push(...one("experts", s), ...sharedOf("shared", s, shared));
    if (s >= 1) fc.push(...one("unpermute", s - 1));
    if (s < P) fm.push(...one("counts", s), ...one("dispatch", s));
    if (s >= 1) fm.push(...one("combine", s - 1));
  }
  return fm;
}

/**
 * `moeForward`'s mirror, chunks last-to-first; a shared expert's backward of chunk c comes
 * before its experts' backward, so it computes while chunk c's combine_bwd is in flight.
 * Appends to `bc`; returns the comm order.
 */
function moeBackward(P: number, bc: Slot[], shared: boolean): Slot[] {
  const r = (s: number) => P - 1 - s;
  const bm: Slot[] = [];
  for (let s = 0; s < P; s++) bc.push(...one("unpermute_bwd", r(s)));
  for (let s = 0; s <= P; s++) {
    if (s < P) bc.push(...sharedOf("shared_bwd", r(s), shared), ...one("experts_bwd", r(s)));
    if (s < P) bm.push(...one("combine_bwd", r(s)));
    if (s >= 1) bm.push(...one("dispatch_bwd", r(s - 1)));
  }
  return bm;
}

/**
 * Grouped (the paper's): the attention side of every chunk first, then dispatch/experts/combine
 * chunk by chunk, comm of chunk c overlapping the experts of its neighbours. The backward mirrors
 * it: the MoE side chunk by chunk (last chunk first), then the attention side.
 */
function groupedOrders(P: number, chunkQkv: boolean, shared: boolean): { forward: StreamOrders; backward: StreamOrders } {
  const fc: Slot[] = chunkQkv ? [] : one("qkv", null);
  for (let c = 0; c < P; c++) fc.push(...front(c, chunkQkv));
  fc.push(...one("aux_loss", null));
  const fm = moeForward(P, fc, shared);
  const r = (s: number) => P - 1 - s; // backward runs chunks last-to-first
  const bc: Slot[] = one("aux_loss_bwd", null);
  const bm = moeBackward(P, bc, shared);
  for (let s = 0; s < P; s++) bc.push(...back(r(s), chunkQkv));
  if (!chunkQkv) bc.push(...one("qkv_bwd", null));
  return { forward: { compute: fc, comm: fm }, backward: { compute: bc, comm: bm } };
}

/**
 * Interleaved (software-pipelined): step s computes the attention side of chunk s, the experts
 * of chunk s-1 and the unpermute of chunk s-2, while the comm stream carries chunk s's dispatch
 * and chunk s-1's combine. So chunk c's communication overlaps chunk c+1's attention and chunk
 * c-1's experts. The backward does the same over chunks taken last-to-first, so that qkv_bwd[j]
 * directly follows attn_bwd[j] (dK/dV of chunk j are complete once every later chunk is done).
 * A shared expert's op follows its chunk's experts (its backward precedes them), as in `moeForward`.
 */
function interleavedOrders(P: number, chunkQkv: boolean, shared: boolean): { forward: StreamOrders; backward: StreamOrders } {
  const fc: Slot[] = chunkQkv ? [] : one("qkv", null);
  const fm: Slot[] = [];
  for (let s = 0; s <= P + 1; s++) {
    if (s < P) fc.push(...front(s, chunkQkv));
    if (s === P - 1) fc.push(...one("aux_loss", null));
    if (s >= 1 && s <= P) fc.push(...one("experts", s - 1), ...sharedOf("shared", s - 1, shared));
    if (s >= 2) fc.push(...one("unpermute", s - 2));
    if (s < P) fm.push(...one("counts", s), ...one("dispatch", s));
    if (s >= 1 && s <= P) fm.push(...one("combine", s - 1));
  }
  const r = (s: number) => P - 1 - s;
  const bc: Slot[] = one("aux_loss_bwd", null);
  const bm: Slot[] = [];
  for (let s = 0; s <= P + 1; s++) {
    if (s < P) bc.push(...one("unpermute_bwd", r(s)));
    if (s >= 1 && s <= P) bc.push(...sharedOf("shared_bwd", r(s - 1), shared), ...one("experts_bwd", r(s - 1)));
    if (s >= 2) bc.push(...back(r(s - 2), chunkQkv));
    if (s < P) bm.push(...one("combine_bwd", r(s)));
    if (s >= 1 && s <= P) bm.push(...one("dispatch_bwd", r(s - 1)));
  }
  if (!chunkQkv) bc.push(...one("qkv_bwd", null));
  return { forward: { compute: fc, comm: fm }, backward: { compute: bc, comm: bm } };
}

/**
 * moe-overlap (Tutel's `a2a_ffn_overlap_degree` r = P, FlashAttention + Tutel in the paper): one
 * QKV and one attention over the whole sequence, then the out-projection and the router of every
 * piece; only then does the MoE layer pipeline dispatch / experts / combine over the P pieces
 * (chunk c's all-to-all overlapping its neighbours' experts). The first comm op (chunk 0's count exchange) waits for the
 * last route: the MoE layer starts once the attention side of the whole sequence is done. The
 * backward pipelines the MoE side the same way (pieces last-to-first) and starts the router and
 * attention backward only after the last dispatch_bwd, then runs them over the whole sequence.
 */
function moeOverlapOrders(P: number, shared: boolean): { forward: StreamOrders; backward: StreamOrders } {
  const fc: Slot[] = [...one("qkv", null), ...one("attn", null)];
  for (let c = 0; c < P; c++) fc.push(...one("proj", c));
  for (let c = 0; c < P; c++) fc.push(...one("route", c));
  fc.push(...one("aux_loss", null));
  const fm = moeForward(P, fc, shared);
  const r = (s: number) => P - 1 - s;
  const bc: Slot[] = one("aux_loss_bwd", null);
  const bm = moeBackward(P, bc, shared);
  for (let s = 0; s < P; s++) bc.push(...one("route_bwd", r(s)));
  for (let s = 0; s < P; s++) bc.push(...one("proj_bwd", r(s)));
  bc.push(...one("attn_bwd", null), ...one("qkv_bwd", null));
  return {
    // the MoE side starts once every chunk is routed (its first comm op is chunk 0's count exchange)
    forward: { compute: fc, comm: fm, waits: new Map([[opId("counts", 0), [opId("route", P - 1)]]]) },
    backward: { compute: bc, comm: bm, waits: new Map([[opId("route_bwd", P - 1), [opId("dispatch_bwd", 0)]]]) },
  };
}

/**
 * Merges per-stream orders into one list in issue order: a comm op is listed as soon as
 * everything it needs is listed (so an executor that walks the list starts communication as
 * early as possible), compute ops follow their stream order. One exception: a `dispatch`,
 * where the host waits for its chunk's counts (the split sizes), is listed only after the
 * compute op that follows its `counts` op, so on CUDA that op's kernels are queued while
 * the host waits. Deps are the needs not already implied by same-stream order or by earlier
 * deps (a minimal set of cross-stream edges).
 */
function buildList(orders: StreamOrders, P: number, chunkQkv: boolean, chunkAttention: boolean,
  capacityScope: CapacityScope, shared: boolean): Op[] {
  const ops: Op[] = [];
  let ci = 0;
  let mi = 0;
  const anc: bigint[] = [];
  const index = new Map<string, number>();
  const last = new Map<string, number>();
  const inPlace: number[] = []; // the in-place kind's ops listed so far (attn_bwd)
  const needIds = (s: Slot): string[] => {
    const ids = needsOf(s.kind, s.chunk, P, chunkQkv, chunkAttention, capacityScope, shared).map((n) => opId(n.kind, n.chunk));
    ids.push(...(orders.waits?.get(opId(s.kind, s.chunk)) ?? []));
    // attn_bwd ops accumulate dK/dV in place: each one must follow every earlier one.
    if (inPlacePrefix(s.kind)) ids.push(...inPlace.filter((i) => ops[i].kind === s.kind).map((i) => ops[i].id));
    return ids;
  };
  let computeSinceCounts = true; // a compute op was listed after the latest counts op
  const listed = (s: Slot) => needIds(s).every((id) => index.has(id));
  const ready = (s: Slot) =>
    listed(s) && (s.kind !== "dispatch" || computeSinceCounts ||
      !(ci < orders.compute.length && listed(orders.compute[ci])));
  const emit = (s: Slot, stream: string) => {
    const id = opId(s.kind, s.chunk);
    const prev = last.get(stream);
    let a = prev === undefined ? 0n : anc[prev] | (1n << BigInt(prev));
    const deps: string[] = [];
    // Needs on the op's own stream are already ordered; add cross-stream needs not yet implied,
    // most recent first so that later needs often cover earlier ones.
    const needs = needIds(s).map((n) => index.get(n)!).sort((x, y) => y - x);
    for (const j of needs) {
      if (((a >> BigInt(j)) & 1n) !== 0n) continue;
      deps.push(ops[j].id);
      a |= anc[j] | (1n << BigInt(j));
    }
    const i = ops.length;
    ops.push({ id, kind: s.kind, chunk: s.chunk, stream, deps: deps.sort((x, y) => index.get(x)! - index.get(y)!) });
    anc.push(a);
    index.set(id, i);
    last.set(stream, i);
    if (inPlacePrefix(s.kind)) inPlace.push(i);
    if (s.kind === "counts") computeSinceCounts = false;
    else if (stream === COMPUTE) computeSinceCounts = true;
  };
  while (ci < orders.compute.length || mi < orders.comm.length) {
    let progressed = false;
    while (mi < orders.comm.length && ready(orders.comm[mi])) {
      emit(orders.comm[mi++], COMM);
      progressed = true;
    }
    if (ci < orders.compute.length && ready(orders.compute[ci])) {
      emit(orders.compute[ci++], COMPUTE);
      progressed = true;
    }
    if (!progressed) {
      const stuck = [orders.compute[ci], orders.comm[mi]].filter(Boolean).map((s) => opId(s.kind, s.chunk));
      throw new Error(`internal error: stream orders deadlock at ${stuck.join(", ")}`);
    }
  }
  return ops;
}

/** Builds a plan of the given variant. `sequential` always has one chunk. */
export function makePlan(variant: Variant, dimsIn: BlockDims, opts: PlanOptions = {}): Plan {
  if (!VARIANTS.includes(variant)) throw new Error(`variant must be one of ${VARIANTS.join(", ")}, got ${JSON.stringify(variant)}`);
  const dims = parseDims(dimsIn);
  const boundaries = resolveBoundaries(dims, opts);
  const P = boundaries.length - 1;
  if (variant === "sequential" && P !== 1)
    throw new Error(`boundaries: a sequential plan has one chunk, got ${P} (use grouped or interleaved)`);
  const moe = variant === "moe-overlap";
  // moe-overlap computes QKV and attention over the whole sequence, whatever chunkQkv says.
  const chunkQkv = moe ? false : (opts.chunkQkv ?? true);
  const chunkAttention = !moe;
  const capacityScope = opts.capacityScope ?? "chunk";
  if (!CAPACITY_SCOPES.includes(capacityScope))
    throw new Error(`capacity_scope must be one of ${CAPACITY_SCOPES.join(", ")}, got ${JSON.stringify(capacityScope)}`);
  const shared = hasSharedExpert(dims);
  const orders = moe ? moeOverlapOrders(P, shared) : variant === "interleaved" ? interleavedOrders(P, chunkQkv, shared) : groupedOrders(P, chunkQkv, shared);
  return {
    format: PLAN_FORMAT,
    version: PLAN_VERSION,
    variant,
    dims,
    boundaries,
    chunk_qkv: chunkQkv,
    ...(chunkAttention ? {} : { chunk_attention: false }),
    capacity_scope: capacityScope,
    streams: DEFAULT_STREAMS.map((s) => ({ ...s })),
    forward: buildList(orders.forward, P, chunkQkv, chunkAttention, capacityScope, shared),
    backward: buildList(orders.backward, P, chunkQkv, chunkAttention, capacityScope, shared),
    meta: { generator: GENERATOR, ...(opts.meta ?? {}) },
  };
}

export const sequentialPlan = (dims: BlockDims, opts: Omit<PlanOptions, "degree" | "boundaries"> = {}) =>
  makePlan("sequential", dims, opts);
export const groupedPlan = (dims: BlockDims, opts: PlanOptions = {}) => makePlan("grouped", dims, opts);
export const interleavedPlan = (dims: BlockDims, opts: PlanOptions = {}) => makePlan("interleaved", dims, opts);
export const moeOverlapPlan = (dims: BlockDims, opts: Omit<PlanOptions, "chunkQkv"> = {}) => makePlan("moe-overlap", dims, opts);
