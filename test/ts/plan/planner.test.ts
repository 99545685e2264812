import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { opTimeMs, predict, profileModel } from "../../../src/plan/costs.ts";
import { makePlan } from "../../../src/plan/generators.ts";
import { validatePlan } from "../../../src/plan/check.ts";
import { balancedBoundaries, defaultGranularity, planBlock, snappedUniform } from "../../../src/plan/planner.ts";
import { smallDims } from "./helpers.ts";

// A long-sequence block whose attention dominates late chunks (H100 profile, 100 GB/s link).
const longDims = smallDims({
  seq_length: 8192, micro_batch_size: 1, hidden_size: 1024, num_attention_heads: 16, num_query_groups: 4, kv_channels: 64,
  num_experts: 8, moe_router_topk: 2, moe_ffn_hidden_size: 1024, expert_model_parallel_size: 8, dtype: "bf16",
});

describe("planner", () => {
  it("finds a pipelined plan faster than sequential for a comm-heavy long-sequence block, with later chunks shorter", () => {
    const model = profileModel("h100", "bf16", { bandwidthGbps: 100 });
    const r = planBlock(longDims, model, { maxDegree: 8 });
    expect(r.best.variant).not.toBe("sequential");
    expect(r.speedup).toBeGreaterThan(1.05);
    const b = r.best.boundaries;
    for (const x of b.slice(1, -1)) expect(x % 64).toBe(0);
    const sizes = b.slice(1).map((x, i) => x - b[i]);
    expect(sizes[sizes.length - 1]).toBeLessThan(sizes[0]);
    // the returned plan is valid, carries its prediction, and the prediction re-simulates
    validatePlan(r.plan);
    expect(predict(model, r.plan).totalMs).toBeCloseTo(r.best.totalMs, 9);
    expect(r.plan.meta?.predicted).toMatchObject({ total_ms: r.best.totalMs, sequential_total_ms: r.sequential.totalMs });
    // refinement never returns something worse than the uniform start of the same (variant, P)
    const P = b.length - 1;
    const uniform = makePlan(r.best.variant, longDims, { boundaries: snappedUniform(8192, P, 64)! });
    expect(r.best.totalMs).toBeLessThanOrEqual(predict(model, uniform).totalMs);
  });

  it("plans a shared expert's ops, costs them, and hides part of them", () => {
    const model = profileModel("h100", "bf16", { bandwidthGbps: 100 });
    const shared = { ...longDims, moe_shared_expert_intermediate_size: 2048 };
    const r = planBlock(shared, model, { maxDegree: 8 });
    validatePlan(r.plan);
    const P = r.best.boundaries.length - 1;
    expect(r.plan.forward.filter((o) => o.kind === "shared").length).toBe(P);
    expect(r.plan.backward.filter((o) => o.kind === "shared_bwd").length).toBe(P);
    // its cost is its FFN's FLOPs, and the chosen plan hides part of it behind the all-to-alls:
    // it is slower than without a shared expert by less than the shared ops' own time
    const plain = planBlock(longDims, model, { maxDegree: 8 });
    const sharedMs = [...r.plan.forward, ...r.plan.backward].filter((o) => o.kind.startsWith("shared"))
      .reduce((t, o) => t + opTimeMs(model, r.plan.dims, r.plan.boundaries, o.kind, o.chunk), 0);
    expect(sharedMs).toBeGreaterThan(0);
    expect(r.best.totalMs - plain.best.totalMs).toBeLessThan(sharedMs);
  });

  it("balanced boundaries shrink later chunks when attention is quadratic", () => {
    const b = balancedBoundaries(profileModel("h100", "bf16"), longDims, 4, 64)!;
    expect(b[0]).toBe(0);
    expect(b[4]).toBe(8192);
    const sizes = b.slice(1).map((x, i) => x - b[i]);
    for (let i = 1; i < sizes.length; i++) expect(sizes[i]).toBeLessThanOrEqual(sizes[i - 1]);
  });

  it("fixed degree and variant constrain the search; sequential is one chunk", () => {
    const model = profileModel("cpu", "fp32");
    expect(planBlock(smallDims(), model, { degrees: [3], variants: ["interleaved"] }).best).toMatchObject({ variant: "interleaved" });
    expect(planBlock(smallDims(), model, { degrees: [3], variants: ["interleaved"] }).best.boundaries.length).toBe(4);
    expect(planBlock(smallDims(), model, { variants: ["sequential"] }).best.boundaries).toEqual([0, 48]);
    const fixed = planBlock(smallDims(), model, { boundaries: [0, 20, 36, 48], variants: ["grouped"] });
    expect(fixed.best.boundaries).toEqual([0, 20, 36, 48]);
  });

  it("granularity: default rule, divisibility, and errors naming the option", () => {
    expect(defaultGranularity(4096, "h100")).toBe(64);
    expect(defaultGranularity(96, "h100")).toBe(32);
    expect(defaultGranularity(4096, "cpu")).toBe(8);
    const r = planBlock(smallDims(), profileModel("cpu", "fp32"), { granularity: 16 });
    for (const x of r.best.boundaries.slice(1, -1)) expect(x % 16).toBe(0);
    expect(() => planBlock(smallDims(), profileModel("cpu", "fp32"), { degrees: [8], granularity: 16 })).toThrow(/degree: none of 8 fits seq_length 48 with granularity 16/);
    // a fixed degree lowers the default granularity until it fits (48 / 8 = 6 rows per chunk: granularity 4)
    const fine = planBlock(smallDims(), profileModel("cpu", "fp32"), { degrees: [8] });
    expect(fine.granularity).toBe(4);
    expect(fine.best.boundaries.length).toBe(9);
    expect(() => planBlock(smallDims(), profileModel("cpu", "fp32"), { granularity: 0 })).toThrow(/granularity must be a positive integer/);
    expect(() => planBlock(smallDims({ num_query_groups: 3 }), profileModel("cpu", "fp32"))).toThrow(/dims\.num_query_groups/);
  });

  it("never returns a plan slower than sequential under the model (property)", () => {
    const dimsArb = fc.record({
      seq_length: fc.integer({ min: 16, max: 512 }),
      micro_batch_size: fc.integer({ min: 1, max: 4 }),
      heads: fc.constantFrom(1, 2, 4, 8),
      groupsDiv: fc.constantFrom(1, 2, 4),
      kv_channels: fc.constantFrom(8, 16, 64),
      experts: fc.constantFrom(2, 4, 8),
      topk: fc.integer({ min: 1, max: 2 }),
      ffn: fc.constantFrom(32, 128, 512),
      ep: fc.constantFrom(1, 2),
      dtype: fc.constantFrom("fp32" as const, "bf16" as const),
      profile: fc.constantFrom("cpu", "h100", "h200"),
      bw: fc.double({ min: 0.1, max: 500, noNaN: true }),
      slowdown: fc.double({ min: 1, max: 2, noNaN: true }),
      chunkQkv: fc.boolean(),
    });
    fc.assert(
      fc.property(dimsArb, (x) => {
        const groups = Math.max(1, Math.floor(x.heads / x.groupsDiv));
        const dims = smallDims({
          seq_length: x.seq_length, micro_batch_size: x.micro_batch_size, hidden_size: x.heads * x.kv_channels,
          num_attention_heads: x.heads, num_query_groups: x.heads % groups === 0 ? groups : x.heads, kv_channels: x.kv_channels,
          num_experts: x.experts, moe_router_topk: x.topk, moe_ffn_hidden_size: x.ffn, expert_model_parallel_size: x.ep, dtype: x.dtype,
        });
        const model = profileModel(x.profile, x.dtype, { bandwidthGbps: x.bw, overlapSlowdown: x.slowdown });
        const r = planBlock(dims, model, { maxDegree: 6, chunkQkv: x.chunkQkv });
        const seq = predict(model, makePlan("sequential", dims, { chunkQkv: x.chunkQkv })).totalMs;
        expect(r.best.totalMs).toBeLessThanOrEqual(seq * (1 + 1e-12));
        expect(r.sequential.totalMs).toBeCloseTo(seq, 9);
      }),
      { numRuns: 25, seed: 20261129 },
    );
  });
});
