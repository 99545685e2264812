// The plan checker: the TypeScript mirror of the Python executor's validation (docs/contracts.md §2).
// A plan is accepted only if every op's data dependencies ("needs") happen before it, where
// happens-before is the transitive closure of `deps` edges and same-stream list order.
import {
  BACKWARD_KINDS, COMM_KINDS, FORWARD_KINDS, checkBoundaries, hasSharedExpert, isWholeSequence, kindPresent, numChunks,
  opId, parsePlanShape, type CapacityScope, type Op, type OpKind, type Plan,
} from "./ir.ts";
import { OP_KIND_TABLE, type OpKindSpec, type Read } from "./opkinds.ts";

export type ListName = "forward" | "backward";

export interface PlanIssue {
  list: ListName | null;
  index: number | null;
  id: string | null;
  message: string;
}

export class PlanValidationError extends Error {
  constructor(readonly issues: PlanIssue[]) {
    super(`invalid plan:\n${issues.map(formatIssue).join("\n")}`);
    this.name = "PlanValidationError";
  }
}

export function formatIssue(i: PlanIssue): string {
  const where = i.list === null ? "plan" : `${i.list}[${i.index}]${i.id ? ` (${i.id})` : ""}`;
  return `${where}: ${i.message}`;
}

/** One data dependency: an op of `kind` for `chunk` (null = the whole-sequence op). */
export interface Need {
  kind: OpKind;
  chunk: number | null;
}

/**
 * The data dependencies of an op: its kind's reads (opkinds.ts) resolved for this plan, each op once. A read of a
 * kind that covers the whole sequence here (`qkv`/`qkv_bwd` when `chunk_qkv` is false,
 * `attn`/`attn_bwd` when `chunk_attention` is false, the aux losses) is its one whole-sequence op;
 * a read of a kind the plan does not have (no shared expert) is dropped. The mutual ordering of
 * the `in_place` kinds (attn_bwd) is checked separately.
 */
export function needsOf(kind: OpKind, chunk: number | null, P: number, chunkQkv: boolean, chunkAttention = true,
  capacityScope: CapacityScope = "chunk", sharedExpert = false): Need[] {
  const range = (from: number, to: number) => Array.from({ length: Math.max(0, to - from) }, (_, i) => from + i);
  const out: Need[] = [];
  for (const read of OP_KIND_TABLE[kind].reads as readonly Read[]) {
    const k = read.kind as OpKind;
    if (read.when === "capacity_sequence" && capacityScope !== "sequence") continue;
    if (!kindPresent(k, sharedExpert)) continue;
    if (isWholeSequence(k, chunkQkv, chunkAttention)) {
      if (!out.some((n) => n.kind === k && n.chunk === null)) out.push({ kind: k, chunk: null });
      continue;
    }
    const chunks = read.chunk === "same" ? (chunk === null ? range(0, P) : [chunk])
      : read.chunk === "prev" ? (chunk !== null && chunk > 0 ? [chunk - 1] : [])
      : read.chunk === "all" ? range(0, P)
      : read.chunk === "upto" ? range(0, chunk === null ? P : chunk + 1)
      : range(chunk === null ? 0 : chunk, P);
    for (const j of chunks) if (!out.some((n) => n.kind === k && n.chunk === j)) out.push({ kind: k, chunk: j });
  }
  return out;
}

/** The (kind, chunk) pairs a complete list must hold, each exactly once. */
export function expectedOps(list: ListName, P: number, chunkQkv: boolean, chunkAttention = true, sharedExpert = false): Need[] {
  const kinds = list === "forward" ? FORWARD_KINDS : BACKWARD_KINDS;
  const out: Need[] = [];
  for (const kind of kinds) {
    if (!kindPresent(kind, sharedExpert)) continue;
    const whole = isWholeSequence(kind, chunkQkv, chunkAttention);
    if (whole) out.push({ kind, chunk: null });
    else for (let c = 0; c < P; c++) out.push({ kind, chunk: c });
  }
  return out;
}

/** Whether ops of `kind` add into the prefixes of shared buffers in place (opkinds.ts `in_place`). */
export const inPlacePrefix = (kind: OpKind): boolean => (OP_KIND_TABLE[kind] as OpKindSpec).in_place === "prefix";
const bufferNames = (kind: OpKind): string => ((OP_KIND_TABLE[kind] as OpKindSpec).buffers ?? []).map((b) => b.replace(/^d(.)$/, (_, c: string) => `d${c.toUpperCase()}`)).join("/");

const key = (kind: string, chunk: number | null) => `${kind}@${chunk === null ? "all" : chunk}`;

/**
 * For each op (by list index), the set of op indices that happen before it, as bitsets.
 * Assumes deps were already resolved to earlier indices.
 */
export function happensBefore(ops: readonly Op[], depIndices: readonly number[][]): bigint[] {
  const anc: bigint[] = new Array(ops.length);
  const lastOnStream = new Map<string, number>();
  for (let i = 0; i < ops.length; i++) {
    let a = 0n;
    const preds = [...depIndices[i]];
    const prev = lastOnStream.get(ops[i].stream);
    if (prev !== undefined) preds.push(prev);
    for (const p of preds) a |= anc[p] | (1n << BigInt(p));
    anc[i] = a;
    lastOnStream.set(ops[i].stream, i);
  }
  return anc;
}

/** All problems with a structurally parsed plan (empty when the plan is valid). */
export function planIssues(plan: Plan): PlanIssue[] {
  const issues: PlanIssue[] = [];
  const planIssue = (message: string) => issues.push({ list: null, index: null, id: null, message });
  try {
    checkBoundaries(plan.boundaries, plan.dims.seq_length);
  } catch (e) {
    planIssue((e as Error).message);
  }
  const P = numChunks(plan);
  const chunkAttention = plan.chunk_attention ?? true;
  const shared = hasSharedExpert(plan.dims);
  if (!chunkAttention && plan.chunk_qkv) planIssue("chunk_attention: false needs chunk_qkv false (a whole-sequence attention reads one whole-sequence q)");
  const streamKind = new Map<string, "compute" | "comm">();
  plan.streams.forEach((s, i) => {
    if (streamKind.has(s.name)) planIssue(`streams[${i}]: duplicate stream name "${s.name}"`);
    streamKind.set(s.name, s.kind);
  });
  const seenIds = new Set<string>();
  for (const list of ["forward", "backward"] as const) {
    const ops = plan[list];
    const allowed = new Set<string>(list === "forward" ? FORWARD_KINDS : BACKWARD_KINDS);
    const indexOf = new Map<string, number>();
    const depIndices: number[][] = [];
    const byKey = new Map<string, number>();
    const add = (i: number, message: string) => issues.push({ list, index: i, id: ops[i].id, message });
    ops.forEach((op, i) => {
      if (seenIds.has(op.id)) add(i, `duplicate op id "${op.id}"`);
      seenIds.add(op.id);
      if (!allowed.has(op.kind)) add(i, `kind "${op.kind}" does not belong in the ${list} list`);
      else if (!kindPresent(op.kind, shared))
        add(i, `kind "${op.kind}" needs a shared expert, but dims.moe_shared_expert_intermediate_size is null`);
      const sk = streamKind.get(op.stream);
      if (sk === undefined) add(i, `unknown stream "${op.stream}"`);
      else {
        const want = COMM_KINDS.has(op.kind) ? "comm" : "compute";
        if (sk !== want) add(i, `kind "${op.kind}" must run on a ${want} stream, but "${op.stream}" is a ${sk} stream`);
      }
      const whole = isWholeSequence(op.kind, plan.chunk_qkv, chunkAttention);
      const flag = op.kind.startsWith("qkv") ? ` (chunk_qkv is ${plan.chunk_qkv})` : op.kind.startsWith("attn") ? ` (chunk_attention is ${chunkAttention})` : "";
      if (whole && op.chunk !== null) add(i, `chunk must be null for a whole-sequence "${op.kind}" op${flag}`);
      if (!whole && op.chunk === null) add(i, `chunk must be a chunk index for "${op.kind}"${flag}`);
      if (op.chunk !== null && op.chunk >= P) add(i, `chunk ${op.chunk} is out of range (the plan has ${P} chunks)`);
      const deps: number[] = [];
      const seenDeps = new Set<string>();
      for (const d of op.deps) {
        if (seenDeps.has(d)) add(i, `dep "${d}" is listed twice`);
        seenDeps.add(d);
        const j = indexOf.get(d);
        if (j !== undefined) deps.push(j);
        else if (d === op.id) add(i, `depends on itself`);
        else if (ops.some((o) => o.id === d)) add(i, `dep "${d}" is not earlier in the ${list} list`);
        else add(i, `dep "${d}" is not an op of the ${list} list`);
      }
      depIndices.push(deps);
      if (!indexOf.has(op.id)) indexOf.set(op.id, i);
      const k = key(op.kind, op.chunk);
      if (byKey.has(k)) add(i, `duplicate op: "${op.kind}" for ${op.chunk === null ? "the whole sequence" : `chunk ${op.chunk}`} already appears as ${ops[byKey.get(k)!].id}`);
      else byKey.set(k, i);
    });
    for (const e of expectedOps(list, P, plan.chunk_qkv, chunkAttention, shared)) {
      if (!byKey.has(key(e.kind, e.chunk)))
        issues.push({ list, index: null, id: opId(e.kind, e.chunk), message: `missing op: "${e.kind}" for ${e.chunk === null ? "the whole sequence" : `chunk ${e.chunk}`}` });
    }
    // Needs: every data dependency must happen before the op.
    const anc = happensBefore(ops, depIndices);
    const inPlace = new Map<OpKind, number[]>(); // kinds that add into shared prefixes in place
    ops.forEach((op, i) => {
      if (!allowed.has(op.kind) || !kindPresent(op.kind, shared) || (op.chunk !== null && op.chunk >= P)) return;
      if (inPlacePrefix(op.kind)) inPlace.set(op.kind, [...(inPlace.get(op.kind) ?? []), i]);
      for (const n of needsOf(op.kind, op.chunk, P, plan.chunk_qkv, chunkAttention, plan.capacity_scope, shared)) {
        const j = byKey.get(key(n.kind, n.chunk));
        if (j === undefined) continue; // reported as a missing op
        if (((anc[i] >> BigInt(j)) & 1n) === 0n)
          add(i, `needs ${ops[j].id} (${n.kind}${n.chunk === null ? "" : ` of chunk ${n.chunk}`}), which does not happen before it (add it to deps or order it earlier on the same stream)`);
      }
    });
    // Ops that add into shared prefixes in place (attn_bwd: dK/dV) must be totally ordered.
    for (const [kind, idx] of inPlace)
      for (let x = 0; x < idx.length; x++)
        for (let y = x + 1; y < idx.length; y++) {
          const [i, j] = [idx[x], idx[y]];
          if (((anc[j] >> BigInt(i)) & 1n) === 0n)
            add(j, `must be ordered after ${ops[i].id}: ${kind} ops accumulate ${bufferNames(kind)} in place, so they need the same stream or a dep`);
        }
  }
  return issues;
}

/** Parses and checks a plan; throws a PlanValidationError (or a shape error naming the field) if it is not valid. */
export function validatePlan(value: unknown): Plan {
  const plan = parsePlanShape(value);
  const issues = planIssues(plan);
  if (issues.length > 0) throw new PlanValidationError(issues);
  return plan;
}
