// The two schedule replays of a plan must agree: the planner's discrete-event simulator
// (src/plan/simulate.ts) and the Python `simulate_ms` (py/ampipe/pipeline/analysis.py, used by the
// pipeline benchmark and `ampipe run` to separate executor overhead from schedule stalls).
// On the fixture plans (one compute and one comm stream) with no extra costs (overlap slowdown 1,
// no per-op gap) and the same per-op times, the forward and backward makespans must be equal.
import { spawnSync } from "node:child_process";
import { existsSync, readFileSync, readdirSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { simulatePlan, type PassName } from "../../../src/plan/simulate.ts";
import { parsePlanShape, type Plan } from "../../../src/plan/ir.ts";

const root = join(import.meta.dirname, "..", "..", "..");
const python = join(root, ".venv", "bin", "python");
const fixtures = join(root, "test", "fixtures", "plans");
const analysis = join(root, "py", "ampipe", "pipeline", "analysis.py");

// Reads [{plan, times}] on stdin, writes [{forward_ms, backward_ms}] (per_stream=False: CPU).
const PY = `
import json, sys
from ampipe.pipeline.analysis import simulate_ms
from ampipe.pipeline.plan import load_plan
out = []
for case in json.load(sys.stdin):
    r = simulate_ms(load_plan(case["plan"]), case["times"], per_stream=False)
    out.append({"forward_ms": r["forward_ms"], "backward_ms": r["backward_ms"]})
json.dump(out, sys.stdout)
`;

/** 32-bit FNV-1a of a string: the per-op seed. */
function fnv1a(s: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < s.length; i++) h = Math.imul(h ^ s.charCodeAt(i), 0x01000193) >>> 0;
  return h;
}

/** mulberry32: one uniform draw in [0, 1) from a 32-bit seed. */
function uniform(seed: number): number {
  let t = (seed + 0x6d2b79f5) >>> 0;
  t = Math.imul(t ^ (t >>> 15), t | 1);
  t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
}

// Two time sets per plan: "continuous" (irrational-looking times, no ties) and "ties" (multiples
// of 0.5 ms with about one op in eight free), so ops end at the same instant and zero-time ops occur.
type TimeSet = "continuous" | "ties";
function opTime(id: string, set: TimeSet): number {
  const u = uniform(fnv1a(`${set}:${id}`));
  if (set === "continuous") return 0.05 + 4.95 * u;
  return u < 0.125 ? 0 : Math.floor(u * 8) * 0.5;
}

function timesFor(plan: Plan, set: TimeSet): Record<PassName, Record<string, number>> {
  const t = { forward: {} as Record<string, number>, backward: {} as Record<string, number> };
  for (const pass of ["forward", "backward"] as const) for (const op of plan[pass]) t[pass][op.id] = opTime(op.id, set);
  return t;
}

const relDiff = (a: number, b: number) => Math.abs(a - b) / Math.max(Math.abs(a), Math.abs(b), 1e-300);

describe("TypeScript simulatePlan and Python simulate_ms agree", () => {
  it("has the Python side to compare with (npm test sets up .venv; a missing one fails, never skips)", () => {
    expect(existsSync(python), `${python}: missing`).toBe(true);
    expect(existsSync(analysis), `${analysis}: missing`).toBe(true);
  });
  it("on every fixture plan, forward and backward makespans, with the same per-op times", () => {
    const files = readdirSync(fixtures).filter((f) => f.endsWith(".json")).sort();
    expect(files.length).toBeGreaterThan(10);
    const cases: Array<{ file: string; set: TimeSet; doc: unknown; plan: Plan; times: Record<PassName, Record<string, number>> }> = [];
    for (const file of files) {
      const doc = JSON.parse(readFileSync(join(fixtures, file), "utf8"));
      const plan = parsePlanShape(doc);
      // The premise of the comparison: one compute and one comm stream.
      expect(plan.streams.map((s) => s.kind).sort(), file).toEqual(["comm", "compute"]);
      for (const set of ["continuous", "ties"] as const) cases.push({ file, set, doc, plan, times: timesFor(plan, set) });
    }

    const run = spawnSync(python, ["-c", PY], {
      cwd: root,
      encoding: "utf8",
      input: JSON.stringify(cases.map((c) => ({ plan: c.doc, times: c.times }))),
    });
    expect(run.stderr).toBe("");
    expect(run.status).toBe(0);
    const py = JSON.parse(run.stdout) as Array<{ forward_ms: number; backward_ms: number }>;
    expect(py.length).toBe(cases.length);

    const rows = cases.map((c, i) => {
      // A cost function that reads exactly the times handed to Python (it throws on a missing id).
      const ts = simulatePlan(c.plan, (op, pass) => {
        const v = c.times[pass][op.id];
        if (v === undefined) throw new Error(`no time for ${pass} op ${op.id}`);
        return v;
      });
      const work = (pass: PassName) => c.plan[pass].reduce((a, o) => a + c.times[pass][o.id], 0);
      return {
        plan: c.file, times: c.set,
        tsForward: ts.forward.makespanMs, pyForward: py[i].forward_ms,
        tsBackward: ts.backward.makespanMs, pyBackward: py[i].backward_ms,
        workForward: work("forward"), workBackward: work("backward"),
        chunks: new Set(c.plan.forward.map((o) => o.chunk).filter((k) => k !== null)).size,
      };
    });
    const disagreements = rows.filter(
      (r) => !(relDiff(r.tsForward, r.pyForward) <= 1e-9) || !(relDiff(r.tsBackward, r.pyBackward) <= 1e-9),
    );
    expect(disagreements).toEqual([]);

    // The comparison is not vacuous: every makespan is positive, and every pipelined plan overlaps
    // compute with communication (its makespan is below the sum of its op times), so both replays
    // model the two resources running at once rather than one sequence.
    for (const r of rows) {
      expect(r.tsForward, `${r.plan} ${r.times}`).toBeGreaterThan(0);
      expect(r.tsBackward, `${r.plan} ${r.times}`).toBeGreaterThan(0);
      if (r.chunks >= 2) {
        expect(r.tsForward, `${r.plan} ${r.times} forward`).toBeLessThan(r.workForward);
        expect(r.tsBackward, `${r.plan} ${r.times} backward`).toBeLessThan(r.workBackward);
      }
    }
  });
});
