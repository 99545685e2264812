// Megatron-LM command-line flags (pretrain_gpt.py) to and from an ampipe experiment config.
//
// `configFromMegatron(flags)` reads the flags that map onto ampipe's model, parallelism, train
// and data fields (Megatron's defaults apply to the ones not given, so the config describes the
// same model and training run Megatron would), warns about each flag it ignores (naming it and
// why), and refuses contradictions naming both flags, and settings ampipe cannot run (a weighted
// blend of datasets, another learning-rate decay) naming the flag. `megatronFromConfig(cfg)`
// writes the flags back; flags -> config -> flags -> config is the identity on the config.
import { applyOverrides, ConfigError, resolveConfig } from "./load.ts";
import { DataSchema, ModelSchema, type ExperimentConfig } from "./schema.ts";

/** `list`: Megatron's nargs="*" (every following token that is not a --flag). */
type Kind = "int" | "float" | "str" | "bool" | "list";

interface FlagSpec {
  kind: Kind;
  /** The config field it sets (section.field). */
  field?: string;
  /** Allowed values (str flags). */
  choices?: readonly string[];
}

/** Every Megatron-LM flag ampipe reads. Booleans are store_true flags. */
const FLAGS: Record<string, FlagSpec> = {
  "--num-layers": { kind: "int", field: "model.num_layers" },
  "--hidden-size": { kind: "int", field: "model.hidden_size" },
  "--num-attention-heads": { kind: "int", field: "model.num_attention_heads" },
  "--group-query-attention": { kind: "bool" },
  "--num-query-groups": { kind: "int" },
  "--kv-channels": { kind: "int", field: "model.kv_channels" },
  "--seq-length": { kind: "int", field: "model.seq_length" },
  "--micro-batch-size": { kind: "int", field: "model.micro_batch_size" },
  "--vocab-size": { kind: "int", field: "model.vocab_size" },
  "--ffn-hidden-size": { kind: "int", field: "model.ffn_hidden_size" },
  "--normalization": { kind: "str", field: "model.normalization", choices: ["LayerNorm", "RMSNorm"] },
  "--norm-epsilon": { kind: "float", field: "model.norm_epsilon" },
  "--position-embedding-type": { kind: "str", field: "model.position_embedding_type", choices: ["learned_absolute", "rope"] },
  "--rotary-base": { kind: "float", field: "model.rotary_base" },
  "--attention-dropout": { kind: "float", field: "model.attention_dropout" },
  "--hidden-dropout": { kind: "float", field: "model.hidden_dropout" },
  "--disable-bias-linear": { kind: "bool" },
  "--untie-embeddings-and-output-weights": { kind: "bool", field: "model.untie_embeddings_and_output_weights" },
  "--init-method-std": { kind: "float", field: "model.init_method_std" },
  "--num-experts": { kind: "int", field: "model.num_experts" },
  "--moe-layer-freq": { kind: "int", field: "model.moe_layer_freq" },
  "--moe-router-topk": { kind: "int", field: "model.moe_router_topk" },
  "--moe-router-pre-softmax": { kind: "bool" },
  "--moe-router-score-function": { kind: "str", field: "model.moe_router_score_function", choices: ["softmax", "sigmoid"] },
  "--moe-router-enable-expert-bias": { kind: "bool", field: "model.moe_router_enable_expert_bias" },
  "--moe-router-bias-update-rate": { kind: "float", field: "model.moe_router_bias_update_rate" },
  "--moe-router-topk-scaling-factor": { kind: "float", field: "model.moe_router_topk_scaling_factor" },
  "--moe-router-num-groups": { kind: "int", field: "model.moe_router_num_groups" },
  "--moe-router-group-topk": { kind: "int", field: "model.moe_router_group_topk" },
  "--moe-shared-expert-intermediate-size": { kind: "int", field: "model.moe_shared_expert_intermediate_size" },
  "--moe-shared-expert-gate": { kind: "bool", field: "model.moe_shared_expert_gate" },
  "--qk-layernorm": { kind: "bool", field: "model.qk_layernorm" },
  "--moe-router-dtype": { kind: "str", choices: ["fp32"] },
  "--moe-router-load-balancing-type": { kind: "str", choices: ["aux_loss", "none"] },
  "--moe-expert-capacity-factor": { kind: "float", field: "model.moe_expert_capacity_factor" },
  "--moe-token-drop-policy": { kind: "str", field: "model.moe_token_drop_policy", choices: ["probs", "position"] },
  "--moe-aux-loss-coeff": { kind: "float", field: "model.moe_aux_loss_coeff" },
  "--moe-z-loss-coeff": { kind: "float", field: "model.moe_z_loss_coeff" },
  "--moe-ffn-hidden-size": { kind: "int", field: "model.moe_ffn_hidden_size" },
  "--swiglu": { kind: "bool" },
  "--expert-model-parallel-size": { kind: "int", field: "parallelism.expert_model_parallel_size" },
  "--bf16": { kind: "bool" },
  "--fp16": { kind: "bool" },
  "--seed": { kind: "int", field: "run.seed" },
  // training (ampipe train's `train` section)
  "--train-iters": { kind: "int", field: "train.steps" },
  "--lr": { kind: "float", field: "train.lr" },
  "--min-lr": { kind: "float", field: "train.min_lr" },
  "--lr-warmup-iters": { kind: "int", field: "train.warmup_steps" },
  "--lr-decay-style": { kind: "str", choices: ["cosine"] },
  "--lr-decay-iters": { kind: "int" },
  "--weight-decay": { kind: "float", field: "train.weight_decay" },
  "--clip-grad": { kind: "float", field: "train.clip_grad" },
  "--adam-beta1": { kind: "float", field: "train.adam_beta1" },
  "--adam-beta2": { kind: "float", field: "train.adam_beta2" },
  "--adam-eps": { kind: "float", field: "train.adam_eps" },
  "--initial-loss-scale": { kind: "float", field: "train.initial_loss_scale" },
  "--global-batch-size": { kind: "int", field: "train.global_batch_size" },
  "--eval-interval": { kind: "int", field: "train.eval_interval" },
  "--eval-iters": { kind: "int", field: "train.eval_iters" },
  "--save-interval": { kind: "int", field: "train.checkpoint_interval" },
  // data (the `data` section)
  "--data-path": { kind: "list" },
  "--split": { kind: "str" },
};

/** Megatron-LM flags with no ampipe equivalent that are safe to drop, and why. A value
 *  that changes the model (e.g. tensor parallelism > 1) is still only a warning: ampipe
 *  pipelines one block on one TP/PP/CP rank. */
const IGNORED: Record<string, { takesValue: boolean; why: string }> = {
  "--tensor-model-parallel-size": { takesValue: true, why: "ampipe runs tensor parallelism 1" },
  "--pipeline-model-parallel-size": { takesValue: true, why: "ampipe runs pipeline parallelism 1" },
  "--context-parallel-size": { takesValue: true, why: "ampipe runs context parallelism 1" },
  "--sequence-parallel": { takesValue: false, why: "no tensor parallelism" },
  "--expert-tensor-parallel-size": { takesValue: true, why: "ampipe runs expert tensor parallelism 1" },
  "--max-position-embeddings": { takesValue: true, why: "ampipe sizes positions by --seq-length" },
  "--moe-shared-expert-overlap": { takesValue: false, why: "ampipe overlaps the shared expert with the all-to-alls itself, per chunk" },
  "--moe-grouped-gemm": { takesValue: false, why: "ampipe stores experts as GroupedMLP and runs them its own way" },
  "--moe-token-dispatcher-type": { takesValue: true, why: "ampipe permutes and exchanges tokens itself" },
  "--moe-permute-fusion": { takesValue: false, why: "a kernel choice" },
  "--use-mcore-models": { takesValue: false, why: "ampipe's GPT is Megatron-Core's layout" },
  "--transformer-impl": { takesValue: true, why: "a kernel choice" },
  "--use-flash-attn": { takesValue: false, why: "ampipe picks FlashAttention >= 2.1 when it is installed" },
  "--attention-backend": { takesValue: true, why: "ampipe picks FlashAttention >= 2.1 when it is installed, else SDPA" },
  "--no-masked-softmax-fusion": { takesValue: false, why: "a kernel choice" },
  "--no-bias-swiglu-fusion": { takesValue: false, why: "a kernel choice" },
  "--no-rope-fusion": { takesValue: false, why: "a kernel choice" },
  "--tokenizer-type": { takesValue: true, why: "ampipe reads the token ids of --data-path as they are (data.tokenizer only builds the default Brown corpus)" },
  "--tokenizer-model": { takesValue: true, why: "ampipe reads the token ids of --data-path as they are (data.tokenizer only builds the default Brown corpus)" },
  "--save": { takesValue: true, why: "ampipe train checkpoints into its run directory (--out)" },
  "--load": { takesValue: true, why: "ampipe train resumes from its run directory (--out)" },
  "--log-interval": { takesValue: true, why: "a logging setting (ampipe train reports every step)" },
  "--distributed-backend": { takesValue: true, why: "ampipe picks gloo on CPU, NCCL on CUDA" },
};

/** Megatron-LM flags that change the model in a way ampipe's block does not implement: refused. */
const UNSUPPORTED: Record<string, { takesValue: boolean; why: string }> = {
  "--moe-pad-expert-input-to-capacity": { takesValue: false, why: "padding to capacity is not implemented" },
  "--moe-input-jitter-eps": { takesValue: true, why: "input jitter is not implemented" },
  "--qk-l2-norm": { takesValue: false, why: "L2 QK normalisation is not implemented (--qk-layernorm is)" },
  "--rotary-interleaved": { takesValue: false, why: "interleaved rope is not implemented" },
  "--rotary-percent": { takesValue: true, why: "partial rope is not implemented" },
  "--add-qkv-bias": { takesValue: false, why: "a QKV bias apart from --disable-bias-linear is not implemented" },
  "--multi-latent-attention": { takesValue: false, why: "multi-latent attention is not implemented" },
  "--fp8-format": { takesValue: true, why: "fp8 is not supported" },
  "--num-layers-per-virtual-pipeline-stage": { takesValue: true, why: "pipeline parallelism is not supported" },
  "--train-data-path": { takesValue: true, why: "ampipe splits one --data-path into train and valid by --split" },
  "--valid-data-path": { takesValue: true, why: "ampipe splits one --data-path into train and valid by --split" },
  "--test-data-path": { takesValue: true, why: "ampipe splits one --data-path into train and valid by --split" },
  "--data-args-path": { takesValue: true, why: "ampipe reads one --data-path" },
  "--per-split-data-args-path": { takesValue: true, why: "ampipe splits one --data-path into train and valid by --split" },
};

/** Megatron-LM's defaults for the fields ampipe reads, where they differ from ampipe's own. */
const MEGATRON_DEFAULTS: Record<string, unknown> = {
  "model.normalization": "LayerNorm",
  "model.norm_epsilon": 1e-5,
  "model.position_embedding_type": "learned_absolute",
  "model.rotary_base": 10000,
  "model.attention_dropout": 0.1,
  "model.hidden_dropout": 0.1,
  "model.add_bias_linear": true,
  "model.untie_embeddings_and_output_weights": false,
  "model.init_method_std": 0.02,
  "model.moe_layer_freq": 1,
  "model.moe_router_score_order": "topk_then_softmax",
  "model.moe_router_topk_renormalize": false,
  "model.moe_router_score_function": "softmax",
  "model.moe_router_enable_expert_bias": false,
  "model.moe_router_bias_update_rate": 1e-3,
  "model.moe_router_topk_scaling_factor": null,
  "model.moe_router_num_groups": null,
  "model.moe_router_group_topk": null,
  "model.moe_shared_expert_intermediate_size": null,
  "model.moe_shared_expert_gate": false,
  "model.qk_layernorm": false,
  "model.moe_expert_capacity_factor": null,
  "model.moe_token_drop_policy": "probs",
  "model.moe_aux_loss_coeff": 0,
  "model.moe_z_loss_coeff": 0,
  "model.moe_expert_activation": "gelu",
  "model.dtype": "fp32",
  "parallelism.expert_model_parallel_size": 1,
  "train.min_lr": 0,
  "train.warmup_steps": 0,
  "train.weight_decay": 0.01,
  "train.clip_grad": 1.0,
  "train.adam_beta1": 0.9,
  "train.adam_beta2": 0.999,
  "train.adam_eps": 1e-8,
  "train.eval_interval": 1000,
  "train.eval_iters": 100,
  "train.initial_loss_scale": 2 ** 32,
  // "969, 30, 1" without the test share, which ampipe does not hold out
  "data.split": "969,30",
};

export interface FromMegatronResult {
  config: ExperimentConfig;
  /** One line per flag ignored, naming it and why. */
  warnings: string[];
}

/** Reads `--flag value`, `--flag=value` and store_true flags; values of flags it does not
 *  know are taken to be the next token when that does not start with "--". */
function tokenize(argv: readonly string[]): Array<{ flag: string; value: string | null }> {
  const out: Array<{ flag: string; value: string | null }> = [];
  for (let i = 0; i < argv.length; i++) {
    const tok = argv[i];
    if (!tok.startsWith("--")) throw new ConfigError([{ path: "", message: `${tok}: expected a --flag, got a stray value` }], "megatron flags");
    const eq = tok.indexOf("=");
    const flag = eq > 0 ? tok.slice(0, eq) : tok;
    if (eq > 0) {
      out.push({ flag, value: tok.slice(eq + 1) });
      continue;
    }
    const spec = FLAGS[flag];
    const known = IGNORED[flag] ?? UNSUPPORTED[flag];
    if (spec?.kind === "list") {
      const values: string[] = [];
      while (i + 1 < argv.length && !argv[i + 1].startsWith("--")) values.push(argv[++i]);
      if (!values.length) throw new ConfigError([{ path: "", message: `${flag}: needs a value` }], "megatron flags");
      out.push({ flag, value: values.join(" ") });
      continue;
    }
    const takesValue = spec ? spec.kind !== "bool" : known ? known.takesValue : i + 1 < argv.length && !argv[i + 1].startsWith("--");
    if (takesValue) {
      if (i + 1 >= argv.length) throw new ConfigError([{ path: "", message: `${flag}: needs a value` }], "megatron flags");
      out.push({ flag, value: argv[++i] });
    } else out.push({ flag, value: null });
  }
  return out;
}

function fail(message: string): never {
  throw new ConfigError([{ path: "", message }], "megatron flags");
}

function readValue(flag: string, spec: FlagSpec, raw: string | null): unknown {
  if (spec.kind === "bool") {
    if (raw !== null) fail(`${flag}: takes no value (a store_true flag), got "${raw}"`);
    return true;
  }
  if (raw === null) fail(`${flag}: needs a value`);
  if (spec.kind === "str" || spec.kind === "list") {
    if (spec.choices && !spec.choices.includes(raw))
      fail(`${flag}: "${raw}" is not supported by ampipe (supported: ${spec.choices.join(", ")})`);
    return raw;
  }
  const x = Number(raw);
  if (raw.trim() === "" || !Number.isFinite(x) || (spec.kind === "int" && !Number.isInteger(x)))
    fail(`${flag}: expected ${spec.kind === "int" ? "an integer" : "a number"}, got "${raw}"`);
  return x;
}

function setPath(obj: Record<string, Record<string, unknown>>, field: string, value: unknown): void {
  const [section, key] = field.split(".");
  (obj[section] ??= {})[key] = value;
}

/** `--data-path`: one dataset prefix (or one weight and prefix); Megatron's weighted blend of
 *  several datasets is refused by name (ampipe trains on one indexed dataset). */
function dataPathFrom(raw: string): string {
  const parts = raw.split(" ");
  const isWeight = (s: string) => s.trim() !== "" && Number.isFinite(Number(s));
  if (parts.length === 1) return parts[0];
  if (parts.length === 2 && isWeight(parts[0]) && !isWeight(parts[1])) return parts[1];
  fail(`--data-path ${raw}: Megatron's weighted blend of datasets is not supported by ampipe (it trains on one dataset prefix; blend the data into one with ampipe data prepare, or give one prefix)`);
}

/** `--split train,valid,test` (Megatron's weights, "," or "/" separated, padded with zeros) ->
 *  data.split "train,valid"; a test share is not held out by ampipe (said in a warning). */
function splitFrom(raw: string): { split: string; warning?: string } {
  const parts = (raw.includes(",") ? raw.split(",") : raw.split("/")).map((p) => p.trim());
  const w = parts.map(Number);
  if (parts.length > 3 || w.some((x, i) => parts[i] === "" || !Number.isFinite(x) || x < 0))
    fail(`--split ${raw}: expected up to three weights train,valid,test such as 969,30,1`);
  const [train, valid = 0, test = 0] = w;
  if (!(train > 0) || !(valid > 0))
    fail(`--split ${raw}: ampipe needs a train and a validation share > 0 (it evaluates on the valid split)`);
  const split = `${parts[0]},${parts[1]}`;
  return test > 0 ? { split, warning: `--split ${raw}: the test share (${parts[2]}) is not held out (ampipe splits documents into train and valid ${split})` } : { split };
}

/** Megatron-LM flags -> a resolved ampipe config (plus `--set` overrides applied last). */
export function configFromMegatron(argv: readonly string[], overrides: readonly string[] = []): FromMegatronResult {
  const warnings: string[] = [];
  const given = new Map<string, unknown>();
  for (const { flag, value } of tokenize(argv)) {
    const spec = FLAGS[flag];
    const unsupported = UNSUPPORTED[flag];
    if (unsupported && !(flag === "--rotary-percent" && Number(value) === 1))
      fail(`${value === null ? flag : `${flag} ${value}`}: not supported by ampipe (${unsupported.why})`);
    if (!spec) {
      const ig = IGNORED[flag];
      const shown = value === null ? flag : `${flag} ${value}`;
      if (unsupported) continue; // --rotary-percent 1: the default
      warnings.push(ig ? `${shown}: ignored (${ig.why})` : `${shown}: ignored (not a Megatron-LM flag ampipe knows)`);
      continue;
    }
    const v = readValue(flag, spec, value);
    if (given.has(flag) && given.get(flag) !== v) fail(`${flag} is given twice, as ${String(given.get(flag))} and ${String(v)}`);
    given.set(flag, v);
  }
  const g = (f: string) => given.get(f) as number | string | boolean | undefined;

  if (g("--num-experts") === undefined) fail("--num-experts is required: ampipe pipelines MoE blocks");
  if (g("--bf16") && g("--fp16")) fail("--bf16 and --fp16 contradict each other (give one)");
  const hidden = g("--hidden-size") as number | undefined;
  const heads = g("--num-attention-heads") as number | undefined;
  if (hidden !== undefined && heads !== undefined && g("--kv-channels") === undefined && hidden % heads !== 0)
    fail(`--num-attention-heads ${heads} does not divide --hidden-size ${hidden} (or give --kv-channels)`);
  const topk = g("--moe-router-topk") as number | undefined;
  const experts = g("--num-experts") as number;
  if (topk !== undefined && topk > experts) fail(`--moe-router-topk ${topk} exceeds --num-experts ${experts}`);
  const groups = g("--num-query-groups") as number | undefined;
  if (groups !== undefined && !g("--group-query-attention")) {
    warnings.push(`--num-query-groups ${groups}: ignored without --group-query-attention (as Megatron-LM does)`);
  } else if (groups !== undefined && heads !== undefined && heads % groups !== 0) {
    fail(`--num-query-groups ${groups} does not divide --num-attention-heads ${heads}`);
  }
  const ep = g("--expert-model-parallel-size") as number | undefined;
  if (ep !== undefined && experts % ep !== 0) fail(`--expert-model-parallel-size ${ep} does not divide --num-experts ${experts}`);

  const iters = g("--train-iters") as number | undefined;
  const decayIters = g("--lr-decay-iters") as number | undefined;
  if (decayIters !== undefined && decayIters !== iters)
    fail(`--lr-decay-iters ${decayIters} differs from --train-iters ${iters ?? "(not given)"}: ampipe decays the learning rate over the whole run (give --lr-decay-iters = --train-iters, or leave it out)`);

  const obj: Record<string, Record<string, unknown>> = { model: {}, parallelism: {}, train: {}, data: {} };
  for (const [field, v] of Object.entries(MEGATRON_DEFAULTS)) setPath(obj, field, v);
  for (const [flag, v] of given) {
    const field = FLAGS[flag].field;
    if (field) setPath(obj, field, v);
  }
  // --ffn-hidden-size defaults to 4 * hidden and --moe-ffn-hidden-size to --ffn-hidden-size, as in Megatron.
  const h = hidden ?? 128;
  if (g("--ffn-hidden-size") === undefined) obj.model.ffn_hidden_size = 4 * h;
  if (g("--moe-ffn-hidden-size") === undefined) obj.model.moe_ffn_hidden_size = obj.model.ffn_hidden_size;
  if (g("--group-query-attention") && groups !== undefined) obj.model.num_query_groups = groups;
  if (g("--moe-router-pre-softmax")) obj.model.moe_router_score_order = "softmax_then_topk";
  if (g("--disable-bias-linear")) obj.model.add_bias_linear = false;
  if (g("--swiglu")) obj.model.moe_expert_activation = "swiglu";
  if (g("--bf16")) obj.model.dtype = "bf16";
  if (g("--fp16")) obj.model.dtype = "fp16";
  if (g("--moe-router-load-balancing-type") === "none") obj.model.moe_aux_loss_coeff = 0;
  // The smallest world that holds the expert-parallel group (Megatron takes it from the launcher).
  obj.parallelism.world_size = obj.parallelism.expert_model_parallel_size;
  // Megatron's --global-batch-size defaults to one micro-batch per data-parallel rank.
  if (g("--global-batch-size") === undefined)
    obj.train.global_batch_size = (obj.model.micro_batch_size as number | undefined ?? ModelSchema.parse({}).micro_batch_size) * (obj.parallelism.world_size as number);
  const dataPath = g("--data-path") as string | undefined;
  if (dataPath !== undefined) obj.data.path = dataPathFrom(dataPath);
  const split = g("--split") as string | undefined;
  if (split !== undefined) {
    const r = splitFrom(split);
    obj.data.split = r.split;
    if (r.warning) warnings.push(r.warning);
  }
  const config = resolveConfig(applyOverrides(obj, overrides), "megatron flags");
  return { config, warnings };
}

const num = (x: number) => String(x);

/** An ampipe config -> Megatron-LM flags; `warnings` name the config fields no flag expresses. */
export function megatronFromConfig(cfg: ExperimentConfig): { flags: string[]; warnings: string[] } {
  const m = cfg.model;
  const f: string[] = [];
  const warnings: string[] = [];
  const add = (flag: string, v?: number | string) => (v === undefined ? f.push(flag) : f.push(flag, typeof v === "number" ? num(v) : v));
  add("--num-layers", m.num_layers);
  add("--hidden-size", m.hidden_size);
  add("--num-attention-heads", m.num_attention_heads);
  if (m.num_query_groups !== m.num_attention_heads) {
    add("--group-query-attention");
    add("--num-query-groups", m.num_query_groups);
  }
  if (m.kv_channels !== m.hidden_size / m.num_attention_heads) add("--kv-channels", m.kv_channels);
  add("--seq-length", m.seq_length);
  add("--micro-batch-size", m.micro_batch_size);
  add("--vocab-size", m.vocab_size);
  add("--ffn-hidden-size", m.ffn_hidden_size);
  add("--normalization", m.normalization);
  add("--norm-epsilon", m.norm_epsilon);
  add("--position-embedding-type", m.position_embedding_type);
  add("--rotary-base", m.rotary_base);
  add("--attention-dropout", m.attention_dropout);
  add("--hidden-dropout", m.hidden_dropout);
  if (!m.add_bias_linear) add("--disable-bias-linear");
  if (m.untie_embeddings_and_output_weights) add("--untie-embeddings-and-output-weights");
  add("--init-method-std", m.init_method_std);
  add("--num-experts", m.num_experts);
  add("--moe-layer-freq", m.moe_layer_freq);
  add("--moe-router-topk", m.moe_router_topk);
  if (m.moe_router_score_order === "softmax_then_topk") add("--moe-router-pre-softmax");
  if (m.moe_router_score_function !== "softmax") add("--moe-router-score-function", m.moe_router_score_function);
  if (m.moe_router_enable_expert_bias) add("--moe-router-enable-expert-bias");
  if (m.moe_router_enable_expert_bias || m.moe_router_bias_update_rate !== MEGATRON_DEFAULTS["model.moe_router_bias_update_rate"])
    add("--moe-router-bias-update-rate", m.moe_router_bias_update_rate);
  if (m.moe_router_topk_scaling_factor !== null) add("--moe-router-topk-scaling-factor", m.moe_router_topk_scaling_factor);
  if (m.moe_router_num_groups !== null) add("--moe-router-num-groups", m.moe_router_num_groups);
  if (m.moe_router_group_topk !== null) add("--moe-router-group-topk", m.moe_router_group_topk);
  if (m.moe_router_topk_renormalize)
    warnings.push("model.moe_router_topk_renormalize: true has no Megatron-LM flag (Megatron does not renormalise the top-k softmax); left out");
  if (m.moe_expert_capacity_factor !== null) add("--moe-expert-capacity-factor", m.moe_expert_capacity_factor);
  add("--moe-token-drop-policy", m.moe_token_drop_policy);
  add("--moe-aux-loss-coeff", m.moe_aux_loss_coeff);
  add("--moe-z-loss-coeff", m.moe_z_loss_coeff);
  add("--moe-ffn-hidden-size", m.moe_ffn_hidden_size);
  if (m.moe_expert_activation === "swiglu") add("--swiglu");
  if (m.moe_shared_expert_intermediate_size !== null) add("--moe-shared-expert-intermediate-size", m.moe_shared_expert_intermediate_size);
  if (m.moe_shared_expert_gate) add("--moe-shared-expert-gate");
  if (m.qk_layernorm) add("--qk-layernorm");
  add("--expert-model-parallel-size", cfg.parallelism.expert_model_parallel_size);
  if (m.dtype === "bf16") add("--bf16");
  if (m.dtype === "fp16") add("--fp16");
  add("--seed", cfg.run.seed);
  const t = cfg.train;
  add("--train-iters", t.steps);
  add("--lr", t.lr);
  add("--min-lr", t.min_lr);
  add("--lr-decay-style", "cosine");
  add("--lr-decay-iters", t.steps);
  add("--lr-warmup-iters", t.warmup_steps);
  add("--weight-decay", t.weight_decay);
  add("--clip-grad", t.clip_grad);
  add("--adam-beta1", t.adam_beta1);
  add("--adam-beta2", t.adam_beta2);
  add("--adam-eps", t.adam_eps);
  add("--initial-loss-scale", t.initial_loss_scale);
  add("--global-batch-size", t.global_batch_size);
  add("--eval-interval", t.eval_interval);
  add("--eval-iters", t.eval_iters);
  add("--save-interval", t.checkpoint_interval);
  const d = cfg.data;
  if (d.path !== null) add("--data-path", d.path);
  add("--split", `${d.split.replace(/\s/g, "")},0`);
  if (d.seed !== DataSchema.parse({}).seed)
    warnings.push(`data.seed: ${d.seed} has no Megatron-LM flag (Megatron-LM splits documents in order, not by a seed); left out`);
  return { flags: f, warnings };
}

/** Flags joined for a shell (values quoted only where needed). */
export function shellJoin(args: readonly string[]): string {
  return args.map((a) => (/^[\w@%+=:,./-]+$/.test(a) ? a : `'${a.replace(/'/g, "'\\''")}'`)).join(" ");
}
