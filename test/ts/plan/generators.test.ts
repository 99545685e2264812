import { describe, expect, it } from "vitest";
import { planIssues, validatePlan } from "../../../src/plan/check.ts";
import { makePlan, sequentialPlan } from "../../../src/plan/generators.ts";
import { opId, parseDims, type Plan } from "../../../src/plan/ir.ts";
import { simulatePlan } from "../../../src/plan/simulate.ts";
import { smallDims } from "./helpers.ts";

const ids = (plan: Plan, list: "forward" | "backward", stream?: string) =>
  plan[list].filter((o) => stream === undefined || o.stream === stream).map((o) => o.id);

describe("generators", () => {
  it("sequential: one chunk, the block in order, comm waits for its producer", () => {
    const p = sequentialPlan(smallDims());
    expect(p.boundaries).toEqual([0, 48]);
    // the count exchange right after its route; the dispatch (where the host waits for the
    // counts) after the next compute op, so that op is queued while the host waits
    expect(ids(p, "forward")).toEqual([
      "f.qkv.0", "f.attn.0", "f.proj.0", "f.route.0", "f.counts.0", "f.aux_loss", "f.dispatch.0", "f.experts.0", "f.combine.0", "f.unpermute.0",
    ]);
    expect(ids(p, "backward")).toEqual([
      "b.aux_loss", "b.unpermute.0", "b.combine.0", "b.experts.0", "b.dispatch.0", "b.route.0", "b.proj.0", "b.attn.0", "b.qkv.0",
    ]);
    const dep = (id: string) => p.forward.concat(p.backward).find((o) => o.id === id)!.deps;
    expect(dep("f.counts.0")).toEqual(["f.route.0"]);
    expect(dep("f.dispatch.0")).toEqual([]); // route.0 happens before counts.0, on the same comm stream
    expect(dep("f.experts.0")).toEqual(["f.dispatch.0"]);
    expect(dep("b.route.0")).toEqual(["b.dispatch.0"]);
    expect(dep("f.attn.0")).toEqual([]); // same-stream needs are implied by list order
  });

  it("moe-overlap: attention whole, then the MoE layer pipelined over the pieces, in both passes", () => {
    const p = makePlan("moe-overlap", smallDims(), { degree: 3, chunkQkv: true }); // chunkQkv is ignored
    expect(planIssues(p)).toEqual([]);
    expect(p.chunk_qkv).toBe(false);
    expect(p.chunk_attention).toBe(false);
    expect(ids(p, "forward", "compute").slice(0, 9)).toEqual([
      "f.qkv", "f.attn", "f.proj.0", "f.proj.1", "f.proj.2", "f.route.0", "f.route.1", "f.route.2", "f.aux_loss",
    ]);
    expect(ids(p, "forward", "comm")).toEqual([
      "f.counts.0", "f.dispatch.0", "f.counts.1", "f.dispatch.1", "f.combine.0", "f.counts.2", "f.dispatch.2", "f.combine.1", "f.combine.2",
    ]);
    const dep = (id: string) => p.forward.concat(p.backward).find((o) => o.id === id)!.deps;
    expect(dep("f.counts.0")).toEqual(["f.route.2"]); // no exchange before the whole attention side
    expect(dep("b.route.2")).toEqual(["b.dispatch.0"]); // no router/attention backward before the last dispatch_bwd
    expect(ids(p, "backward", "compute").slice(-8)).toEqual(["b.route.2", "b.route.1", "b.route.0", "b.proj.2", "b.proj.1", "b.proj.0", "b.attn", "b.qkv"]);
    // simulated: every all-to-all of the forward starts after the last route ends
    const sim = simulatePlan(p, () => 1);
    const end = (id: string) => sim.forward.ops.find((o) => o.id === id)!.endMs;
    for (const o of sim.forward.ops.filter((o) => o.stream === "comm")) expect(o.startMs).toBeGreaterThanOrEqual(end("f.route.2"));
  });

  it("a shared expert: its own op per chunk on the compute stream, after its experts (before them in backward), overlapping an all-to-all", () => {
    const dims = smallDims({ moe_shared_expert_intermediate_size: 32 });
    for (const variant of ["grouped", "interleaved", "moe-overlap"] as const) {
      const p = makePlan(variant, dims, { degree: 3 });
      expect(planIssues(p)).toEqual([]);
      const fc = ids(p, "forward", "compute");
      const bc = ids(p, "backward", "compute");
      for (let c = 0; c < 3; c++) {
        expect(fc.indexOf(`f.shared.${c}`), variant).toBe(fc.indexOf(`f.experts.${c}`) + 1);
        expect(bc.indexOf(`b.shared.${c}`), variant).toBe(bc.indexOf(`b.experts.${c}`) - 1);
      }
      // simulated with all-to-alls twice as long as the compute ops: in each pass a shared op
      // runs while one is in flight, and the block takes less than the shared work longer
      const cost = (o: { kind: string; stream: string }) => (o.kind === "counts" ? 0.05 : o.stream === "comm" ? 2 : 1);
      const sim = simulatePlan(p, cost);
      for (const pass of ["forward", "backward"] as const) {
        const ops = sim[pass].ops;
        const overlapping = ops.filter((s) => s.kind.startsWith("shared") &&
          ops.some((o) => o.stream === "comm" && o.kind !== "counts" && o.startMs < s.endMs && s.startMs < o.endMs));
        expect(overlapping.length, `${variant} ${pass}`).toBeGreaterThan(0);
      }
      const without = simulatePlan(makePlan(variant, smallDims(), { degree: 3 }), cost);
      expect(sim.totalMs - without.totalMs, variant).toBeLessThan(6); // 3 chunks x (shared + shared_bwd)
    }
    // without a shared expert there is none, and with one the sequential plan has one of each
    expect(ids(makePlan("grouped", smallDims(), { degree: 3 }), "forward").some((id) => id.includes("shared"))).toBe(false);
    expect(ids(sequentialPlan(dims), "forward").filter((id) => id.includes("shared"))).toEqual(["f.shared.0"]);
  });

  it("sequential rejects more than one chunk, naming the field", () => {
    expect(() => makePlan("sequential", smallDims(), { degree: 2 })).toThrow(/boundaries: a sequential plan has one chunk/);
  });

  it("grouped: every chunk's attention before any experts; comm of chunk c+1 before combine of c", () => {
    const p = makePlan("grouped", smallDims(), { degree: 3 });
    const compute = ids(p, "forward", "compute");
    expect(compute.indexOf("f.route.2")).toBeLessThan(compute.indexOf("f.experts.0"));
    expect(ids(p, "forward", "comm")).toEqual([
      "f.counts.0", "f.dispatch.0", "f.counts.1", "f.dispatch.1", "f.combine.0", "f.counts.2", "f.dispatch.2", "f.combine.1", "f.combine.2",
    ]);
    // backward: MoE side chunk by chunk from the last chunk, then the attention side
    const bcompute = ids(p, "backward", "compute");
    expect(bcompute.indexOf("b.experts.0")).toBeLessThan(bcompute.indexOf("b.attn.2"));
    expect(ids(p, "backward", "comm")).toEqual(["b.combine.2", "b.combine.1", "b.dispatch.2", "b.combine.0", "b.dispatch.1", "b.dispatch.0"]);
  });

  it("interleaved: chunk c's dispatch is followed on compute by chunk c+1's attention and chunk c-1's experts", () => {
    const p = makePlan("interleaved", smallDims(), { degree: 4 });
    const compute = ids(p, "forward", "compute");
    for (let c = 1; c < 3; c++) {
      const route = compute.indexOf(opId("route", c));
      // after chunk c's route (and so its dispatch can start) the compute stream runs experts of c-1, then attention of c+1
      expect(compute.indexOf(opId("experts", c - 1))).toBeGreaterThan(route);
      expect(compute.indexOf(opId("attn", c + 1))).toBeGreaterThan(compute.indexOf(opId("experts", c - 1)));
      expect(compute.indexOf(opId("experts", c))).toBeGreaterThan(compute.indexOf(opId("attn", c + 1)));
    }
    // backward runs chunks last to first and qkv_bwd[j] directly follows attn_bwd[j]
    const b = ids(p, "backward", "compute");
    expect(b.filter((id) => id.startsWith("b.attn."))).toEqual(["b.attn.3", "b.attn.2", "b.attn.1", "b.attn.0"]);
    for (let j = 0; j < 4; j++) expect(b.indexOf(`b.qkv.${j}`)).toBe(b.indexOf(`b.attn.${j}`) + 1);
    // pipelined backward: chunk 3's dispatch_bwd is issued before chunk 0's unpermute_bwd finishes the front
    const all = ids(p, "backward");
    expect(all.indexOf("b.dispatch.3")).toBeLessThan(all.indexOf("b.unpermute.1"));
  });

  it("chunk_qkv false uses one whole-sequence qkv and qkv_bwd", () => {
    for (const variant of ["grouped", "interleaved"] as const) {
      const p = makePlan(variant, smallDims(), { degree: 3, chunkQkv: false });
      expect(p.forward[0]).toMatchObject({ id: "f.qkv", kind: "qkv", chunk: null });
      expect(p.backward[p.backward.length - 1]).toMatchObject({ id: "b.qkv", kind: "qkv_bwd", chunk: null });
      expect(planIssues(p)).toEqual([]);
    }
  });

  it("given boundaries are kept; degree must agree with them", () => {
    const p = makePlan("interleaved", smallDims(), { boundaries: [0, 20, 36, 48] });
    expect(p.boundaries).toEqual([0, 20, 36, 48]);
    expect(() => makePlan("grouped", smallDims(), { boundaries: [0, 20, 36, 48], degree: 2 })).toThrow(/degree \(2\) disagrees/);
  });

  it("uniform boundaries spread the remainder", () => {
    expect(makePlan("grouped", smallDims({ seq_length: 10 }), { degree: 3 }).boundaries).toEqual([0, 3, 7, 10]);
  });

  it("rejects bad boundaries and dims with errors that name the field", () => {
    expect(() => makePlan("grouped", smallDims(), { boundaries: [0, 30, 20, 48] })).toThrow(/boundaries\[2\] \(20\) must be greater than boundaries\[1\] \(30\)/);
    expect(() => makePlan("grouped", smallDims(), { boundaries: [1, 48] })).toThrow(/boundaries\[0\] must be 0/);
    expect(() => makePlan("grouped", smallDims(), { boundaries: [0, 24, 40] })).toThrow(/boundaries\[2\] must equal seq_length \(48\)/);
    expect(() => makePlan("grouped", smallDims(), { degree: 49 })).toThrow(/degree \(49\) must be <= seq_length/);
    expect(() => parseDims(smallDims({ num_query_groups: 3 }))).toThrow(/dims\.num_query_groups: num_query_groups \(3\) must divide/);
    expect(() => parseDims(smallDims({ moe_router_topk: 5 }))).toThrow(/dims\.moe_router_topk/);
    expect(() => parseDims(smallDims({ expert_model_parallel_size: 3 }))).toThrow(/dims\.expert_model_parallel_size/);
    expect(() => parseDims({ ...smallDims(), hidden_size: 0 })).toThrow(/dims\.hidden_size/);
    expect(() => parseDims({ ...smallDims(), dtype: "fp8" })).toThrow(/dims\.dtype/);
    expect(() => parseDims({ ...smallDims(), extra: 1 })).toThrow(/extra/);
    expect(() => makePlan("pipelined" as never, smallDims())).toThrow(/variant must be one of/);
  });

  it("every generated plan passes the checker", () => {
    for (const variant of ["grouped", "interleaved"] as const)
      for (const P of [1, 2, 5, 16])
        for (const chunkQkv of [true, false]) validatePlan(makePlan(variant, smallDims(), { degree: P, chunkQkv }));
  });
});
