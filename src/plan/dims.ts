// The block dims a plan is made for, and the config field each comes from: the one dims table.
// TypeScript derives a plan's dims from a resolved config with it; scripts/export-schemas.ts
// writes it for Python (py/ampipe/pipeline/dims.json), whose executor derives the dims of a
// config, of a layer (`block_dims`) and the config of a plan's dims (`model_config_from_plan`)
// from the same table, and names the config field (and the `ampipe plan --set`) of a dim that
// does not fit.
import type { ExperimentConfig } from "../config/index.ts";
import { parseDims, type BlockDims, type Plan } from "./ir.ts";

/** Each field of a plan's dims and the config field it comes from. */
export const DIM_SOURCES = {
  seq_length: "model.seq_length",
  micro_batch_size: "model.micro_batch_size",
  hidden_size: "model.hidden_size",
  num_attention_heads: "model.num_attention_heads",
  num_query_groups: "model.num_query_groups",
  kv_channels: "model.kv_channels",
  num_experts: "model.num_experts",
  moe_router_topk: "model.moe_router_topk",
  moe_ffn_hidden_size: "model.moe_ffn_hidden_size",
  moe_shared_expert_intermediate_size: "model.moe_shared_expert_intermediate_size",
  expert_model_parallel_size: "parallelism.expert_model_parallel_size",
  dtype: "model.dtype",
} as const satisfies Record<keyof BlockDims, string>;

/** The dims a block's input fixes (its shape), not its layer: a layer's own dims leave them out. */
export const INPUT_DIMS = ["seq_length", "micro_batch_size"] as const satisfies readonly (keyof BlockDims)[];

/** The block dims a plan is made for, from a resolved experiment config. */
export function dimsFromConfig(cfg: ExperimentConfig): BlockDims {
  const sections = cfg as unknown as Record<string, Record<string, unknown>>;
  const raw = Object.fromEntries(
    Object.entries(DIM_SOURCES).map(([k, field]) => {
      const [section, key] = field.split(".");
      return [k, sections[section][key]];
    }),
  );
  return parseDims(raw, "model");
}

/** Throws when a plan was made for another block than the config's, naming each differing field. */
export function checkPlanDims(plan: Plan, cfg: ExperimentConfig, source: string): void {
  const want = dimsFromConfig(cfg);
  const bad: string[] = [];
  for (const [k, field] of Object.entries(DIM_SOURCES) as Array<[keyof BlockDims, string]>) {
    if (plan.dims[k] !== want[k])
      bad.push(`  dims.${k}: the plan has ${JSON.stringify(plan.dims[k])}, the config has ${JSON.stringify(want[k])} (${field})`);
  }
  if (plan.capacity_scope !== cfg.pipeline.capacity_scope)
    bad.push(`  capacity_scope: the plan has ${JSON.stringify(plan.capacity_scope)}, the config has ${JSON.stringify(cfg.pipeline.capacity_scope)} (pipeline.capacity_scope)`);
  if (bad.length) throw new Error(`${source}: the plan does not fit the config's block\n${bad.join("\n")}`);
}

/** The table as plain data (what the Python side reads). */
export function dimsTableJson(version: number): string {
  return JSON.stringify({ format: "ampipe.dims", plan_version: version, dims: DIM_SOURCES, input: INPUT_DIMS }, null, 1) + "\n";
}
