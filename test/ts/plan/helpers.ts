import type { BlockDims } from "../../../src/plan/ir.ts";

export const smallDims = (over: Partial<BlockDims> = {}): BlockDims => ({
  seq_length: 48,
  micro_batch_size: 2,
  hidden_size: 32,
  num_attention_heads: 4,
  num_query_groups: 4,
  kv_channels: 8,
  num_experts: 4,
  moe_router_topk: 2,
  moe_ffn_hidden_size: 64,
  expert_model_parallel_size: 1,
  dtype: "fp32",
  ...over,
});
