// The plan IR (format "ampipe.plan", version 2): the contract between the TypeScript scheduler
// and the Python executor (docs/contracts.md §2, docs/plan.md). The zod schemas here are the
// single source of truth: the TypeScript types are inferred from them and docs/plan.schema.json
// is exported from them (scripts/export-schemas.ts).
import { z } from "zod";
import { OP_KIND_TABLE, type TableKind } from "./opkinds.ts";

export const PLAN_FORMAT = "ampipe.plan";
export const PLAN_VERSION = 3;
/** Why an older version is refused (its op lists lack a kind): regenerate it with `ampipe plan`. */
export const OLD_VERSIONS: Record<number, string> = {
  1: "version 2 added the per-chunk 'counts' op (the count exchange before each dispatch) and 'capacity_scope'",
  2: "version 3 added dims.moe_shared_expert_intermediate_size and the per-chunk 'shared'/'shared_bwd' ops of a shared expert",
};

type KindsOf<P extends "forward" | "backward"> = {
  [K in TableKind]: (typeof OP_KIND_TABLE)[K]["pass"] extends P ? K : never;
}[TableKind];
export type ForwardKind = KindsOf<"forward">;
export type BackwardKind = KindsOf<"backward">;
export type OpKind = TableKind;
const kindsOf = <P extends "forward" | "backward">(pass: P) =>
  (Object.keys(OP_KIND_TABLE) as OpKind[]).filter((k) => OP_KIND_TABLE[k].pass === pass) as KindsOf<P>[];
/** The kinds of each pass (src/plan/opkinds.ts), in the order a chunk goes through them. */
export const FORWARD_KINDS: readonly ForwardKind[] = kindsOf("forward");
export const BACKWARD_KINDS: readonly BackwardKind[] = kindsOf("backward");
export const OP_KINDS: readonly OpKind[] = [...FORWARD_KINDS, ...BACKWARD_KINDS];

/** Kinds that move tokens (or the counts before them) between ranks; they must run on a `comm` stream. */
export const COMM_KINDS: ReadonlySet<OpKind> = new Set<OpKind>(OP_KINDS.filter((k) => OP_KIND_TABLE[k].stream === "comm"));
/**
 * Kinds that always cover the whole sequence (`chunk: null`). `qkv`/`qkv_bwd` do too when
 * `chunk_qkv` is false, and `attn`/`attn_bwd` when `chunk_attention` is false (see `isWholeSequence`).
 */
export const WHOLE_SEQUENCE_KINDS: ReadonlySet<OpKind> = new Set<OpKind>(
  OP_KINDS.filter((k) => (OP_KIND_TABLE[k] as { whole?: string }).whole === "always"));

/** Whether an op of `kind` covers the whole sequence in a plan with these flags. */
export function isWholeSequence(kind: OpKind, chunkQkv: boolean, chunkAttention = true): boolean {
  const whole = (OP_KIND_TABLE[kind] as { whole?: string }).whole;
  return whole === "always" || (whole === "unless_chunk_qkv" && !chunkQkv) || (whole === "unless_chunk_attention" && !chunkAttention);
}

/** Whether a plan for a block with (or without) a shared expert has ops of `kind`. */
export function kindPresent(kind: OpKind, sharedExpert: boolean): boolean {
  const req = (OP_KIND_TABLE[kind] as { requires?: string }).requires;
  return req === undefined || (req === "shared_expert" && sharedExpert);
}

/** Whether the block has a shared expert (its plan has `shared`/`shared_bwd` ops). */
export const hasSharedExpert = (dims: { moe_shared_expert_intermediate_size?: number | null }): boolean =>
  dims.moe_shared_expert_intermediate_size !== null && dims.moe_shared_expert_intermediate_size !== undefined;

export const DTYPES = ["fp32", "bf16", "fp16"] as const;
export type Dtype = (typeof DTYPES)[number];
export const DTYPE_BYTES: Record<Dtype, number> = { fp32: 4, bf16: 2, fp16: 2 };

/**
 * `moe-overlap` is the peer baseline (Tutel's `a2a_ffn_overlap_degree`): attention over the whole
 * sequence first, then dispatch / experts / combine pipelined over the chunks. The others are AMPipe's.
 */
export const VARIANTS = ["sequential", "grouped", "interleaved", "moe-overlap"] as const;

/** Where a capacity is sized: per chunk (the paper's), or over the whole sequence (exact with the position drop policy). */
export const CAPACITY_SCOPES = ["chunk", "sequence"] as const;
export type CapacityScope = (typeof CAPACITY_SCOPES)[number];
export type Variant = (typeof VARIANTS)[number];

const posInt = z.number().int().positive();

/** The resolved dimensions of one block: what the plan was made for. Python checks them against its block. */
export const BlockDimsSchema = z
  .object({
    seq_length: posInt.describe("Tokens per sequence (s)."),
    micro_batch_size: posInt.describe("Sequences per microbatch (b)."),
    hidden_size: posInt.describe("Model width (h)."),
    num_attention_heads: posInt.describe("Query heads."),
    num_query_groups: posInt.describe("Key/value heads (GQA groups); equal to num_attention_heads without GQA."),
    kv_channels: posInt.describe("Head dimension."),
    num_experts: posInt.describe("Experts in the MoE layer (over all expert-parallel ranks)."),
    moe_router_topk: posInt.describe("Experts chosen per token (k)."),
    moe_ffn_hidden_size: posInt.describe("Hidden size of one expert's FFN."),
    moe_shared_expert_intermediate_size: posInt.nullable().default(null).describe("Hidden size of the shared expert's FFN, or null (no shared expert: the plan has no shared/shared_bwd ops)."),
    expert_model_parallel_size: posInt.describe("Ranks the experts are sharded over."),
    dtype: z.enum(DTYPES).describe("Activation dtype."),
  })
  .strict()
  .superRefine((d, ctx) => {
    const issue = (path: string, message: string) => ctx.addIssue({ code: "custom", path: [path], message });
    if (d.num_attention_heads % d.num_query_groups !== 0)
      issue("num_query_groups", `num_query_groups (${d.num_query_groups}) must divide num_attention_heads (${d.num_attention_heads})`);
    if (d.moe_router_topk > d.num_experts)
      issue("moe_router_topk", `moe_router_topk (${d.moe_router_topk}) must be <= num_experts (${d.num_experts})`);
    if (d.num_experts % d.expert_model_parallel_size !== 0)
      issue("expert_model_parallel_size", `expert_model_parallel_size (${d.expert_model_parallel_size}) must divide num_experts (${d.num_experts})`);
  });
// The input type: dims written before the shared-expert field (or without it) are complete.
export type BlockDims = z.input<typeof BlockDimsSchema>;
/** Dims as parsed: every field present (what a plan carries). */
export type ResolvedDims = z.output<typeof BlockDimsSchema>;

export const StreamSchema = z
  .object({
    name: z.string().min(1).describe("Stream name that ops refer to."),
    kind: z.enum(["compute", "comm"]).describe("compute: calling thread / compute CUDA stream; comm: all-to-all thread / its own CUDA stream."),
  })
  .strict();
export type Stream = z.infer<typeof StreamSchema>;

export const OpSchema = z
  .object({
    id: z.string().min(1).describe("Unique id, by convention `f.<kind>.<chunk>` / `b.<kind without _bwd>.<chunk>`, or without `.<chunk>` for whole-sequence ops."),
    kind: z.enum(OP_KINDS as [OpKind, ...OpKind[]]).describe("What the op computes (docs/plan.md)."),
    chunk: z.number().int().nonnegative().nullable().describe("Chunk index, or null for a whole-sequence op."),
    stream: z.string().min(1).describe("Name of the stream the op runs on; ops of one stream run in list order."),
    deps: z.array(z.string()).describe("Ids of earlier ops in the same list that must finish first."),
  })
  .strict();
export type Op = z.infer<typeof OpSchema>;

export const PlanSchema = z
  .object({
    format: z.literal(PLAN_FORMAT),
    version: z.literal(PLAN_VERSION),
    variant: z.string().min(1).describe("Generator that made the plan: sequential | grouped | interleaved | moe-overlap (informative)."),
    dims: BlockDimsSchema,
    boundaries: z.array(z.number().int().nonnegative()).min(2).describe("P+1 chunk boundaries, 0 = b0 < ... < bP = seq_length."),
    chunk_qkv: z.boolean().describe("QKV projection per chunk (else one whole-sequence qkv op)."),
    chunk_attention: z.boolean().optional().describe("Attention per chunk (default true); false: one whole-sequence attn op (needs chunk_qkv false), as in the moe-overlap variant."),
    capacity_scope: z.enum(CAPACITY_SCOPES).describe("With a capacity factor: capacity per chunk (chunk), or the whole sequence's applied chunk by chunk (sequence: route[c] then needs route[c-1])."),
    streams: z.array(StreamSchema).min(1),
    forward: z.array(OpSchema),
    backward: z.array(OpSchema),
    meta: z.looseObject({}).optional().describe("Free-form: generator, predicted timings, planner search summary."),
  })
  .strict();
export type Plan = z.infer<typeof PlanSchema>;

/** The conventional id of an op: `f.attn.2`, `b.attn.2` (for attn_bwd), `f.aux_loss`, `b.qkv` (whole-sequence qkv_bwd). */
export function opId(kind: OpKind, chunk: number | null): string {
  const bwd = kind.endsWith("_bwd");
  const base = bwd ? kind.slice(0, -"_bwd".length) : kind;
  return `${bwd ? "b" : "f"}.${base}${chunk === null ? "" : `.${chunk}`}`;
}

export function numChunks(plan: Pick<Plan, "boundaries">): number {
  return plan.boundaries.length - 1;
}

/** Uniform boundaries for P chunks of a sequence of length S (chunk sizes differ by at most one). */
export function uniformBoundaries(seqLength: number, degree: number): number[] {
  if (!Number.isInteger(degree) || degree < 1) throw new Error(`degree must be a positive integer, got ${degree}`);
  if (degree > seqLength) throw new Error(`degree (${degree}) must be <= seq_length (${seqLength})`);
  return Array.from({ length: degree + 1 }, (_, c) => Math.round((c * seqLength) / degree));
}

/** Throws an error naming `field` unless `b` is 0 = b0 < b1 < ... < bP = seqLength (integers). */
export function checkBoundaries(b: readonly number[], seqLength: number, field = "boundaries"): void {
  if (b.length < 2) throw new Error(`${field}: needs at least 2 entries [0, seq_length], got ${JSON.stringify(b)}`);
  if (b[0] !== 0) throw new Error(`${field}[0] must be 0, got ${b[0]}`);
  if (b[b.length - 1] !== seqLength)
    throw new Error(`${field}[${b.length - 1}] must equal seq_length (${seqLength}), got ${b[b.length - 1]}`);
  for (let i = 1; i < b.length; i++) {
    if (!Number.isInteger(b[i])) throw new Error(`${field}[${i}] must be an integer, got ${b[i]}`);
    if (b[i] <= b[i - 1]) throw new Error(`${field}[${i}] (${b[i]}) must be greater than ${field}[${i - 1}] (${b[i - 1]})`);
  }
}

/** Formats zod issues as `path: message` lines, so errors name the field. */
export function formatIssues(error: z.ZodError, root = ""): string {
  return error.issues
    .map((i) => {
      const path = [root, ...i.path.map((p) => (typeof p === "number" ? `[${p}]` : String(p)))]
        .filter((s) => s !== "")
        .join(".")
        .replace(/\.\[/g, "[");
      return `${path || "(root)"}: ${i.message}`;
    })
    .join("\n");
}

/** Parses dims, throwing an error that names each bad field. */
export function parseDims(value: unknown, root = "dims"): ResolvedDims {
  const r = BlockDimsSchema.safeParse(value);
  if (!r.success) throw new Error(`invalid block dims:\n${formatIssues(r.error, root)}`);
  return r.data;
}

/** Parses the structure of a plan (no dependency checks; see check.ts), naming each bad field. */
export function parsePlanShape(value: unknown): Plan {
  if (value && typeof value === "object") {
    const v = value as Record<string, unknown>;
    if (v.format !== PLAN_FORMAT) throw new Error(`format: expected "${PLAN_FORMAT}", got ${JSON.stringify(v.format)}`);
    if (v.version !== PLAN_VERSION) {
      const old = typeof v.version === "number" ? OLD_VERSIONS[v.version] : undefined;
      throw new Error(`version: unsupported plan version ${JSON.stringify(v.version)} (this reader supports ${PLAN_VERSION})` +
        (old ? `; ${old}: regenerate it with \`ampipe plan\`` : ""));
    }
  }
  const r = PlanSchema.safeParse(value);
  if (!r.success) {
    // Name the op as well as its index: "forward[6] (f.attn.1).kind: ...".
    const v = value as Record<string, Array<{ id?: unknown }> | undefined>;
    const lines = formatIssues(r.error).split("\n").map((line) =>
      line.replace(/^(forward|backward)\[(\d+)\]/, (m, list: string, i: string) => {
        const id = v?.[list]?.[Number(i)]?.id;
        return typeof id === "string" ? `${m} (${id})` : m;
      }),
    );
    throw new Error(`invalid plan:\n${lines.join("\n")}`);
  }
  return r.data;
}

export function planJsonSchema(): Record<string, unknown> {
  const schema = z.toJSONSchema(PlanSchema, { target: "draft-2020-12" }) as Record<string, unknown>;
  return {
    $schema: schema.$schema,
    title: `ampipe plan (format ampipe.plan, version ${PLAN_VERSION})`,
    description: "An intra-block pipeline schedule for one MoE transformer block: see docs/plan.md.",
    ...Object.fromEntries(Object.entries(schema).filter(([k]) => k !== "$schema")),
  };
}
