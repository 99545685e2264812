// The experiment config: one zod schema for its sections (model, parallelism, pipeline, run,
// and data and train for `ampipe train`). Keys are snake_case, Megatron-LM's flag names where
// one exists, so the resolved object travels to Python unchanged (docs/contracts.md section 1).
//
// Parsing fills defaults, checks every field and the invariants that tie fields together,
// and resolves the derived model fields (num_query_groups, kv_channels), so consumers get
// concrete numbers. Every error carries the dotted path of the field it is about.
import { z } from "zod";

const posInt = () => z.int().min(1);
const nonNegInt = () => z.int().min(0);
const nonNegFloat = () => z.number().min(0);

/** `model`: a Megatron-style GPT-MoE block stack. Field names follow Megatron-LM's flags. */
export const ModelSchema = z.strictObject({
  num_layers: posInt().default(2),
  hidden_size: posInt().default(128),
  num_attention_heads: posInt().default(4),
  /** GQA groups; null = num_attention_heads (resolved). */
  num_query_groups: posInt().nullable().default(null),
  /** Head dimension; null = hidden_size / num_attention_heads (resolved). */
  kv_channels: posInt().nullable().default(null),
  seq_length: posInt().default(256),
  micro_batch_size: posInt().default(2),
  vocab_size: posInt().default(512),
  ffn_hidden_size: posInt().default(512),
  normalization: z.enum(["LayerNorm", "RMSNorm"]).default("LayerNorm"),
  norm_epsilon: z.number().gt(0).default(1e-5),
  position_embedding_type: z.enum(["learned_absolute", "rope"]).default("rope"),
  rotary_base: z.number().gt(0).default(10000),
  attention_dropout: z.number().min(0).lt(1).default(0),
  hidden_dropout: z.number().min(0).lt(1).default(0),
  add_bias_linear: z.boolean().default(false),
  untie_embeddings_and_output_weights: z.boolean().default(false),
  init_method_std: z.number().gt(0).default(0.02),
  num_experts: posInt().default(4),
  /** An MoE layer every k-th layer; the others are dense. */
  moe_layer_freq: posInt().default(1),
  moe_router_topk: posInt().default(2),
  moe_router_score_order: z.enum(["softmax_then_topk", "topk_then_softmax"]).default("softmax_then_topk"),
  moe_router_topk_renormalize: z.boolean().default(false),
  /**
   * Megatron's router options (same names and semantics): sigmoid scores (the gates are the chosen
   * sigmoids, normalised to sum 1 for top-k > 1; score_order and renormalize do not apply), a
   * per-expert bias that changes which experts are chosen but not the gates (aux-loss-free
   * balancing, sigmoid only) updated once per step from the step's counts at bias_update_rate,
   * a factor on the gates, group-limited top-k (num_groups groups, group_topk of them per token).
   */
  moe_router_score_function: z.enum(["softmax", "sigmoid"]).default("softmax"),
  moe_router_enable_expert_bias: z.boolean().default(false),
  moe_router_bias_update_rate: nonNegFloat().default(1e-3),
  moe_router_topk_scaling_factor: z.number().gt(0).nullable().default(null),
  moe_router_num_groups: posInt().nullable().default(null),
  moe_router_group_topk: posInt().nullable().default(null),
  /** Tokens per expert = factor * T * k / E; null = dropless. */
  moe_expert_capacity_factor: z.number().gt(0).nullable().default(null),
  /** Which slots a full expert drops (Megatron's flag): probs keeps the highest gates, position the earliest tokens. */
  moe_token_drop_policy: z.enum(["probs", "position"]).default("probs"),
  moe_aux_loss_coeff: nonNegFloat().default(0.01),
  moe_z_loss_coeff: nonNegFloat().default(0.001),
  moe_ffn_hidden_size: posInt().default(256),
  moe_expert_activation: z.enum(["gelu", "swiglu"]).default("swiglu"),
  /** A dense expert every token goes through beside the routed ones (FFN width; null = none), optionally sigmoid-gated. */
  moe_shared_expert_intermediate_size: posInt().nullable().default(null),
  moe_shared_expert_gate: z.boolean().default(false),
  /** LayerNorm/RMSNorm (model.normalization) of each query and key head before rope. */
  qk_layernorm: z.boolean().default(false),
  dtype: z.enum(["fp32", "bf16", "fp16"]).default("fp32"),
});

export const ParallelismSchema = z.strictObject({
  /** Number of ranks. */
  world_size: posInt().default(2),
  expert_model_parallel_size: posInt().default(2),
  device: z.enum(["cpu", "cuda", "auto"]).default("cpu"),
  /** auto = gloo on cpu, nccl on cuda (decided at launch, when the device is known). */
  backend: z.enum(["gloo", "nccl", "auto"]).default("auto"),
});

export const EmulatedCommSchema = z.strictObject({
  latency_us: nonNegFloat(),
  bandwidth_gbps: z.number().gt(0),
  world_size: posInt(),
});

const degree = z.union([posInt(), z.literal("auto")], {
  error: 'expected a positive integer or "auto"',
});

export const PipelineSchema = z.strictObject({
  /** Pipe degree P (number of sequence chunks), or auto (the planner chooses). */
  degree: degree.default("auto"),
  /** moe-overlap: the peer baseline (attention whole, the MoE layer pipelined), for comparison runs. */
  variant: z.enum(["sequential", "grouped", "interleaved", "moe-overlap", "auto"]).default("auto"),
  /** Explicit chunk boundaries [0, ..., seq_length], or null. */
  boundaries: z.array(nonNegInt()).nullable().default(null),
  /** QKV projection per chunk (else one QKV op for the whole sequence). */
  chunk_qkv: z.boolean().default(true),
  /**
   * With a capacity factor, where it is sized in the pipelined block: chunk (per chunk, the
   * paper's: a different function from the baseline) or sequence (the whole sequence's,
   * chunk by chunk: exact, needs model.moe_token_drop_policy position).
   */
  capacity_scope: z.enum(["chunk", "sequence"]).default("chunk"),
  /** A modelled interconnect (one device standing in for many), or null for real comm. */
  emulated_comm: EmulatedCommSchema.nullable().default(null),
});

export const RunSchema = z.strictObject({
  steps: posInt().default(4),
  seed: nonNegInt().default(1234),
  /** Steps run before measuring starts. */
  warmup: nonNegInt().default(1),
  output_dir: z.string().min(1).default("runs/default"),
});

/** `data`: a Megatron-LM indexed dataset (PREFIX.bin + PREFIX.idx) for `ampipe train`. */
export const DataSchema = z.strictObject({
  /** The dataset prefix; null = the Brown Corpus, built with `tokenizer` on first use. */
  path: z.string().min(1).nullable().default(null),
  tokenizer: z.enum(["byte", "gpt2"]).default("byte"),
  /** Megatron's --split: train,valid weights over documents. */
  split: z.string().regex(/^\s*\d+(\.\d+)?\s*,\s*\d+(\.\d+)?\s*$/, 'expected "train,valid" weights such as "98,2"')
    .refine((v) => v.split(",").every((w) => Number(w) > 0), "both weights must be > 0").default("95,5"),
  /** The document split of a dataset that carries none (Megatron-LM's own files). */
  seed: nonNegInt().default(1234),
});

/** `train`: the optimiser, schedule and loop of `ampipe train` (Megatron-LM's flag names). */
export const TrainSchema = z.strictObject({
  steps: posInt().default(200),
  lr: z.number().gt(0).default(1e-3),
  min_lr: z.number().min(0).default(1e-4),
  warmup_steps: nonNegInt().default(10),
  weight_decay: nonNegFloat().default(0.1),
  adam_beta1: z.number().min(0).lt(1).default(0.9),
  adam_beta2: z.number().min(0).lt(1).default(0.95),
  adam_eps: z.number().gt(0).default(1e-8),
  /** Clip the global gradient norm to this; 0 = no clipping. */
  clip_grad: nonNegFloat().default(1.0),
  /** Samples per optimiser step over all ranks: micro_batch_size x world_size x accumulation. */
  global_batch_size: posInt().default(8),
  eval_interval: posInt().default(50),
  eval_iters: posInt().default(4),
  checkpoint_interval: posInt().default(50),
  /** fp16 only: the dynamic loss scale's initial value. */
  initial_loss_scale: z.number().gt(0).default(65536),
});

/** One model of a bench grid: a name and the model fields that differ from the config's `model`. */
export const BenchModelSchema = z.strictObject({
  name: z.string().regex(/^[A-Za-z0-9_.-]+$/, "letters, digits, '_', '.' and '-' only (it names files)"),
  ...Object.fromEntries(Object.entries(ModelSchema.shape).map(([k, v]) => [k, (v as z.ZodDefault<z.ZodType>).unwrap().optional()])),
}) as unknown as z.ZodType<{ name: string } & Partial<z.output<typeof ModelSchema>>>;

/** The fields of `bench` a quick slice may override (`ampipe bench --quick`). */
const benchFields = {
  /** Models swept (each: a name and the model fields that differ from `model`); null = the config's model. */
  models: z.array(BenchModelSchema).min(1).nullable().default(null),
  /** Sequence lengths swept; null = [model.seq_length]. */
  seq_lengths: z.array(posInt()).min(1).nullable().default(null),
  /** AMPipe variants swept at each of `degrees` (uniform boundaries). */
  variants: z.array(z.enum(["grouped", "interleaved"])).default(["grouped", "interleaved"]),
  degrees: z.array(z.int().min(2)).default([2, 4]),
  /** Also run the planner's own choice (variant, degree, boundaries) at each sequence length. */
  planner: z.boolean().default(true),
  /** The peer baseline (Tutel-style overlap inside the MoE layer) at these degrees; [] = none. */
  moe_overlap_degrees: z.array(z.int().min(2)).default([2, 4]),
  /**
   * Emulated comm/compute ratios: per sequence length the emulated bandwidth is set so that the
   * sequential block's four all-to-alls take r x its measured compute time (latency and world size
   * from pipeline.emulated_comm). null = pipeline.emulated_comm as given, or real comm when that is null.
   */
  comm_compute_ratios: z.array(z.number().gt(0)).min(1).nullable().default(null),
  /** Measured repetitions per case (ABBA order against the sequential block) and warm-up steps. */
  steps: posInt().default(6),
  warmup: nonNegInt().default(1),
  /** The pipe degree of the calibration run at each sequence length (grouped, uniform). */
  calibration_degree: z.int().min(2).default(2),
};

export const BenchQuickSchema = z.strictObject(
  Object.fromEntries(Object.entries(benchFields).map(([k, v]) => [k, v.unwrap().optional()])) as {
    [K in keyof typeof benchFields]: z.ZodOptional<ReturnType<(typeof benchFields)[K]["unwrap"]>>;
  },
);

/** `bench`: the grid `ampipe bench` sweeps (docs/bench.md). */
export const BenchSchema = z.strictObject({
  ...benchFields,
  /** The quick slice (`ampipe bench --quick`, what `npm start` runs): fields that replace the ones above. */
  quick: BenchQuickSchema.nullable().default(null),
});

const ExperimentObject = z.strictObject({
  model: ModelSchema.default(() => ModelSchema.parse({})),
  parallelism: ParallelismSchema.default(() => ParallelismSchema.parse({})),
  pipeline: PipelineSchema.default(() => PipelineSchema.parse({})),
  run: RunSchema.default(() => RunSchema.parse({})),
  data: DataSchema.default(() => DataSchema.parse({})),
  train: TrainSchema.default(() => TrainSchema.parse({})),
  bench: BenchSchema.default(() => BenchSchema.parse({})),
});

type Parsed = z.output<typeof ExperimentObject>;

/** The invariants between fields (docs/contracts.md section 1). Each issue names one field. */
function checkInvariants(c: Parsed, ctx: z.RefinementCtx): void {
  const issue = (path: string, message: string) =>
    ctx.addIssue({ code: "custom", path: path.split("."), message });
  const m = c.model;
  const p = c.parallelism;

  if (m.kv_channels === null && m.hidden_size % m.num_attention_heads !== 0) {
    issue("model.num_attention_heads",
      `must divide model.hidden_size (${m.hidden_size}) unless model.kv_channels is given; got ${m.num_attention_heads}`);
  }
  if (m.num_query_groups !== null && m.num_attention_heads % m.num_query_groups !== 0) {
    issue("model.num_query_groups",
      `must divide model.num_attention_heads (${m.num_attention_heads}); got ${m.num_query_groups}`);
  }
  if (m.moe_router_topk > m.num_experts) {
    issue("model.moe_router_topk", `must be <= model.num_experts (${m.num_experts}); got ${m.moe_router_topk}`);
  }
  const headDim = m.kv_channels ?? m.hidden_size / m.num_attention_heads;
  if (m.position_embedding_type === "rope" && Number.isInteger(headDim) && headDim % 2 !== 0) {
    issue("model.kv_channels", `rotary embeddings need an even head dim; got ${headDim}`);
  }
  if (m.moe_router_enable_expert_bias && m.moe_router_score_function !== "sigmoid") {
    issue("model.moe_router_enable_expert_bias",
      `needs model.moe_router_score_function: sigmoid (as in Megatron); got ${m.moe_router_score_function}`);
  }
  if (m.moe_router_group_topk !== null) {
    const G = m.moe_router_num_groups;
    const Gk = m.moe_router_group_topk;
    if (G === null) issue("model.moe_router_group_topk", "needs model.moe_router_num_groups (group-limited routing)");
    else if (m.num_experts % G !== 0) issue("model.moe_router_num_groups", `must divide model.num_experts (${m.num_experts}); got ${G}`);
    else if (Gk > G) issue("model.moe_router_group_topk", `must be <= model.moe_router_num_groups (${G}); got ${Gk}`);
    else if (m.moe_router_topk > Gk * (m.num_experts / G))
      issue("model.moe_router_group_topk",
        `${Gk} group(s) of ${m.num_experts / G} experts cannot hold model.moe_router_topk (${m.moe_router_topk}) experts`);
  }
  if (m.moe_shared_expert_gate && m.moe_shared_expert_intermediate_size === null) {
    issue("model.moe_shared_expert_gate", "needs model.moe_shared_expert_intermediate_size (a shared expert to gate)");
  }
  if (m.moe_shared_expert_intermediate_size !== null && m.add_bias_linear) {
    issue("model.moe_shared_expert_intermediate_size",
      "shared experts have no biases (as in Megatron): needs model.add_bias_linear false");
  }
  if (m.moe_layer_freq > m.num_layers) {
    issue("model.moe_layer_freq", `must be <= model.num_layers (${m.num_layers}); got ${m.moe_layer_freq}`);
  }
  if (m.num_experts % p.expert_model_parallel_size !== 0) {
    issue("model.num_experts",
      `must be divisible by parallelism.expert_model_parallel_size (${p.expert_model_parallel_size}); got ${m.num_experts}`);
  }
  if (p.world_size % p.expert_model_parallel_size !== 0) {
    issue("parallelism.world_size",
      `must be divisible by parallelism.expert_model_parallel_size (${p.expert_model_parallel_size}); got ${p.world_size}`);
  }
  if (p.backend === "nccl" && p.device === "cpu") {
    issue("parallelism.backend", "nccl needs parallelism.device cuda (or auto); use gloo on cpu");
  }

  const t = c.train;
  const perStep = m.micro_batch_size * p.world_size;
  if (t.global_batch_size % perStep !== 0) {
    issue("train.global_batch_size",
      `must be a multiple of model.micro_batch_size (${m.micro_batch_size}) x parallelism.world_size (${p.world_size}) = ${perStep}; got ${t.global_batch_size}`);
  }
  if (t.min_lr > t.lr) issue("train.min_lr", `must be <= train.lr (${t.lr}); got ${t.min_lr}`);
  if (t.warmup_steps > t.steps) issue("train.warmup_steps", `must be <= train.steps (${t.steps}); got ${t.warmup_steps}`);
  const b = c.bench;
  for (const [field, value] of [["", b], ["quick.", b.quick ?? {}]] as const) {
    const seqs = value.seq_lengths ?? b.seq_lengths ?? [m.seq_length];
    for (const key of ["degrees", "moe_overlap_degrees", "calibration_degree"] as const) {
      const v = value[key];
      if (v === undefined) continue;
      const worst = Math.max(...(Array.isArray(v) ? v : [v]));
      if (worst > Math.min(...seqs))
        issue(`bench.${field}${key}`, `${worst} exceeds the shortest sequence length (${Math.min(...seqs)})`);
    }
    if (value.comm_compute_ratios && c.pipeline.emulated_comm === null)
      issue(`bench.${field}comm_compute_ratios`,
        "needs pipeline.emulated_comm (its latency_us and world_size; the bandwidth is set per sequence length)");
  }

  const pl = c.pipeline;
  if (pl.capacity_scope === "sequence" && m.moe_token_drop_policy !== "position") {
    issue("pipeline.capacity_scope",
      "sequence needs model.moe_token_drop_policy: position (with probs, which tokens a chunk drops depends on later chunks); " +
      `got model.moe_token_drop_policy: ${m.moe_token_drop_policy}`);
  }
  if (pl.degree !== "auto" && pl.degree > m.seq_length) {
    issue("pipeline.degree", `must be <= model.seq_length (${m.seq_length}); got ${pl.degree}`);
  }
  if (pl.boundaries !== null) {
    const b = pl.boundaries;
    if (b.length < 2) {
      issue("pipeline.boundaries", `needs at least two entries [0, ..., ${m.seq_length}]; got [${b.join(", ")}]`);
    } else if (b[0] !== 0 || b[b.length - 1] !== m.seq_length) {
      issue("pipeline.boundaries",
        `must start at 0 and end at model.seq_length (${m.seq_length}); got [${b.join(", ")}]`);
    } else {
      const bad = b.findIndex((v, i) => i > 0 && v <= b[i - 1]);
      if (bad > 0) {
        issue("pipeline.boundaries",
          `must be strictly increasing; entry ${bad} (${b[bad]}) is not greater than entry ${bad - 1} (${b[bad - 1]})`);
      }
    }
    if (pl.degree !== "auto" && b.length !== pl.degree + 1) {
      issue("pipeline.boundaries",
        `must have pipeline.degree + 1 = ${pl.degree + 1} entries; got ${b.length}`);
    }
  }
}

/** Fills the derived fields, so consumers never see their null shorthand. */
function resolveDerived(c: Parsed) {
  const m = c.model;
  const num_query_groups = m.num_query_groups ?? m.num_attention_heads;
  const kv_channels = m.kv_channels ?? m.hidden_size / m.num_attention_heads;
  return { ...c, model: { ...m, num_query_groups, kv_channels } };
}

export const ExperimentSchema = ExperimentObject.superRefine(checkInvariants).transform(resolveDerived);

/**
 * The config as a user writes it, as JSON Schema: every field's type, range, choices and default
 * (the cross-field invariants above are code). Shipped to Python as package data
 * (py/ampipe/config.schema.json, by scripts/export-schemas.ts), where the config readers take
 * their defaults and per-field checks from it.
 */
export function configJsonSchema(): Record<string, unknown> {
  return z.toJSONSchema(ExperimentObject, { io: "input", target: "draft-2020-12" }) as Record<string, unknown>;
}

/** What a config file may contain: every field optional, shorthand (null, auto) allowed. */
export type ExperimentConfigInput = z.input<typeof ExperimentSchema>;
/** The resolved config: defaults filled, invariants checked, derived fields concrete. */
export type ExperimentConfig = z.output<typeof ExperimentSchema>;
export type ModelConfig = ExperimentConfig["model"];
export type ParallelismConfig = ExperimentConfig["parallelism"];
export type PipelineConfig = ExperimentConfig["pipeline"];
export type RunConfig = ExperimentConfig["run"];
export type DataConfig = ExperimentConfig["data"];
export type TrainConfig = ExperimentConfig["train"];
export type BenchConfig = ExperimentConfig["bench"];
export type EmulatedCommConfig = z.output<typeof EmulatedCommSchema>;
