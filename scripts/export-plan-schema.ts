// Writes docs/plan.schema.json from the zod schema in src/plan/ir.ts:
// `npx tsx scripts/export-plan-schema.ts`. test/ts/plan/schema.test.ts fails when the file is stale.
import { writeFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { planJsonSchema } from "../src/plan/ir.ts";

export const SCHEMA_PATH = "docs/plan.schema.json";
export const schemaText = (): string => JSON.stringify(planJsonSchema(), null, 2) + "\n";

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  writeFileSync(new URL(`../${SCHEMA_PATH}`, import.meta.url), schemaText());
  console.log(`wrote ${SCHEMA_PATH}`);
}
