import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { parse as parseYaml } from "yaml";
import { ConfigError, loadConfig } from "../../../src/config/index.ts";
import { configFromMegatron, megatronFromConfig } from "../../../src/config/megatron.ts";

const root = join(import.meta.dirname, "..", "..", "..");
const cli = join(root, "bin", "ampipe.js");

// A Mixtral-like pretrain_gpt.py command line, scaled down.
const FLAGS = [
  "--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "8",
  "--group-query-attention", "--num-query-groups", "2", "--seq-length", "1024", "--micro-batch-size", "1",
  "--vocab-size", "32000", "--ffn-hidden-size", "1024", "--normalization", "RMSNorm", "--norm-epsilon", "1e-6",
  "--position-embedding-type", "rope", "--rotary-base", "1000000", "--attention-dropout", "0", "--hidden-dropout", "0",
  "--disable-bias-linear", "--untie-embeddings-and-output-weights", "--init-method-std", "0.01",
  "--num-experts", "8", "--moe-router-topk", "2", "--moe-router-pre-softmax", "--moe-aux-loss-coeff", "0.02",
  "--moe-z-loss-coeff", "0.001", "--moe-ffn-hidden-size", "512", "--swiglu", "--expert-model-parallel-size", "4", "--bf16",
  "--moe-expert-capacity-factor", "1.25", "--moe-token-drop-policy", "position",
];

// A DeepSeek-V3/Qwen3-MoE-like one: shared expert with a gate, sigmoid scores with expert bias,
// scaled gates, group-limited top-k, QK layernorm.
const MODERN = [
  "--num-layers", "2", "--hidden-size", "128", "--num-attention-heads", "4", "--seq-length", "256",
  "--micro-batch-size", "2", "--disable-bias-linear", "--swiglu", "--normalization", "RMSNorm",
  "--num-experts", "8", "--moe-router-topk", "4", "--moe-ffn-hidden-size", "64",
  "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias", "--moe-router-bias-update-rate", "0.002",
  "--moe-router-topk-scaling-factor", "2.5", "--moe-router-num-groups", "4", "--moe-router-group-topk", "2",
  "--moe-shared-expert-intermediate-size", "256", "--moe-shared-expert-gate", "--qk-layernorm",
];

/** Flags as a map flag -> value (null for store_true), to compare flag lists order-free. */
function flagMap(argv: string[]): Map<string, string | null> {
  const out = new Map<string, string | null>();
  for (let i = 0; i < argv.length; i++) {
    const next = argv[i + 1];
    if (next !== undefined && !next.startsWith("--")) out.set(argv[i], argv[++i]);
    else out.set(argv[i], null);
  }
  return out;
}

function errorOf(argv: string[]): string {
  try {
    configFromMegatron(argv);
  } catch (e) {
    if (e instanceof ConfigError) return e.message;
    throw e;
  }
  throw new Error("expected a ConfigError");
}

describe("Megatron-LM flags", () => {
  it("read into the config fields they name", () => {
    const { config: c, warnings } = configFromMegatron(FLAGS);
    expect(warnings).toEqual([]);
    expect(c.model).toMatchObject({
      num_layers: 4, hidden_size: 256, num_attention_heads: 8, num_query_groups: 2, kv_channels: 32,
      seq_length: 1024, micro_batch_size: 1, vocab_size: 32000, ffn_hidden_size: 1024, normalization: "RMSNorm",
      norm_epsilon: 1e-6, position_embedding_type: "rope", rotary_base: 1e6, add_bias_linear: false,
      untie_embeddings_and_output_weights: true, num_experts: 8, moe_router_topk: 2,
      moe_router_score_order: "softmax_then_topk", moe_aux_loss_coeff: 0.02, moe_ffn_hidden_size: 512,
      moe_expert_activation: "swiglu", dtype: "bf16", moe_expert_capacity_factor: 1.25, moe_token_drop_policy: "position",
    });
    expect(c.parallelism.expert_model_parallel_size).toBe(4);
  });

  it("take Megatron-LM's defaults for the flags not given", () => {
    const { config: c } = configFromMegatron(["--hidden-size", "64", "--num-attention-heads", "4", "--num-experts", "4"]);
    expect(c.model).toMatchObject({
      ffn_hidden_size: 256, moe_ffn_hidden_size: 256, position_embedding_type: "learned_absolute",
      moe_router_score_order: "topk_then_softmax", moe_aux_loss_coeff: 0, moe_z_loss_coeff: 0,
      add_bias_linear: true, moe_expert_activation: "gelu", attention_dropout: 0.1, hidden_dropout: 0.1,
      num_query_groups: 4, dtype: "fp32",
    });
  });

  it("round-trip: flags -> config -> flags -> config", () => {
    const first = configFromMegatron(FLAGS).config;
    const { flags, warnings } = megatronFromConfig(first);
    expect(warnings).toEqual([]);
    expect(configFromMegatron(flags).config).toEqual(first);
    // Every input flag comes back with its value (numbers compared as numbers).
    const back = flagMap(flags);
    for (const [flag, value] of flagMap(FLAGS)) {
      expect(back.has(flag), flag).toBe(true);
      const got = back.get(flag) ?? null;
      if (value === null) expect(got, flag).toBeNull();
      else if (Number.isFinite(Number(value))) expect(Number(got), flag).toBe(Number(value));
      else expect(got, flag).toBe(value);
    }
  });

  it("read the router, shared-expert and QK-norm flags into Megatron-named fields, and round-trip them", () => {
    const { config: c, warnings } = configFromMegatron([...MODERN, "--moe-shared-expert-overlap", "--moe-router-dtype", "fp32"]);
    expect(warnings).toEqual([
      "--moe-shared-expert-overlap: ignored (ampipe overlaps the shared expert with the all-to-alls itself, per chunk)",
    ]);
    expect(c.model).toMatchObject({
      moe_router_score_function: "sigmoid", moe_router_enable_expert_bias: true, moe_router_bias_update_rate: 0.002,
      moe_router_topk_scaling_factor: 2.5, moe_router_num_groups: 4, moe_router_group_topk: 2,
      moe_shared_expert_intermediate_size: 256, moe_shared_expert_gate: true, qk_layernorm: true,
    });
    const { flags, warnings: back } = megatronFromConfig(c);
    expect(back).toEqual([]);
    expect(configFromMegatron(flags).config).toEqual(c);
    for (const [flag, value] of flagMap(MODERN)) {
      const got = flagMap(flags).get(flag);
      expect(flagMap(flags).has(flag), flag).toBe(true);
      if (value !== null) expect(Number.isFinite(Number(value)) ? Number(got) : got, flag).toBe(Number.isFinite(Number(value)) ? Number(value) : value);
    }
    // Without them, none is written (Megatron's defaults).
    const plain = megatronFromConfig(configFromMegatron(FLAGS).config).flags;
    for (const flag of ["--moe-router-score-function", "--moe-router-enable-expert-bias", "--moe-router-bias-update-rate",
      "--moe-router-topk-scaling-factor", "--moe-router-num-groups", "--moe-router-group-topk",
      "--moe-shared-expert-intermediate-size", "--moe-shared-expert-gate", "--qk-layernorm"]) expect(plain).not.toContain(flag);
  });

  it("refuse contradictions among the new fields naming the field", () => {
    expect(errorOf(["--num-experts", "4", "--moe-router-enable-expert-bias"]))
      .toContain("model.moe_router_enable_expert_bias: needs model.moe_router_score_function: sigmoid");
    expect(errorOf(["--num-experts", "8", "--moe-router-num-groups", "3", "--moe-router-group-topk", "1"]))
      .toContain("model.moe_router_num_groups: must divide model.num_experts (8); got 3");
    expect(errorOf(["--num-experts", "8", "--moe-router-num-groups", "4", "--moe-router-group-topk", "5"]))
      .toContain("model.moe_router_group_topk: must be <= model.moe_router_num_groups (4); got 5");
    expect(errorOf(["--num-experts", "8", "--moe-router-topk", "6", "--moe-router-num-groups", "4", "--moe-router-group-topk", "2"]))
      .toContain("model.moe_router_group_topk: 2 group(s) of 2 experts cannot hold model.moe_router_topk (6) experts");
    expect(errorOf(["--num-experts", "4", "--moe-router-group-topk", "2"]))
      .toContain("model.moe_router_group_topk: needs model.moe_router_num_groups");
    expect(errorOf(["--num-experts", "4", "--moe-shared-expert-intermediate-size", "64"]))
      .toContain("model.moe_shared_expert_intermediate_size: shared experts have no biases (as in Megatron): needs model.add_bias_linear false");
    expect(errorOf(["--num-experts", "4", "--moe-shared-expert-gate", "--disable-bias-linear"]))
      .toContain("model.moe_shared_expert_gate: needs model.moe_shared_expert_intermediate_size");
  });

  it("round-trip from the default config: config -> flags -> config", () => {
    const cfg = loadConfig(join(root, "configs", "default.yaml"));
    const back = configFromMegatron(megatronFromConfig(cfg).flags).config;
    expect(back.model).toEqual(cfg.model);
    expect(back.parallelism.expert_model_parallel_size).toBe(cfg.parallelism.expert_model_parallel_size);
  });

  it("refuse each contradiction naming both flags", () => {
    expect(errorOf(["--hidden-size", "130", "--num-attention-heads", "4", "--num-experts", "4"]))
      .toContain("--num-attention-heads 4 does not divide --hidden-size 130");
    expect(errorOf(["--num-experts", "2", "--moe-router-topk", "4"])).toContain("--moe-router-topk 4 exceeds --num-experts 2");
    expect(errorOf(["--num-experts", "4", "--bf16", "--fp16"])).toContain("--bf16 and --fp16");
    expect(errorOf(["--num-experts", "4", "--num-attention-heads", "8", "--group-query-attention", "--num-query-groups", "3"]))
      .toContain("--num-query-groups 3 does not divide --num-attention-heads 8");
    expect(errorOf(["--num-experts", "6", "--expert-model-parallel-size", "4"]))
      .toContain("--expert-model-parallel-size 4 does not divide --num-experts 6");
    expect(errorOf(["--num-experts", "4", "--num-layers", "2", "--num-layers", "3"])).toContain("--num-layers is given twice");
    expect(errorOf(["--hidden-size", "64"])).toContain("--num-experts is required");
  });

  it("refuse values and flags ampipe's block does not implement, naming them", () => {
    expect(errorOf(["--num-experts", "4", "--moe-router-score-function", "sqrtsoftplus"]))
      .toContain('--moe-router-score-function: "sqrtsoftplus" is not supported');
    expect(errorOf(["--num-experts", "4", "--moe-router-dtype", "fp64"])).toContain('--moe-router-dtype: "fp64" is not supported');
    expect(errorOf(["--num-experts", "4", "--qk-l2-norm"])).toContain("--qk-l2-norm: not supported");
    expect(errorOf(["--num-experts", "4", "--moe-pad-expert-input-to-capacity"])).toContain("--moe-pad-expert-input-to-capacity: not supported");
    expect(errorOf(["--num-experts", "4", "--num-layers", "two"])).toContain('--num-layers: expected an integer, got "two"');
  });

  it("warn about each flag ignored, by name", () => {
    const { warnings } = configFromMegatron([
      "--num-experts", "4", "--log-interval", "10", "--tensor-model-parallel-size", "2", "--use-mcore-models",
      "--no-such-flag", "7", "--another-unknown", "--num-query-groups", "2",
    ]);
    expect(warnings).toEqual([
      "--log-interval 10: ignored (a logging setting (ampipe train reports every step))",
      "--tensor-model-parallel-size 2: ignored (ampipe runs tensor parallelism 1)",
      "--use-mcore-models: ignored (ampipe's GPT is Megatron-Core's layout)",
      "--no-such-flag 7: ignored (not a Megatron-LM flag ampipe knows)",
      "--another-unknown: ignored (not a Megatron-LM flag ampipe knows)",
      "--num-query-groups 2: ignored without --group-query-attention (as Megatron-LM does)",
    ]);
  });

  it("config -> flags names the fields no flag expresses", () => {
    const cfg = loadConfig(join(root, "configs", "default.yaml"), ["model.moe_router_topk_renormalize=true"]);
    expect(megatronFromConfig(cfg).warnings).toEqual([expect.stringContaining("model.moe_router_topk_renormalize")]);
  });

  it("the CLI: from-megatron, to-megatron and plan --from-megatron", () => {
    const dir = mkdtempSync(join(tmpdir(), "ampipe-mg-"));
    const cfgPath = join(dir, "c.yaml");
    const from = spawnSync(process.execPath, [cli, "config", "from-megatron", "--out", cfgPath, "--", ...FLAGS, "--log-interval", "100"], { encoding: "utf8" });
    expect(from.status, from.stderr).toBe(0);
    expect(from.stderr).toContain("warning: --log-interval 100: ignored");
    expect(parseYaml(readFileSync(cfgPath, "utf8"))).toEqual(configFromMegatron(FLAGS).config);
    const to = spawnSync(process.execPath, [cli, "config", "to-megatron", cfgPath, "--json"], { encoding: "utf8" });
    expect(to.status, to.stderr).toBe(0);
    expect(configFromMegatron(JSON.parse(to.stdout)).config).toEqual(configFromMegatron(FLAGS).config);
    const bad = spawnSync(process.execPath, [cli, "config", "from-megatron", "--", "--num-experts", "2", "--moe-router-topk", "3"], { encoding: "utf8" });
    expect(bad.status).toBe(2);
    expect(bad.stderr).toContain("--moe-router-topk 3 exceeds --num-experts 2");
    const planPath = join(dir, "plan.json");
    const small = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "128",
      "--num-experts", "4", "--moe-router-topk", "2", "--swiglu", "--disable-bias-linear", "--position-embedding-type", "rope"];
    const plan = spawnSync(process.execPath, [cli, "plan", "--from-megatron", "--out", planPath, "--no-trace", "--json", "--", ...small], { encoding: "utf8" });
    expect(plan.status, plan.stderr).toBe(0);
    const written = JSON.parse(readFileSync(planPath, "utf8"));
    expect(written.dims).toMatchObject({ hidden_size: 64, num_attention_heads: 4, seq_length: 128, num_experts: 4,
      moe_ffn_hidden_size: 256, expert_model_parallel_size: 1, dtype: "fp32" });
  });

  it("read the training and data flags into the train and data sections, with Megatron-LM's defaults, and round-trip them", () => {
    const TRAIN = ["--train-iters", "500", "--lr", "3e-4", "--min-lr", "3e-5", "--lr-decay-style", "cosine", "--lr-decay-iters", "500",
      "--lr-warmup-iters", "20", "--weight-decay", "0.1", "--clip-grad", "0.5", "--adam-beta1", "0.9", "--adam-beta2", "0.95",
      "--adam-eps", "1e-6", "--global-batch-size", "32", "--eval-interval", "100", "--eval-iters", "10", "--save-interval", "250",
      "--data-path", "/data/corpus_text_document", "--split", "98,2,0"];
    const { config: c, warnings } = configFromMegatron([...FLAGS, ...TRAIN]);
    expect(warnings).toEqual([]);
    expect(c.train).toEqual({ steps: 500, lr: 3e-4, min_lr: 3e-5, warmup_steps: 20, weight_decay: 0.1, adam_beta1: 0.9, adam_beta2: 0.95,
      adam_eps: 1e-6, clip_grad: 0.5, global_batch_size: 32, eval_interval: 100, eval_iters: 10, checkpoint_interval: 250,
      initial_loss_scale: 2 ** 32 });
    expect(c.data).toMatchObject({ path: "/data/corpus_text_document", split: "98,2" });
    const { flags, warnings: back } = megatronFromConfig(c);
    expect(back).toEqual([]);
    expect(configFromMegatron(flags).config).toEqual(c);
    const map = flagMap(flags);
    for (const [flag, value] of flagMap(TRAIN))
      expect(Number.isFinite(Number(value)) ? Number(map.get(flag)) : map.get(flag), flag).toEqual(Number.isFinite(Number(value)) ? Number(value) : value);
    // not given: Megatron-LM's defaults (one micro-batch per data-parallel rank, its optimiser and split)
    const d = configFromMegatron(["--num-experts", "4", "--micro-batch-size", "3"]).config;
    expect(d.train).toMatchObject({ global_batch_size: 3, min_lr: 0, warmup_steps: 0, weight_decay: 0.01, adam_beta2: 0.999,
      eval_interval: 1000, eval_iters: 100 });
    expect(d.data).toMatchObject({ path: null, split: "969,30" });
  });

  it("take one dataset (or one weight and prefix), refuse a weighted blend by name, and say what a split drops", () => {
    expect(configFromMegatron(["--num-experts", "4", "--data-path", "1.0", "/d/a_text_document"]).config.data.path).toBe("/d/a_text_document");
    expect(errorOf(["--num-experts", "4", "--data-path", "0.3", "/d/a", "0.7", "/d/b"]))
      .toContain("--data-path 0.3 /d/a 0.7 /d/b: Megatron's weighted blend of datasets is not supported by ampipe");
    expect(errorOf(["--num-experts", "4", "--data-path", "/d/a", "/d/b"])).toContain("weighted blend of datasets is not supported");
    expect(errorOf(["--num-experts", "4", "--train-data-path", "/d/a"])).toContain("--train-data-path /d/a: not supported by ampipe (ampipe splits one --data-path");
    const r = configFromMegatron(["--num-experts", "4", "--split", "949,50,1"]);
    expect(r.config.data.split).toBe("949,50");
    expect(r.warnings).toEqual(["--split 949,50,1: the test share (1) is not held out (ampipe splits documents into train and valid 949,50)"]);
    expect(configFromMegatron(["--num-experts", "4", "--split", "90/10"]).config.data.split).toBe("90,10");
    expect(errorOf(["--num-experts", "4", "--split", "100"])).toContain("--split 100: ampipe needs a train and a validation share > 0");
    expect(errorOf(["--num-experts", "4", "--lr-decay-style", "linear"])).toContain('--lr-decay-style: "linear" is not supported by ampipe (supported: cosine)');
    expect(errorOf(["--num-experts", "4", "--train-iters", "100", "--lr-decay-iters", "80"])).toContain("--lr-decay-iters 80 differs from --train-iters 100");
    expect(errorOf(["--num-experts", "4", "--micro-batch-size", "2", "--global-batch-size", "5"])).toContain("train.global_batch_size");
  });

  it("the ignored list holds no flag ampipe reads", () => {
    const { warnings } = configFromMegatron(["--num-experts", "4", "--train-iters", "10", "--lr", "1e-3", "--min-lr", "1e-4",
      "--lr-warmup-iters", "2", "--weight-decay", "0", "--clip-grad", "1", "--adam-beta1", "0.9", "--adam-beta2", "0.99",
      "--global-batch-size", "4", "--data-path", "p", "--split", "9,1", "--eval-interval", "5", "--eval-iters", "2", "--save-interval", "5"]);
    expect(warnings).toEqual([]);
  });
});
