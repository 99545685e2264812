// Writes docs/plan.schema.json from the zod schema in src/plan/ir.ts, and the op-kind table of
// src/plan/opkinds.ts for the Python executor (py/ampipe/pipeline/op_kinds.json):
// `npx tsx scripts/export-plan-schema.ts`. test/ts/plan/fixtures.test.ts fails when either is stale.
import { writeFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { PLAN_VERSION, planJsonSchema } from "../src/plan/ir.ts";
import { opKindTableJson } from "../src/plan/opkinds.ts";

export const SCHEMA_PATH = "docs/plan.schema.json";
export const schemaText = (): string => JSON.stringify(planJsonSchema(), null, 2) + "\n";
export const OP_KINDS_PATH = "py/ampipe/pipeline/op_kinds.json";
export const opKindsText = (): string => opKindTableJson(PLAN_VERSION);

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  writeFileSync(new URL(`../${SCHEMA_PATH}`, import.meta.url), schemaText());
  writeFileSync(new URL(`../${OP_KINDS_PATH}`, import.meta.url), opKindsText());
  console.log(`wrote ${SCHEMA_PATH} and ${OP_KINDS_PATH}`);
}
