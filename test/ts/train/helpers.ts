// What the training and comparison end-to-end tests share: a tiny dataset of their own, a tiny
// config over it, and running the CLI as a child process.
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { prepareDataset } from "../../../src/data/prepare.ts";

export { ampipe, type Ran } from "../cli.ts";

/** 40 documents (one per .jsonl line) tokenized byte-level into `dir`/tiny; returns the prefix. */
export function tinyDataset(dir: string): string {
  const words = "the jury said in a statement that the city executive committee had over all charge of the election".split(" ");
  const docs = Array.from({ length: 40 }, (_, i) => Array.from({ length: 60 + i }, (_, j) => words[(i * 7 + j * 3) % words.length]).join(" "));
  const textPath = join(dir, "corpus.jsonl");
  writeFileSync(textPath, docs.map((text) => JSON.stringify({ text })).join("\n") + "\n");
  const prefix = join(dir, "tiny");
  prepareDataset({ inputs: [textPath], tokenizer: "byte", out: prefix });
  return prefix;
}

/** Two CPU ranks (EP 2), a 2-layer model with the interleaved P=2 block, 24 steps. */
export function tinyConfig(dataPrefix: string, extra = ""): string {
  return `
model:
  num_layers: 2
  hidden_size: 32
  num_attention_heads: 4
  seq_length: 48
  micro_batch_size: 2
  vocab_size: 260
  ffn_hidden_size: 64
  num_experts: 4
  moe_router_topk: 2
  moe_ffn_hidden_size: 32
parallelism: { world_size: 2, expert_model_parallel_size: 2, device: cpu, backend: gloo }
pipeline: { degree: 2, variant: interleaved, emulated_comm: null }
run: { seed: 3 }
data: { path: ${JSON.stringify(dataPrefix)} }
train:
  steps: 24
  lr: 3.0e-3
  min_lr: 3.0e-4
  warmup_steps: 2
  global_batch_size: 8
  eval_interval: 4
  eval_iters: 1
  checkpoint_interval: 4
${extra}`;
}
