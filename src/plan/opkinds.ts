// The op kinds of a plan, defined once: which pass each belongs to, the stream kind it runs on,
// when it covers the whole sequence, what it reads (its data dependencies, and which values of
// them) and writes, its backward, whether it differentiates parameters, the block part it needs
// and the work figure its cost is linear in. ir.ts derives the kind lists from this table,
// check.ts and the generators resolve the reads through `needsOf`, costs.ts's WORK_UNIT is
// checked against it (test/ts/plan/opkinds.test.ts), and scripts/export-schemas.ts writes it
// for the Python side (py/ampipe/pipeline/op_kinds.json): plan.py validates plans and resolves
// data needs with it, and the executor (pipeline/dataflow.py, ops.py) hands each op exactly the
// values its reads name, checks it writes only its `writes`, and frees each value after its last
// reader.

/** Which chunks of another kind an op of chunk c reads: `same` (c; every chunk when the reader
 *  covers the whole sequence), `prev` (c-1, none for chunk 0), `all`, `upto` (0..c), `from` (c..P-1).
 *  A kind that covers the whole sequence in the plan is read as its one whole-sequence op. */
export type ChunkRel = "same" | "prev" | "all" | "upto" | "from";

export interface Read {
  kind: string;
  chunk: ChunkRel;
  /** Which of that kind's `writes` (or `buffers`) it reads: the executor hands it exactly these. */
  values: string[];
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
  /** The data dependencies: the ops (and which of their values) it reads. */
  reads: Read[];
  /** The values it hands to later ops of its pass (the executor's value names, one writer each). */
  writes: string[];
  /** Rows of the step's sequence-long buffers it writes in place (K/V, dK/dV), read by later ops. */
  buffers?: string[];
  /** What it adds to the pass's results: the block output y, the losses, the input gradient dx. */
  outputs?: string[];
  /** `prefix`: it adds into the rows [0, end_c) of its buffers in place, so any two ops of the
   *  kind overlap and must be ordered (deps or one stream). */
  in_place?: "prefix";
  /** The work figure its time is linear in (costs.ts). */
  work: "flops" | "bytes" | "wire_bytes";
}

const r = (kind: string, chunk: ChunkRel, values: string[], when?: Read["when"]): Read =>
  (when ? { kind, chunk, values, when } : { kind, chunk, values });

export const OP_KIND_TABLE = {
  // forward, in the order a chunk goes through them
  qkv: { pass: "forward", stream: "compute", whole: "unless_chunk_qkv", backward: "qkv_bwd", params: true, reads: [], writes: ["q"], buffers: ["k", "v"], work: "flops" },
  attn: { pass: "forward", stream: "compute", whole: "unless_chunk_attention", backward: "attn_bwd", reads: [r("qkv", "upto", ["k", "v"]), r("qkv", "same", ["q"])], writes: ["context"], work: "flops" },
  proj: { pass: "forward", stream: "compute", backward: "proj_bwd", params: true, reads: [r("attn", "same", ["context"])], writes: ["h", "normed"], work: "flops" },
  // routed_before: per expert, the slots chunks 0..c routed (a whole-sequence capacity, chunk by chunk)
  route: { pass: "forward", stream: "compute", backward: "route_bwd", params: true, reads: [r("proj", "same", ["normed"]), r("route", "prev", ["routed_before"], "capacity_sequence")], writes: ["routing", "permuted", "kept", "routed_before"], work: "flops" },
  counts: { pass: "forward", stream: "comm", reads: [r("route", "same", ["permuted"])], writes: ["counts"], work: "wire_bytes" },
  dispatch: { pass: "forward", stream: "comm", backward: "dispatch_bwd", reads: [r("counts", "same", ["counts"]), r("route", "same", ["permuted"])], writes: ["dispatched"], work: "wire_bytes" },
  experts: { pass: "forward", stream: "compute", backward: "experts_bwd", params: true, reads: [r("dispatch", "same", ["dispatched"])], writes: ["expert_out"], work: "flops" },
  combine: { pass: "forward", stream: "comm", backward: "combine_bwd", reads: [r("experts", "same", ["expert_out"])], writes: ["combined"], work: "wire_bytes" },
  shared: { pass: "forward", stream: "compute", requires: "shared_expert", backward: "shared_bwd", params: true, reads: [r("proj", "same", ["normed"])], writes: ["shared_out"], work: "flops" },
  unpermute: { pass: "forward", stream: "compute", backward: "unpermute_bwd", reads: [r("combine", "same", ["combined"]), r("route", "same", ["routing", "permuted"]), r("proj", "same", ["h"]), r("shared", "same", ["shared_out"])], writes: [], outputs: ["y"], work: "bytes" },
  aux_loss: { pass: "forward", stream: "compute", whole: "always", backward: "aux_loss_bwd", reads: [r("route", "all", ["routing", "kept"])], writes: [], outputs: ["aux_loss", "z_loss", "expert_bias_counts"], work: "bytes" },
  // backward, in the order a chunk goes through them
  aux_loss_bwd: { pass: "backward", stream: "compute", whole: "always", reads: [], writes: ["grad_probs_sum", "grad_z_sum"], work: "bytes" },
  unpermute_bwd: { pass: "backward", stream: "compute", reads: [], writes: ["grad_combined", "grad_gates", "grad_h", "grad_shared_out"], work: "bytes" },
  combine_bwd: { pass: "backward", stream: "comm", reads: [r("unpermute_bwd", "same", ["grad_combined"])], writes: ["grad_expert_out"], work: "wire_bytes" },
  experts_bwd: { pass: "backward", stream: "compute", reads: [r("combine_bwd", "same", ["grad_expert_out"])], writes: ["grad_dispatched"], work: "flops" },
  dispatch_bwd: { pass: "backward", stream: "comm", reads: [r("experts_bwd", "same", ["grad_dispatched"])], writes: ["grad_permuted"], work: "wire_bytes" },
  shared_bwd: { pass: "backward", stream: "compute", requires: "shared_expert", reads: [r("unpermute_bwd", "same", ["grad_shared_out"])], writes: ["grad_normed_shared"], work: "flops" },
  route_bwd: { pass: "backward", stream: "compute", reads: [r("dispatch_bwd", "same", ["grad_permuted"]), r("unpermute_bwd", "same", ["grad_gates"]), r("aux_loss_bwd", "same", ["grad_probs_sum", "grad_z_sum"])], writes: ["grad_normed"], work: "flops" },
  proj_bwd: { pass: "backward", stream: "compute", reads: [r("route_bwd", "same", ["grad_normed"]), r("unpermute_bwd", "same", ["grad_h"]), r("shared_bwd", "same", ["grad_normed_shared"])], writes: ["grad_context"], outputs: ["dx"], work: "flops" },
  attn_bwd: { pass: "backward", stream: "compute", whole: "unless_chunk_attention", reads: [r("proj_bwd", "same", ["grad_context"])], writes: ["grad_q"], buffers: ["dk", "dv"], in_place: "prefix", work: "flops" },
  qkv_bwd: { pass: "backward", stream: "compute", whole: "unless_chunk_qkv", reads: [r("attn_bwd", "from", ["dk", "dv"]), r("attn_bwd", "same", ["grad_q"])], writes: [], outputs: ["dx"], work: "flops" },
} as const satisfies Record<string, OpKindSpec>;

export type TableKind = keyof typeof OP_KIND_TABLE;

/** The table as plain data (what the Python executor reads). */
export function opKindTableJson(version: number): string {
  return JSON.stringify({ format: "ampipe.op_kinds", plan_version: version, kinds: OP_KIND_TABLE }, null, 1) + "\n";
}
