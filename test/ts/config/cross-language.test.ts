// TypeScript and Python resolve the same experiment config identically (py/ampipe/config_schema.py
// and experiment_config.py take their defaults and per-field checks from the exported zod schema):
// the committed configs, random partial configs, and random invalid ones, which both refuse
// naming the same field. The exported schema is checked fresh here too.
import { spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, readdirSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { parse as parseYaml } from "yaml";
import { CONFIG_SCHEMA_PATH, configSchemaText } from "../../../scripts/export-schemas.ts";
import { ConfigError, resolveConfig } from "../../../src/config/index.ts";

const root = join(import.meta.dirname, "..", "..", "..");
const python = join(root, ".venv", "bin", "python");

const PY = `
import json, sys
from ampipe.config_schema import ConfigError
from ampipe.experiment_config import resolve_config
out = []
for doc in json.load(open(sys.argv[1])):
    try:
        out.append({"ok": resolve_config(doc)})
    except ConfigError as e:
        out.append({"field": e.field, "message": str(e)})
json.dump(out, sys.stdout)
`;

type Outcome = { ok: unknown } | { fields: string[] };

function tsResolve(doc: unknown): Outcome {
  try {
    return { ok: JSON.parse(JSON.stringify(resolveConfig(doc))) };
  } catch (e) {
    if (e instanceof ConfigError) return { fields: e.issues.map((i) => i.path) };
    throw e;
  }
}

// Fields with values inside and outside their rules, across every section Python reads.
const FIELDS: Record<string, unknown[]> = {
  "model.hidden_size": [64, 96, 100, 0, -4, 2.5, "128", true],
  "model.num_attention_heads": [2, 4, 8, 3, 0],
  "model.num_query_groups": [null, 1, 2, 3],
  "model.kv_channels": [null, 16, 7],
  "model.seq_length": [16, 64, 128, 0],
  "model.micro_batch_size": [1, 2, 3],
  "model.num_experts": [2, 4, 6, 8],
  "model.moe_router_topk": [1, 2, 3, 9],
  "model.normalization": ["LayerNorm", "RMSNorm", "BatchNorm"],
  "model.hidden_dropout": [0, 0.1, 1, -0.5],
  "model.moe_expert_capacity_factor": [null, 1.25, 0, -1],
  "model.moe_token_drop_policy": ["probs", "position", "random"],
  "model.moe_router_score_function": ["softmax", "sigmoid"],
  "model.moe_router_enable_expert_bias": [false, true, 1],
  "model.moe_shared_expert_intermediate_size": [null, 32, 0],
  "model.moe_shared_expert_gate": [false, true],
  "model.add_bias_linear": [false, true],
  "model.num_layers": [1, 2, 4],
  "model.moe_layer_freq": [1, 2, 3],
  "model.dtype": ["fp32", "bf16", "fp8"],
  "model.hidden_sise": [64],
  "parallelism.world_size": [1, 2, 3, 4],
  "parallelism.expert_model_parallel_size": [1, 2, 4],
  "parallelism.device": ["cpu", "cuda", "auto", "tpu"],
  "parallelism.backend": ["gloo", "nccl", "auto"],
  "pipeline.degree": ["auto", 1, 2, 4, 0, "two"],
  "pipeline.variant": ["auto", "grouped", "moe-overlap", "zigzag"],
  "pipeline.boundaries": [null, [0, 32, 64], [0, 64], [0, 40, 30, 64], [5, 64]],
  "pipeline.capacity_scope": ["chunk", "sequence"],
  "pipeline.emulated_comm": [null, { latency_us: 10, bandwidth_gbps: 25, world_size: 8 }, { latency_us: 10 }, { latency_us: 10, bandwidth_gbps: 0, world_size: 8 }],
  "run.seed": [0, 7, -1],
  "run.steps": [1, 3, 0],
  "run.output_dir": ["runs/x", ""],
  "data.path": [null, "data/x", ""],
  "data.tokenizer": ["byte", "gpt2", "bpe"],
  "data.split": ["95,5", "98, 2", "100", "1,0"],
  "train.lr": [1e-3, 1, 0, -1],
  "train.min_lr": [0, 1e-5, 2],
  "train.steps": [10, 200],
  "train.warmup_steps": [0, 5, 300],
  "train.global_batch_size": [4, 8, 12, 16],
  "train.adam_beta2": [0.95, 0.999, 1],
  "train.clip_grad": [0, 1, -1],
};

const docArb = fc.array(fc.tuple(fc.constantFrom(...Object.keys(FIELDS)), fc.nat()), { minLength: 1, maxLength: 5 }).map((picks) => {
  const doc: Record<string, Record<string, unknown>> = {};
  for (const [field, i] of picks) {
    const [section, key] = field.split(".");
    const values = FIELDS[field];
    (doc[section] ??= {})[key] = values[i % values.length];
  }
  return doc;
});

describe("TypeScript and Python resolve configs alike", () => {
  it(`${CONFIG_SCHEMA_PATH} is src/config/schema.ts's schema (regenerate: npx tsx scripts/export-schemas.ts)`, () => {
    expect(readFileSync(join(root, CONFIG_SCHEMA_PATH), "utf8")).toBe(configSchemaText());
  });

  it("has the Python side to compare with (npm test sets up .venv; a missing one fails, never skips)", () => {
    expect(existsSync(python), `${python}: missing`).toBe(true);
  });

  it("on the committed configs and random valid and invalid ones: the same resolution, or the same field refused", () => {
    const docs: unknown[] = [{}];
    for (const f of readdirSync(join(root, "configs")).filter((f) => f.endsWith(".yaml")))
      docs.push(parseYaml(readFileSync(join(root, "configs", f), "utf8")));
    docs.push(...fc.sample(docArb, { numRuns: 300, seed: 23 }));
    const dir = mkdtempSync(join(tmpdir(), "ampipe-config-xcheck-"));
    writeFileSync(join(dir, "docs.json"), JSON.stringify(docs));
    const run = spawnSync(python, ["-c", PY, join(dir, "docs.json")], {
      encoding: "utf8", env: { ...process.env, PYTHONPATH: join(root, "py") },
    });
    expect(run.stderr).toBe("");
    const py = JSON.parse(run.stdout) as Array<{ ok?: unknown; field?: string; message?: string }>;
    expect(py.length).toBe(docs.length);
    let accepted = 0;
    let refused = 0;
    docs.forEach((doc, i) => {
      const ts = tsResolve(doc);
      const p = py[i];
      const what = JSON.stringify(doc);
      if ("ok" in ts) {
        expect(p.message, `Python refused ${what}`).toBeUndefined();
        expect(p.ok, what).toEqual(ts.ok);
        accepted++;
      } else {
        expect(p.ok, `Python accepted ${what}; TypeScript refused ${ts.fields.join(", ")}`).toBeUndefined();
        expect(ts.fields, `${what}: Python named ${p.field} (${p.message})`).toContain(p.field);
        refused++;
      }
    });
    // the corpus exercises both outcomes
    expect(accepted).toBeGreaterThan(40);
    expect(refused).toBeGreaterThan(40);
  });
});
