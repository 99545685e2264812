import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { spawnSync } from "node:child_process";
import { describe, expect, it } from "vitest";
import { parse as parseYaml } from "yaml";
import { applyOverrides, ConfigError, loadConfig, resolveConfig } from "../../../src/config/index.ts";

const root = join(import.meta.dirname, "..", "..", "..");
const defaultConfig = join(root, "configs", "default.yaml");

function issues(obj: unknown): string[] {
  try {
    resolveConfig(obj);
  } catch (e) {
    if (e instanceof ConfigError) return e.issues.map((i) => `${i.path}: ${i.message}`);
    throw e;
  }
  return [];
}

describe("experiment config", () => {
  it("loads the small default config and resolves derived fields", () => {
    const c = loadConfig(defaultConfig);
    expect(c.parallelism).toEqual({ world_size: 2, expert_model_parallel_size: 2, device: "cpu", backend: "gloo" });
    expect(c.model.seq_length).toBe(1024);
    expect(c.model.hidden_size).toBe(128);
    expect(c.model.num_experts).toBe(4);
    expect(c.model.moe_router_topk).toBe(2);
    expect(c.model.num_query_groups).toBe(4); // null -> num_attention_heads
    expect(c.model.kv_channels).toBe(32); // null -> hidden_size / num_attention_heads
    expect(c.pipeline.degree).toBe("auto");
  });

  it("fills every default from an empty document, and resolving twice changes nothing", () => {
    const c = resolveConfig({});
    expect(c.run).toEqual({ steps: 4, seed: 1234, warmup: 1, output_dir: "runs/default" });
    expect(resolveConfig(c)).toEqual(c);
  });

  it.each([
    [{ model: { hidden_size: 130 } }, "model.num_attention_heads: must divide model.hidden_size (130) unless model.kv_channels is given; got 4"],
    [{ model: { num_query_groups: 3 } }, "model.num_query_groups: must divide model.num_attention_heads (4); got 3"],
    [{ model: { moe_router_topk: 5 } }, "model.moe_router_topk: must be <= model.num_experts (4); got 5"],
    [{ model: { hidden_size: 12, num_attention_heads: 4 } }, "model.kv_channels: rotary embeddings need an even head dim; got 3"],
    [{ model: { kv_channels: 7 } }, "model.kv_channels: rotary embeddings need an even head dim; got 7"],
    [{ model: { num_experts: 6 }, parallelism: { expert_model_parallel_size: 4, world_size: 4 } },
      "model.num_experts: must be divisible by parallelism.expert_model_parallel_size (4); got 6"],
    [{ parallelism: { world_size: 3 } }, "parallelism.world_size: must be divisible by parallelism.expert_model_parallel_size (2); got 3"],
    [{ pipeline: { degree: 300 } }, "pipeline.degree: must be <= model.seq_length (256); got 300"],
    [{ pipeline: { boundaries: [0, 100, 100, 256] } }, "pipeline.boundaries: must be strictly increasing; entry 2 (100) is not greater than entry 1 (100)"],
    [{ pipeline: { boundaries: [0, 100, 200] } }, "pipeline.boundaries: must start at 0 and end at model.seq_length (256); got [0, 100, 200]"],
    [{ pipeline: { degree: 2, boundaries: [0, 100, 200, 256] } }, "pipeline.boundaries: must have pipeline.degree + 1 = 3 entries; got 4"],
    [{ pipeline: { degree: "many" } }, 'pipeline.degree: expected a positive integer or "auto"'],
    [{ parallelism: { device: "cpu", backend: "nccl" } }, "parallelism.backend: nccl needs parallelism.device cuda (or auto); use gloo on cpu"],
    [{ model: { hiden_size: 64 } }, 'model.hiden_size: unknown field (did you mean "hidden_size"?)'],
    [{ modle: {} }, 'modle: unknown field (did you mean "model"?)'],
    [{ model: { dtype: "fp8" } }, 'model.dtype: Invalid option: expected one of "fp32"|"bf16"|"fp16"'],
    [{ run: { steps: 0 } }, "run.steps: Too small: expected number to be >=1"],
    [{ model: { seq_length: 12.5 } }, "model.seq_length: Invalid input: expected int, received number"],
    [{ pipeline: { capacity_scope: "sequence" } },
      "pipeline.capacity_scope: sequence needs model.moe_token_drop_policy: position (with probs, which tokens a chunk drops depends on later chunks); got model.moe_token_drop_policy: probs"],
    [{ model: { moe_token_drop_policy: "random" } }, 'model.moe_token_drop_policy: Invalid option: expected one of "probs"|"position"'],
  ])("names the field and the rule: %j", (obj, expected) => {
    expect(issues(obj)).toContain(expected);
  });

  it("accepts kv_channels that do not divide hidden_size, and explicit boundaries that match the degree", () => {
    expect(issues({ model: { hidden_size: 130, kv_channels: 32 } })).toEqual([]);
    expect(issues({ model: { kv_channels: 7, position_embedding_type: "learned_absolute" } })).toEqual([]);
    expect(resolveConfig({ pipeline: { degree: 3, boundaries: [0, 96, 176, 256] } }).pipeline.boundaries).toEqual([0, 96, 176, 256]);
    // Megatron's default drop policy, the paper's capacity scope; sequence with position is exact
    const d = resolveConfig({});
    expect([d.model.moe_token_drop_policy, d.pipeline.capacity_scope]).toEqual(["probs", "chunk"]);
    expect(issues({ model: { moe_token_drop_policy: "position" }, pipeline: { capacity_scope: "sequence" } })).toEqual([]);
  });

  it("reads JSON and YAML files, applies --set overrides, and reports file errors", () => {
    const dir = mkdtempSync(join(tmpdir(), "ampipe-config-"));
    const json = join(dir, "c.json");
    writeFileSync(json, JSON.stringify({ model: { seq_length: 512 } }));
    expect(loadConfig(json, ["pipeline.boundaries=[0, 200, 512]", "run.steps=8"]).pipeline.boundaries).toEqual([0, 200, 512]);
    expect(applyOverrides({ a: { b: 1 } }, ["a.c=auto", "d.e=null"])).toEqual({ a: { b: 1, c: "auto" }, d: { e: null } });
    const bad = join(dir, "bad.yaml");
    writeFileSync(bad, "model:\n  hidden_size: 64\n  hidden_size: 32\n");
    expect(() => loadConfig(bad)).toThrow(/bad\.yaml: not valid YAML: Map keys must be unique/);
    expect(() => loadConfig(join(dir, "missing.yaml"))).toThrow(/missing\.yaml: [\s\S]*cannot read file: ENOENT/);
    expect(() => applyOverrides({}, ["steps"])).toThrow(/an override must look like "section.field=value"/);
  });

  it("`ampipe config show` prints the resolved config, and exits 2 naming the field on error", () => {
    const cli = join(root, "bin", "ampipe.js");
    const ok = spawnSync(process.execPath, [cli, "config", "show", defaultConfig, "--set", "model.seq_length=512"], { encoding: "utf8" });
    expect(ok.status).toBe(0);
    const shown = parseYaml(ok.stdout);
    expect(shown.model.seq_length).toBe(512);
    expect(shown.model.kv_channels).toBe(32);
    const asJson = spawnSync(process.execPath, [cli, "config", "show", defaultConfig, "--json"], { encoding: "utf8" });
    expect(JSON.parse(asJson.stdout)).toEqual(loadConfig(defaultConfig));
    const bad = spawnSync(process.execPath, [cli, "config", "show", defaultConfig, "--set", "model.moe_router_topk=9"], { encoding: "utf8" });
    expect(bad.status).toBe(2);
    expect(bad.stderr).toContain("model.moe_router_topk: must be <= model.num_experts (4); got 9");
  });
});
