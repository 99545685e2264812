// Makespans computed by hand for small plans (the arithmetic is in the comments).
import { describe, expect, it } from "vitest";
import { makePlan } from "../../../src/plan/generators.ts";
import type { Op, Plan } from "../../../src/plan/ir.ts";
import { simulatePass, simulatePlan } from "../../../src/plan/simulate.ts";
import { chromeTrace, textTimeline } from "../../../src/plan/trace.ts";
import { smallDims } from "./helpers.ts";

// Per-kind costs (ms); every chunk alike. The attention side of a chunk (qkv+attn+proj+route) is 4;
// the count exchange costs nothing here (its latency is a separate figure in the cost model).
const unit: Record<string, number> = {
  qkv: 1, attn: 1, proj: 1, route: 1, counts: 0, dispatch: 2, experts: 3, combine: 2, unpermute: 1, aux_loss: 0,
  aux_loss_bwd: 0, unpermute_bwd: 1, combine_bwd: 2, experts_bwd: 3, dispatch_bwd: 2, route_bwd: 1, proj_bwd: 1, attn_bwd: 1, qkv_bwd: 1,
};
const byKind = (op: Op) => unit[op.kind];
const times = (r: ReturnType<typeof simulatePass>) => Object.fromEntries(r.ops.map((o) => [o.id, [o.startMs, o.endMs]]));

describe("simulator: hand-computed makespans", () => {
  it("sequential forward: 4 (attention side) + 2 + 3 + 2 + 1 = 12; aux_loss overlaps the dispatch", () => {
    const p = makePlan("sequential", smallDims());
    const r = simulatePass(p, "forward", byKind);
    expect(r.makespanMs).toBe(12);
    expect(times(r)["f.dispatch.0"]).toEqual([4, 6]);
    expect(times(r)["f.experts.0"]).toEqual([6, 9]);
    expect(times(r)["f.unpermute.0"]).toEqual([11, 12]);
    expect(r.streams).toEqual([
      { name: "compute", kind: "compute", busyMs: 8, idleMs: 4 },
      { name: "comm", kind: "comm", busyMs: 4, idleMs: 8 },
    ]);
    expect(r.criticalPath).toEqual(["f.qkv.0", "f.attn.0", "f.proj.0", "f.route.0", "f.counts.0", "f.dispatch.0", "f.experts.0", "f.combine.0", "f.unpermute.0"]);
  });

  it("overlap slowdown: aux_loss (1 ms) and dispatch (2 ms) share time at half speed", () => {
    const p = makePlan("sequential", smallDims());
    const costs = (op: Op) => (op.kind === "aux_loss" ? 1 : unit[op.kind]);
    // from t=4 both run at rate 1/2: aux_loss ends at 6 (dispatch has done 1 of 2), dispatch alone ends at 7;
    // then experts 7-10, combine 10-12, unpermute 12-13.
    const r = simulatePass(p, "forward", costs, { overlapSlowdown: 2 });
    expect(times(r)["f.aux_loss"]).toEqual([4, 6]);
    expect(times(r)["f.dispatch.0"]).toEqual([4, 7]);
    expect(r.makespanMs).toBe(13);
    // separate factors: comm slowed by 2, compute not: aux 4-5, dispatch does 0.5 by 5, then 1.5 alone -> 6.5
    const s = simulatePass(p, "forward", costs, { overlapSlowdown: { compute: 1, comm: 2 } });
    expect(times(s)["f.aux_loss"]).toEqual([4, 5]);
    expect(times(s)["f.dispatch.0"]).toEqual([4, 6.5]);
  });

  it("grouped P=3 forward: 25", () => {
    // compute: F0 0-4, F1 4-8, F2 8-12, aux 12, E0 12-15, E1 15-18, U0 18-19, E2 19-22, U1 22-23, U2 24-25
    // comm:    D0 4-6, D1 8-10, C0 15-17, D2 17-19, C1 19-21, C2 22-24
    const r = simulatePass(makePlan("grouped", smallDims(), { degree: 3 }), "forward", byKind);
    const t = times(r);
    expect(t["f.experts.0"]).toEqual([12, 15]);
    expect(t["f.combine.0"]).toEqual([15, 17]);
    expect(t["f.dispatch.2"]).toEqual([17, 19]);
    expect(t["f.experts.2"]).toEqual([19, 22]);
    expect(t["f.unpermute.2"]).toEqual([24, 25]);
    expect(r.makespanMs).toBe(25);
  });

  it("interleaved P=3 forward: 25, with chunk 0's experts before chunk 2's attention", () => {
    // compute: F0 0-4, F1 4-8, E0 8-11, F2 11-15, aux 15, E1 15-18, U0 18-19, E2 19-22, U1 22-23, U2 24-25
    // comm:    D0 4-6, D1 8-10, C0 11-13, D2 15-17, C1 18-20, C2 22-24
    const r = simulatePass(makePlan("interleaved", smallDims(), { degree: 3 }), "forward", byKind);
    const t = times(r);
    expect(t["f.experts.0"]).toEqual([8, 11]);
    expect(t["f.combine.0"]).toEqual([11, 13]);
    expect(t["f.attn.2"]).toEqual([12, 13]);
    expect(t["f.dispatch.2"]).toEqual([15, 17]);
    expect(t["f.combine.1"]).toEqual([18, 20]);
    expect(r.makespanMs).toBe(25);
    expect(r.streams.map((s) => s.busyMs)).toEqual([4 * 3 + 3 * 3 + 3, 2 * 6]);
  });

  it("interleaved P=2 backward runs the last chunk first: 17", () => {
    // compute: aux 0, U'1 0-1, U'0 1-2, E'1 3-6, E'0 6-9, B'1 (route,proj,attn,qkv) 9-13, B'0 13-17
    // comm:    C'1 1-3, C'0 3-5, D'1 6-8, D'0 9-11
    const r = simulatePass(makePlan("interleaved", smallDims(), { degree: 2 }), "backward", byKind);
    const t = times(r);
    expect(t["b.unpermute.1"]).toEqual([0, 1]);
    expect(t["b.combine.1"]).toEqual([1, 3]);
    expect(t["b.combine.0"]).toEqual([3, 5]);
    expect(t["b.experts.1"]).toEqual([3, 6]);
    expect(t["b.dispatch.1"]).toEqual([6, 8]);
    expect(t["b.route.1"]).toEqual([9, 10]);
    expect(t["b.qkv.1"]).toEqual([12, 13]);
    expect(t["b.dispatch.0"]).toEqual([9, 11]);
    expect(t["b.qkv.0"]).toEqual([16, 17]);
    expect(r.makespanMs).toBe(17);
  });

  it("two compute streams share the device (processor sharing)", () => {
    const p: Plan = JSON.parse(JSON.stringify(makePlan("grouped", smallDims(), { degree: 2 })));
    p.streams.push({ name: "compute2", kind: "compute" });
    const u0 = p.forward.find((o) => o.id === "f.unpermute.0")!;
    Object.assign(u0, { stream: "compute2", deps: ["f.combine.0"] });
    // sequence: F0 0-4, F1 4-8, E0 8-11, C0 11-13, E1 11-14 alone until 13, then U0 (1 ms) shares with E1:
    // each at half rate; E1 has 1 ms left -> both end at 15.
    const r = simulatePass(p, "forward", byKind);
    const t = times(r);
    expect(t["f.unpermute.0"]).toEqual([13, 15]);
    expect(t["f.experts.1"]).toEqual([11, 15]);
  });

  it("simulatePlan adds the passes; costs can be a map; missing or negative costs are errors naming the op", () => {
    const p = makePlan("sequential", smallDims());
    const all = new Map([...p.forward, ...p.backward].map((o) => [o.id, unit[o.kind]]));
    const r = simulatePlan(p, all);
    expect(r.totalMs).toBe(r.forward.makespanMs + r.backward.makespanMs);
    all.delete("b.attn.0");
    expect(() => simulatePlan(p, all)).toThrow(/no cost for op b\.attn\.0/);
    expect(() => simulatePlan(p, (op) => (op.id === "f.proj.0" ? -1 : 1))).toThrow(/cost of op f\.proj\.0 must be a finite number >= 0/);
    expect(() => simulatePlan(p, byKind, { overlapSlowdown: 0.5 })).toThrow(/overlapSlowdown\.compute must be a number >= 1/);
  });
});

describe("trace views", () => {
  const p = makePlan("interleaved", smallDims(), { degree: 3 });
  const sim = simulatePlan(p, byKind);

  it("Chrome trace: one complete event per op, backward after forward, named tracks, flows for cross-stream deps", () => {
    const t = JSON.parse(JSON.stringify(chromeTrace(p, sim)));
    const slices = t.traceEvents.filter((e: { ph: string; cat: string }) => e.ph === "X" && e.cat !== "pass");
    expect(slices.length).toBe(p.forward.length + p.backward.length);
    const fwdEnd = Math.max(...slices.filter((e: { cat: string }) => e.cat === "forward").map((e: { ts: number; dur: number }) => e.ts + e.dur));
    const bwdStart = Math.min(...slices.filter((e: { cat: string }) => e.cat === "backward").map((e: { ts: number }) => e.ts));
    expect(fwdEnd).toBeCloseTo(sim.forward.makespanMs * 1000, 6);
    expect(bwdStart).toBeCloseTo(fwdEnd, 6);
    const names = t.traceEvents.filter((e: { name: string }) => e.name === "thread_name").map((e: { args: { name: string } }) => e.args.name);
    expect(names).toEqual(["pass", "compute (compute)", "comm (comm)"]);
    const crossDeps = [...p.forward, ...p.backward].reduce((n, o, _, all) => n + o.deps.filter((d) => all.find((x) => x.id === d)!.stream !== o.stream).length, 0);
    expect(t.traceEvents.filter((e: { ph: string }) => e.ph === "s").length).toBe(crossDeps);
  });

  it("text timeline draws each stream over the makespan", () => {
    const lines = textTimeline(p, sim.forward, 25);
    expect(lines).toEqual([
      "compute |qaprQAPReeeqaprEEEueeeU.u|", // the hand-computed schedule of "interleaved P=3 forward"
      "comm    |....dd..DD.cc..dd.CC..cc.|",
    ]);
  });
});
