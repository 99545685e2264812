// The op-kind table (src/plan/opkinds.ts) is the one definition: the kind lists, the cost model's
// work units and the Python executor's copy (py/ampipe/pipeline/op_kinds.json, checked fresh in
// fixtures.test.ts) agree with it, and it is consistent in itself.
import { describe, expect, it } from "vitest";
import { needsOf } from "../../../src/plan/check.ts";
import { WORK_UNIT } from "../../../src/plan/costs.ts";
import { BACKWARD_KINDS, COMM_KINDS, FORWARD_KINDS, OP_KINDS, type OpKind } from "../../../src/plan/ir.ts";
import { OP_KIND_TABLE, type OpKindSpec } from "../../../src/plan/opkinds.ts";

const table = OP_KIND_TABLE as Record<string, OpKindSpec>;

describe("the op-kind table", () => {
  it("gives each kind its pass, and every forward kind but the count exchange a backward of the other pass", () => {
    expect(new Set(OP_KINDS)).toEqual(new Set(Object.keys(table)));
    for (const k of FORWARD_KINDS) {
      expect(table[k].pass).toBe("forward");
      if (k === "counts") expect(table[k].backward, k).toBeUndefined();
      else expect(table[table[k].backward!].pass, k).toBe("backward");
    }
    const backwards = FORWARD_KINDS.map((k) => table[k].backward).filter(Boolean);
    expect(new Set(backwards)).toEqual(new Set(BACKWARD_KINDS));
  });

  it("reads only kinds of its own pass, and a backward runs on its forward's stream kind", () => {
    for (const [k, spec] of Object.entries(table)) {
      for (const r of spec.reads) expect(table[r.kind]?.pass, `${k} reads ${r.kind}`).toBe(spec.pass);
      if (spec.backward) expect(table[spec.backward].stream, k).toBe(spec.stream);
      if (spec.backward) expect(table[spec.backward].requires, k).toBe(spec.requires);
    }
    expect([...COMM_KINDS].sort()).toEqual(["combine", "combine_bwd", "counts", "dispatch", "dispatch_bwd"]);
  });

  it("agrees with the cost model's work units", () => {
    for (const k of OP_KINDS) expect(WORK_UNIT[k], k).toBe(table[k].work);
  });

  it("resolves the shared expert's reads only when the block has one", () => {
    expect(needsOf("unpermute", 1, 3, true).map((n) => n.kind)).toEqual(["combine", "route", "proj"]);
    expect(needsOf("unpermute", 1, 3, true, true, "chunk", true)).toEqual([
      { kind: "combine", chunk: 1 }, { kind: "route", chunk: 1 }, { kind: "proj", chunk: 1 }, { kind: "shared", chunk: 1 }]);
    expect(needsOf("shared", 2, 3, true, true, "chunk", true)).toEqual([{ kind: "proj", chunk: 2 }]);
    expect(needsOf("proj_bwd", 0, 3, true, true, "chunk", true).map((n) => n.kind as OpKind)).toContain("shared_bwd");
    expect(needsOf("shared_bwd", 0, 3, true, true, "chunk", true)).toEqual([{ kind: "unpermute_bwd", chunk: 0 }]);
  });

  it("names each value once, by its one writer, and every value read is one the read kind writes", () => {
    for (const pass of ["forward", "backward"] as const) {
      const writer = new Map<string, string>();
      for (const [k, spec] of Object.entries(table).filter(([, s]) => s.pass === pass))
        for (const v of [...spec.writes, ...(spec.buffers ?? [])]) {
          expect(writer.get(v), `${v}: written by ${writer.get(v)} and ${k}`).toBeUndefined();
          writer.set(v, k);
        }
      for (const [k, spec] of Object.entries(table).filter(([, s]) => s.pass === pass))
        for (const r of spec.reads) {
          expect(r.values.length, `${k} reads nothing of ${r.kind}`).toBeGreaterThan(0);
          for (const v of r.values) expect(writer.get(v), `${k} reads ${v} of ${r.kind}`).toBe(r.kind);
        }
    }
    // what the executor hands on is read by some later op (else it would be an output)
    const read = new Set(Object.values(table).flatMap((s) => s.reads.flatMap((r) => r.values)));
    for (const [k, spec] of Object.entries(table)) for (const v of spec.writes) expect(read.has(v), `${k} writes ${v}`).toBe(true);
    expect(Object.entries(table).filter(([, s]) => s.in_place).map(([k]) => k)).toEqual(["attn_bwd"]);
  });
});
