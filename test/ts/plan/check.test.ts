import { describe, expect, it } from "vitest";
import { PlanValidationError, needsOf, planIssues, validatePlan } from "../../../src/plan/check.ts";
import { makePlan } from "../../../src/plan/generators.ts";
import type { Plan } from "../../../src/plan/ir.ts";
import { smallDims } from "./helpers.ts";

const clone = (p: Plan): Plan => JSON.parse(JSON.stringify(p));
const op = (p: Plan, id: string) => [...p.forward, ...p.backward].find((o) => o.id === id)!;
const messages = (p: Plan) => planIssues(p).map((i) => `${i.id}: ${i.message}`);

describe("plan checker", () => {
  const good = makePlan("interleaved", smallDims(), { degree: 3 });

  it("accepts a generated plan", () => {
    expect(planIssues(good)).toEqual([]);
  });

  it("needs follow the contract table", () => {
    expect(needsOf("attn", 2, 3, true)).toEqual([{ kind: "qkv", chunk: 0 }, { kind: "qkv", chunk: 1 }, { kind: "qkv", chunk: 2 }]);
    expect(needsOf("attn", 2, 3, false)).toEqual([{ kind: "qkv", chunk: null }]);
    expect(needsOf("qkv_bwd", 1, 3, true)).toEqual([{ kind: "attn_bwd", chunk: 1 }, { kind: "attn_bwd", chunk: 2 }]);
    expect(needsOf("qkv_bwd", null, 3, false).length).toBe(3);
    expect(needsOf("aux_loss", null, 3, true).map((n) => n.chunk)).toEqual([0, 1, 2]);
    expect(needsOf("route_bwd", 1, 3, true).map((n) => n.kind).sort()).toEqual(["aux_loss_bwd", "dispatch_bwd", "unpermute_bwd"]);
  });

  it("a missing cross-stream dep is named with the op and the need", () => {
    const p = clone(good);
    op(p, "f.combine.1").deps = [];
    expect(messages(p)).toEqual([expect.stringMatching(/^f\.combine\.1: needs f\.experts\.1 \(experts of chunk 1\)/)]);
  });

  it("same-stream order covers a need; moving a need later on its stream breaks it", () => {
    const p = clone(good);
    const i = p.forward.findIndex((o) => o.id === "f.qkv.1");
    const [q] = p.forward.splice(i, 1);
    p.forward.push(q); // qkv of chunk 1 now runs after everything that needs it
    const m = messages(p);
    expect(m.some((s) => s.startsWith("f.attn.1: needs f.qkv.1"))).toBe(true);
    expect(m.some((s) => s.startsWith("f.attn.2: needs f.qkv.1"))).toBe(true);
  });

  it("covers transitively through deps on other streams", () => {
    // unpermute.0 needs route.0: covered through combine.0 <- experts.0 <- dispatch.0 <- route.0 even
    // when unpermute.0 sits on a second compute stream with only a dep on combine.0
    const p = clone(makePlan("grouped", smallDims(), { degree: 2 }));
    p.streams.push({ name: "compute2", kind: "compute" });
    Object.assign(op(p, "f.unpermute.0"), { stream: "compute2", deps: ["f.combine.0"] });
    expect(planIssues(p)).toEqual([]);
  });

  it("rejects missing and duplicated ops, bad chunks, wrong stream kinds and unknown deps", () => {
    const p = clone(good);
    p.forward = p.forward.filter((o) => o.id !== "f.aux_loss");
    expect(messages(p)).toEqual(["f.aux_loss: missing op: \"aux_loss\" for the whole sequence"]);

    const q = clone(good);
    q.forward.push({ ...op(q, "f.proj.2"), id: "f.proj.2b" });
    expect(messages(q).join("\n")).toMatch(/f\.proj\.2b: duplicate op: "proj" for chunk 2 already appears as f\.proj\.2/);

    const r = clone(good);
    op(r, "f.route.1").chunk = 7;
    op(r, "f.dispatch.0").stream = "compute";
    op(r, "f.experts.0").deps.push("f.nothing");
    op(r, "b.aux_loss").chunk = 0;
    const m = messages(r).join("\n");
    expect(m).toMatch(/f\.route\.1: chunk 7 is out of range \(the plan has 3 chunks\)/);
    expect(m).toMatch(/f\.dispatch\.0: kind "dispatch" must run on a comm stream/);
    expect(m).toMatch(/f\.experts\.0: dep "f\.nothing" is not an op of the forward list/);
    expect(m).toMatch(/b\.aux_loss: chunk must be null/);

    const s = clone(good);
    const moved = s.backward.shift()!;
    s.forward.push(moved);
    expect(messages(s).join("\n")).toMatch(/b\.aux_loss: kind "aux_loss_bwd" does not belong in the forward list/);
  });

  it("rejects bad boundaries and duplicate streams at plan level", () => {
    const p = clone(good);
    p.boundaries = [0, 30, 20, 48];
    p.streams.push({ name: "comm", kind: "comm" });
    expect(planIssues(p).map((i) => i.message)).toEqual([
      "boundaries[2] (20) must be greater than boundaries[1] (30)",
      'streams[2]: duplicate stream name "comm"',
    ]);
  });

  it("validatePlan throws a PlanValidationError listing every issue, and shape errors name the field", () => {
    const p = clone(good);
    op(p, "f.experts.2").deps = [];
    expect(() => validatePlan(p)).toThrow(PlanValidationError);
    expect(() => validatePlan({ ...good, version: 99 })).toThrow(/^version: unsupported plan version 99/);
    expect(() => validatePlan({ ...good, version: 1 })).toThrow(/^version: unsupported plan version 1 .*counts.*regenerate it with `ampipe plan`/);
    expect(() => validatePlan({ ...good, format: "x" })).toThrow(/^format: expected "ampipe\.plan"/);
    const bad = clone(good) as unknown as { forward: Array<Record<string, unknown>> };
    bad.forward[1].deps = "f.qkv.0";
    expect(() => validatePlan(bad)).toThrow(/forward\[1\] \(f\.attn\.0\)\.deps/);
    expect(() => validatePlan({ ...good, dims: { ...good.dims, num_query_groups: 3 } })).toThrow(/dims\.num_query_groups/);
  });
});
