// The op kinds of a plan, defined once: which pass each belongs to, the stream kind it runs on,
// when it covers the whole sequence, what it reads (its data dependencies) and writes, its
// backward, whether it differentiates parameters, the block part it needs and the work figure
// its cost is linear in. ir.ts derives the kind lists from this table, check.ts and the
// generators resolve the reads through `needsOf`, costs.ts's WORK_UNIT is checked against it
// (test/ts/plan/opkinds.test.ts), and scripts/export-plan-schema.ts writes it for the Python
// executor (py/ampipe/pipeline/op_kinds.json: plan.py's validation and data needs; block.py's
// handlers are checked against it by test/py/pipeline/test_op_kinds.py).

/** Which chunks of another kind an op of chunk c reads: `same` (c; every chunk when the reader
 *  covers the whole sequence), `prev` (c-1, none for chunk 0), `all`, `upto` (0..c), `from` (c..P-1).
 *  A kind that covers the whole sequence in the plan is read as its one whole-sequence op. */
export type ChunkRel = "same" | "prev" | "all" | "upto" | "from";

export interface Read {
  kind: string;
  chunk: ChunkRel;
  /** Read only under this plan condition. */
  when?: "capacity_sequence";
}

export interface OpKindSpec {
  pass: "forward" | "backward";
  stream: "compute" | "comm";
  /** Covers the whole sequence (chunk null): always, or when a plan flag is false. */
  whole?: "always" | "unless_chunk_qkv" | "unless_chunk_attention";
  /** The kind exists only in plans for blocks with this part (dims say so). */
  requires?: "shared_expert";
  /** Forward kinds: the backward kind that differentiates this op's island. */
  backward?: string;
  /** Its island differentiates parameters (forward kinds; `LayerAdapter.op_modules`). */
  params?: boolean;
  reads: Read[];
  /** What it produces, for the reader (the executor's values and gradient slots). */
  writes: string[];
  /** The work figure its time is linear in (costs.ts). */
  work: "flops" | "bytes" | "wire_bytes";
}

const r = (kind: string, chunk: ChunkRel = "same", when?: Read["when"]): Read => (when ? { kind, chunk, when } : { kind, chunk });

export const OP_KIND_TABLE = {
  // forward, in the order a chunk goes through them
  qkv: { pass: "forward", stream: "compute", whole: "unless_chunk_qkv", backward: "qkv_bwd", params: true, reads: [], writes: ["q", "k", "v"], work: "flops" },
  attn: { pass: "forward", stream: "compute", whole: "unless_chunk_attention", backward: "attn_bwd", reads: [r("qkv", "upto")], writes: ["context"], work: "flops" },
  proj: { pass: "forward", stream: "compute", backward: "proj_bwd", params: true, reads: [r("attn")], writes: ["h", "normed"], work: "flops" },
  route: { pass: "forward", stream: "compute", backward: "route_bwd", params: true, reads: [r("proj"), r("route", "prev", "capacity_sequence")], writes: ["routing", "permuted"], work: "flops" },
  counts: { pass: "forward", stream: "comm", reads: [r("route")], writes: ["split sizes"], work: "wire_bytes" },
  dispatch: { pass: "forward", stream: "comm", backward: "dispatch_bwd", reads: [r("counts"), r("route")], writes: ["dispatched"], work: "wire_bytes" },
  experts: { pass: "forward", stream: "compute", backward: "experts_bwd", params: true, reads: [r("dispatch")], writes: ["expert output"], work: "flops" },
  combine: { pass: "forward", stream: "comm", backward: "combine_bwd", reads: [r("experts")], writes: ["combined"], work: "wire_bytes" },
  shared: { pass: "forward", stream: "compute", requires: "shared_expert", backward: "shared_bwd", params: true, reads: [r("proj")], writes: ["shared output"], work: "flops" },
  unpermute: { pass: "forward", stream: "compute", backward: "unpermute_bwd", reads: [r("combine"), r("route"), r("proj"), r("shared")], writes: ["y"], work: "bytes" },
  aux_loss: { pass: "forward", stream: "compute", whole: "always", backward: "aux_loss_bwd", reads: [r("route", "all")], writes: ["aux_loss", "z_loss", "expert-bias counts"], work: "bytes" },
  // backward, in the order a chunk goes through them
  aux_loss_bwd: { pass: "backward", stream: "compute", whole: "always", reads: [], writes: ["grad probs_sum", "grad z_sum"], work: "bytes" },
  unpermute_bwd: { pass: "backward", stream: "compute", reads: [], writes: ["grad combined", "grad gates", "grad h", "grad shared output"], work: "bytes" },
  combine_bwd: { pass: "backward", stream: "comm", reads: [r("unpermute_bwd")], writes: ["grad expert output"], work: "wire_bytes" },
  experts_bwd: { pass: "backward", stream: "compute", reads: [r("combine_bwd")], writes: ["grad dispatched"], work: "flops" },
  dispatch_bwd: { pass: "backward", stream: "comm", reads: [r("experts_bwd")], writes: ["grad permuted"], work: "wire_bytes" },
  shared_bwd: { pass: "backward", stream: "compute", requires: "shared_expert", reads: [r("unpermute_bwd")], writes: ["grad normed"], work: "flops" },
  route_bwd: { pass: "backward", stream: "compute", reads: [r("dispatch_bwd"), r("unpermute_bwd"), r("aux_loss_bwd")], writes: ["grad normed"], work: "flops" },
  proj_bwd: { pass: "backward", stream: "compute", reads: [r("route_bwd"), r("unpermute_bwd"), r("shared_bwd")], writes: ["grad context", "grad x (residual)"], work: "flops" },
  attn_bwd: { pass: "backward", stream: "compute", whole: "unless_chunk_attention", reads: [r("proj_bwd")], writes: ["grad q", "dK, dV prefix (in place)"], work: "flops" },
  qkv_bwd: { pass: "backward", stream: "compute", whole: "unless_chunk_qkv", reads: [r("attn_bwd", "from")], writes: ["grad x"], work: "flops" },
} as const satisfies Record<string, OpKindSpec>;

export type TableKind = keyof typeof OP_KIND_TABLE;

/** The table as plain data (what the Python executor reads). */
export function opKindTableJson(version: number): string {
  return JSON.stringify({ format: "ampipe.op_kinds", plan_version: version, kinds: OP_KIND_TABLE }, null, 1) + "\n";
}
