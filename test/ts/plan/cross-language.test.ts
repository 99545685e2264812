// The TypeScript checker and the Python executor's validator (py/ampipe/pipeline/plan.py) must
// accept and reject the same plans: the committed fixtures plus random plans and random mutations.
import { spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, readdirSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { planIssues } from "../../../src/plan/check.ts";
import { makePlan } from "../../../src/plan/generators.ts";
import { parsePlanShape, type Plan } from "../../../src/plan/ir.ts";
import { smallDims } from "./helpers.ts";

const root = join(import.meta.dirname, "..", "..", "..");
const python = join(root, ".venv", "bin", "python");
const validator = join(root, "py", "ampipe", "pipeline", "plan.py");

// Loads plan.py on its own (it needs only the standard library), so the check does not pay for importing torch.
const PY = `
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("ampipe_plan_standalone", sys.argv[1])
mod = importlib.util.module_from_spec(spec); sys.modules[spec.name] = mod; spec.loader.exec_module(mod)
out = []
for doc in json.load(open(sys.argv[2])):
    try:
        mod.load_plan(doc); out.append([True, ""])
    except mod.PlanError as e:
        out.append([False, str(e)])
json.dump(out, sys.stdout)
`;

function tsAccepts(doc: unknown): boolean {
  try {
    return planIssues(parsePlanShape(doc)).length === 0;
  } catch {
    return false;
  }
}

const plansArb = fc.record({
  variant: fc.constantFrom("sequential" as const, "grouped" as const, "interleaved" as const),
  degree: fc.integer({ min: 1, max: 6 }),
  chunkQkv: fc.boolean(),
  seq: fc.integer({ min: 6, max: 64 }),
  shared: fc.boolean(),
});

type Mutation = (p: Plan, r: number[]) => void;
const pickList = (p: Plan, r: number) => (r % 2 === 0 ? p.forward : p.backward);
const mutations: Mutation[] = [
  (p, [a, b, c]) => { const ops = pickList(p, a); const o = ops[b % ops.length]; if (o.deps.length) o.deps.splice(c % o.deps.length, 1); },
  (p, [a, b, c]) => { const ops = pickList(p, a); const [o] = ops.splice(b % ops.length, 1); ops.splice(c % (ops.length + 1), 0, o); },
  (p, [a, b]) => { const ops = pickList(p, a); const o = ops[b % ops.length]; o.stream = o.stream === "comm" ? "compute" : "comm"; },
  (p, [a, b, c]) => { const ops = pickList(p, a); const i = b % ops.length; if (i > 0) { const d = ops[c % i].id; if (!ops[i].deps.includes(d)) ops[i].deps.push(d); } },
  (p, [a, b]) => { const ops = pickList(p, a); const i = b % (ops.length - 1); [ops[i], ops[i + 1]] = [ops[i + 1], ops[i]]; },
  (p, [a, b]) => { p.streams.push({ name: "compute2", kind: "compute" }); const ops = pickList(p, a); const o = ops[b % ops.length]; if (o.stream === "compute") o.stream = "compute2"; },
  // a shared expert in the dims but not in the op lists, or the other way round
  (p) => { p.dims.moe_shared_expert_intermediate_size = p.dims.moe_shared_expert_intermediate_size === null ? 16 : null; },
];

describe("TypeScript and Python validators agree", () => {
  it("has the Python side to compare with (npm test sets up .venv; a missing one fails, never skips)", () => {
    expect(existsSync(python), `${python}: missing`).toBe(true);
    expect(existsSync(validator), `${validator}: missing`).toBe(true);
  });
  it("on the fixtures, random plans and random mutations of them", () => {
    const docs: unknown[] = [];
    const fixtures = join(root, "test", "fixtures", "plans");
    for (const f of readdirSync(fixtures).filter((f) => f.endsWith(".json"))) docs.push(JSON.parse(readFileSync(join(fixtures, f), "utf8")));
    for (const f of readdirSync(join(fixtures, "invalid")).filter((f) => f.endsWith(".json") && f !== "index.json"))
      docs.push(JSON.parse(readFileSync(join(fixtures, "invalid", f), "utf8")));
    const samples = fc.sample(fc.tuple(plansArb, fc.nat(mutations.length), fc.array(fc.nat(), { minLength: 3, maxLength: 3 })), { numRuns: 160, seed: 5 });
    for (const [x, m, r] of samples) {
      const dims = smallDims({ seq_length: x.seq, moe_shared_expert_intermediate_size: x.shared ? 16 : null });
      const p = x.variant === "sequential" ? makePlan("sequential", dims, { chunkQkv: x.chunkQkv }) : makePlan(x.variant, dims, { degree: x.degree, chunkQkv: x.chunkQkv });
      const q: Plan = JSON.parse(JSON.stringify(p));
      if (m < mutations.length) mutations[m](q, r);
      docs.push(q);
    }
    const dir = mkdtempSync(join(tmpdir(), "ampipe-xcheck-"));
    writeFileSync(join(dir, "plans.json"), JSON.stringify(docs));
    const run = spawnSync(python, ["-c", PY, validator, join(dir, "plans.json")], { encoding: "utf8" });
    expect(run.stderr).toBe("");
    const py = JSON.parse(run.stdout) as Array<[boolean, string]>;
    expect(py.length).toBe(docs.length);
    const disagreements = docs
      .map((d, i) => ({ i, ts: tsAccepts(d), py: py[i][0], msg: py[i][1] }))
      .filter((x) => x.ts !== x.py);
    expect(disagreements).toEqual([]);
    // the corpus exercises both outcomes
    expect(py.filter(([ok]) => ok).length).toBeGreaterThan(40);
    expect(py.filter(([ok]) => !ok).length).toBeGreaterThan(40);
  });
});
