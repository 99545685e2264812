// The all-to-all's bytes on the wire have one model (src/plan/wire.ts), which Python's
// (py/ampipe/wire.py) must match number for number; the cost model and the bench sweep use it.
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { opWork } from "../../../src/plan/costs.ts";
import { a2aRows, expertCapacity, wireBytes } from "../../../src/plan/wire.ts";
import { smallDims } from "./helpers.ts";

const root = join(import.meta.dirname, "..", "..", "..");
const python = join(root, ".venv", "bin", "python");

const cases: Array<[number, number, number, number | null, number]> = [];
for (const tokens of [1, 25, 64, 1000, 4096])
  for (const topk of [1, 2, 8])
    for (const experts of [2, 3, 8, 64])
      for (const cf of [null, 0.9, 1.0, 1.25, 2.2]) cases.push([tokens, topk, experts, cf, [1, 2, 8][tokens % 3]]);

describe("the wire-bytes model", () => {
  it("by hand: Megatron's capacity order, the kept share, the dropless buffer", () => {
    expect(expertCapacity(10, 2, 4, 1.25)).toBe(7); // ceil(6.25)
    // (25*2/3)*0.9 = 15.000000000000002 rounds up in Megatron's order; (0.9*25*2)/3 would give 15
    expect(expertCapacity(25, 2, 3, 0.9)).toBe(16);
    expect(a2aRows(25, 2, 3, 0.9)).toBe(48);
    expect(a2aRows(25, 2, 3, null)).toBe(50);
    expect(wireBytes(800, 8)).toBe(700);
    expect(wireBytes(800, 1)).toBe(0);
    const d = smallDims({ expert_model_parallel_size: 4 });
    const T = d.seq_length * d.micro_batch_size;
    expect(opWork(d, [0, d.seq_length], "dispatch", 0)).toBe(wireBytes(T * d.moe_router_topk * d.hidden_size * 4, 4));
  });

  it("Python's model gives the same numbers (a missing .venv fails, never skips)", () => {
    expect(existsSync(python), `${python}: missing`).toBe(true);
    const py = spawnSync(python, ["-c", `
import json, sys
from ampipe.wire import a2a_rows, expert_capacity, wire_bytes
out = [[expert_capacity(t, k, e, cf), a2a_rows(t, k, e, cf), wire_bytes(a2a_rows(t, k, e, cf) * 512 * 2, w)]
       for t, k, e, cf, w in json.loads(sys.argv[1])]
print(json.dumps(out))`, JSON.stringify(cases)], { encoding: "utf8", env: { ...process.env, PYTHONPATH: join(root, "py") } });
    expect(py.stderr).toBe("");
    const got = JSON.parse(py.stdout) as Array<[number | null, number, number]>;
    expect(got).toEqual(cases.map(([t, k, e, cf, w]) => [expertCapacity(t, k, e, cf), a2aRows(t, k, e, cf), wireBytes(a2aRows(t, k, e, cf) * 512 * 2, w)]));
  });
});
