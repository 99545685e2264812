// Writes what the two languages share, from the TypeScript definitions: docs/plan.schema.json
// (the zod plan schema of src/plan/ir.ts) and, as Python package data, the op-kind table of
// src/plan/opkinds.ts (py/ampipe/pipeline/op_kinds.json), the dims table of src/plan/dims.ts
// (py/ampipe/pipeline/dims.json) and the zod config schema of src/config/schema.ts as JSON
// Schema (py/ampipe/config.schema.json): `npx tsx scripts/export-schemas.ts`.
// test/ts/plan/fixtures.test.ts and test/ts/config/config.test.ts fail when any is stale.
import { writeFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { PLAN_VERSION, planJsonSchema } from "../src/plan/ir.ts";
import { configJsonSchema } from "../src/config/schema.ts";
import { dimsTableJson } from "../src/plan/dims.ts";
import { opKindTableJson } from "../src/plan/opkinds.ts";

export const SCHEMA_PATH = "docs/plan.schema.json";
export const schemaText = (): string => JSON.stringify(planJsonSchema(), null, 2) + "\n";
export const OP_KINDS_PATH = "py/ampipe/pipeline/op_kinds.json";
export const opKindsText = (): string => opKindTableJson(PLAN_VERSION);
export const DIMS_PATH = "py/ampipe/pipeline/dims.json";
export const dimsText = (): string => dimsTableJson(PLAN_VERSION);
export const CONFIG_SCHEMA_PATH = "py/ampipe/config.schema.json";
export const configSchemaText = (): string => JSON.stringify(configJsonSchema(), null, 1) + "\n";

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  writeFileSync(new URL(`../${SCHEMA_PATH}`, import.meta.url), schemaText());
  writeFileSync(new URL(`../${OP_KINDS_PATH}`, import.meta.url), opKindsText());
  writeFileSync(new URL(`../${DIMS_PATH}`, import.meta.url), dimsText());
  writeFileSync(new URL(`../${CONFIG_SCHEMA_PATH}`, import.meta.url), configSchemaText());
  console.log(`wrote ${SCHEMA_PATH}, ${OP_KINDS_PATH}, ${DIMS_PATH} and ${CONFIG_SCHEMA_PATH}`);
}
