// The committed plan fixtures (read by the Python executor's tests) must match the generators.
import { existsSync, readFileSync, readdirSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { FIXTURE_DIR, fixtureFiles, fixtureSpecs } from "../../../scripts/gen-plan-fixtures.ts";
import { validatePlan } from "../../../src/plan/check.ts";
import { DIMS_PATH, OP_KINDS_PATH, SCHEMA_PATH, dimsText, opKindsText, schemaText } from "../../../scripts/export-schemas.ts";

const root = join(import.meta.dirname, "..", "..", "..");
const files = fixtureFiles();

describe("committed plan fixtures", () => {
  it("match what scripts/gen-plan-fixtures.ts generates (regenerate: npx tsx scripts/gen-plan-fixtures.ts)", () => {
    for (const [rel, text] of files) {
      expect(existsSync(join(root, rel)), `${rel} is missing`).toBe(true);
      expect(readFileSync(join(root, rel), "utf8"), `${rel} is stale`).toBe(text);
    }
  });

  it("has no stray files", () => {
    const committed = [
      ...readdirSync(join(root, FIXTURE_DIR)).filter((f) => f !== "invalid").map((f) => `${FIXTURE_DIR}/${f}`),
      ...readdirSync(join(root, FIXTURE_DIR, "invalid")).map((f) => `${FIXTURE_DIR}/invalid/${f}`),
    ];
    expect(committed.filter((f) => !files.has(f))).toEqual([]);
  });

  it("covers every variant, P in {1,2,3,4,8}, non-uniform boundaries, GQA, top-1, EP 2 and whole-sequence qkv", () => {
    const specs = fixtureSpecs();
    const plans = specs.map((s) => validatePlan(JSON.parse(readFileSync(join(root, FIXTURE_DIR, s.file), "utf8"))));
    for (const variant of ["grouped", "interleaved"])
      for (const P of [1, 2, 3, 4, 8])
        expect(plans.some((p) => p.variant === variant && p.boundaries.length === P + 1), `${variant} P=${P}`).toBe(true);
    expect(plans.some((p) => p.variant === "sequential")).toBe(true);
    expect(specs.filter((s) => s.nonuniform).length).toBeGreaterThanOrEqual(8);
    expect(plans.filter((p) => p.dims.num_query_groups < p.dims.num_attention_heads).length).toBeGreaterThan(plans.length / 3);
    expect(plans.some((p) => p.dims.moe_router_topk === 1)).toBe(true);
    expect(plans.some((p) => p.dims.expert_model_parallel_size === 2)).toBe(true);
    expect(plans.some((p) => !p.chunk_qkv && p.boundaries.length > 2)).toBe(true);
  });

  it("invalid fixtures are rejected with errors that name the op or field", () => {
    const index = JSON.parse(readFileSync(join(root, FIXTURE_DIR, "invalid", "index.json"), "utf8")) as Array<{ file: string; mentions: string[] }>;
    expect(index.length).toBeGreaterThanOrEqual(8);
    for (const entry of index) {
      const value = JSON.parse(readFileSync(join(root, FIXTURE_DIR, "invalid", entry.file), "utf8"));
      let message = "";
      try {
        validatePlan(value);
      } catch (e) {
        message = (e as Error).message;
      }
      expect(message, `${entry.file} was accepted`).not.toBe("");
      for (const m of entry.mentions) expect(message, entry.file).toContain(m);
    }
  });

  it("py/ampipe/pipeline/op_kinds.json is src/plan/opkinds.ts's table (regenerate: npx tsx scripts/export-schemas.ts)", () => {
    expect(readFileSync(join(root, OP_KINDS_PATH), "utf8")).toBe(opKindsText());
  });

  it("py/ampipe/pipeline/dims.json is src/plan/dims.ts's table (regenerate: npx tsx scripts/export-schemas.ts)", () => {
    expect(readFileSync(join(root, DIMS_PATH), "utf8")).toBe(dimsText());
  });

  it("docs/plan.schema.json is up to date (regenerate: npx tsx scripts/export-schemas.ts)", () => {
    expect(readFileSync(join(root, SCHEMA_PATH), "utf8")).toBe(schemaText());
  });
});
