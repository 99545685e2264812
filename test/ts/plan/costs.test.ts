import { describe, expect, it } from "vitest";
import { causalPairs, opTimeMs, opWork, PROFILES, predict, profileModel } from "../../../src/plan/costs.ts";
import { makePlan } from "../../../src/plan/generators.ts";
import { OP_KINDS } from "../../../src/plan/ir.ts";
import { smallDims } from "./helpers.ts";

describe("cost model", () => {
  it("causal attention of a chunk depends on its key prefix; chunks add up to the whole sequence", () => {
    // rows [lo, hi) see i+1 keys each
    expect(causalPairs(0, 4)).toBe(1 + 2 + 3 + 4);
    expect(causalPairs(4, 8)).toBe(5 + 6 + 7 + 8);
    const b = [0, 5, 17, 30, 48];
    let sum = 0;
    for (let c = 0; c < 4; c++) sum += opWork(smallDims(), b, "attn", c);
    expect(sum).toBeCloseTo(opWork(smallDims(), [0, 48], "attn", 0), 6);
    // uniform chunks: chunk c costs about (2c+1) times chunk 0 (exactly q^2 (2c+1)/2 + q/2 pairs)
    const u = [0, 16, 32, 48];
    const w = [0, 1, 2].map((c) => opWork(smallDims(), u, "attn", c));
    expect(w[1] / w[0]).toBeCloseTo((16 * 16 * 1.5 + 8) / (16 * 16 * 0.5 + 8), 9);
    expect(w[2]).toBeGreaterThan(w[1]);
  });

  it("per-token ops are flat in the chunk's position", () => {
    const u = [0, 16, 32, 48];
    for (const kind of ["qkv", "proj", "route", "experts", "unpermute", "dispatch", "experts_bwd"] as const)
      expect(opWork(smallDims({ expert_model_parallel_size: 2 }), u, kind, 2)).toBe(opWork(smallDims({ expert_model_parallel_size: 2 }), u, kind, 0));
  });

  it("FLOPs and bytes follow the dims", () => {
    const d = smallDims(); // T = 16 rows * 2 = 32 tokens per chunk
    const u = [0, 16, 32, 48];
    expect(opWork(d, u, "experts", 0)).toBe(2 * 32 * 2 * 32 * 64 * 3); // swiglu: three matrices
    expect(opWork(d, u, "experts", 0, { expertActivation: "gelu" })).toBe(2 * 32 * 2 * 32 * 64 * 2);
    expect(opWork(d, u, "experts_bwd", 0)).toBe(2 * opWork(d, u, "experts", 0));
    // GQA shrinks the K/V projections: (heads + 2 groups) * kv_channels output columns
    expect(opWork(smallDims({ num_query_groups: 2 }), u, "qkv", 0)).toBeLessThan(opWork(d, u, "qkv", 0));
    // all-to-all: tokens * k * hidden * dtype bytes * (ep-1)/ep; nothing leaves the rank at ep = 1
    expect(opWork(d, u, "dispatch", 0)).toBe(0);
    expect(opWork(smallDims({ expert_model_parallel_size: 2 }), u, "dispatch", 1)).toBe((32 * 2 * 32 * 4) / 2);
    expect(opWork(smallDims({ expert_model_parallel_size: 2, dtype: "bf16" }), u, "combine_bwd", 1)).toBe((32 * 2 * 32 * 2) / 2);
    expect(opWork(d, u, "dispatch", 0, { commWorldSize: 4 })).toBe((32 * 2 * 32 * 4 * 3) / 4);
    expect(opWork(d, [0, 48], "qkv", null)).toBe(opWork(d, [0, 48], "qkv", 0));
  });

  it("profiles give positive coefficients; comm time is latency + bytes / bandwidth", () => {
    for (const name of Object.keys(PROFILES))
      for (const dtype of ["fp32", "bf16", "fp16"] as const) {
        const m = profileModel(name, dtype);
        for (const k of OP_KINDS) {
          expect(m.coefficients[k].a).toBeGreaterThan(0);
          expect(m.coefficients[k].b).toBeGreaterThanOrEqual(0);
        }
      }
    const m = profileModel("h100", "bf16", { bandwidthGbps: 400, latencyUs: 20 });
    const d = smallDims({ expert_model_parallel_size: 2, dtype: "bf16" });
    const bytes = opWork(d, [0, 48], "dispatch", 0);
    expect(opTimeMs(m, d, [0, 48], "dispatch", 0)).toBeCloseTo(0.02 + (bytes / 400e9) * 1e3, 12); // GB/s, as emulated_comm
    expect(() => profileModel("tpu", "bf16")).toThrow(/profile: unknown device profile "tpu"/);
    expect(() => profileModel("cpu", "fp32", { bandwidthGbps: 0 })).toThrow(/bandwidth_gbps must be > 0/);
  });

  it("a slower interconnect makes the sequential block slower and pipelining more useful", () => {
    const d = smallDims({ seq_length: 2048, hidden_size: 1024, num_attention_heads: 8, kv_channels: 128, moe_ffn_hidden_size: 2048, expert_model_parallel_size: 4, dtype: "bf16" });
    const fast = profileModel("h100", "bf16", { bandwidthGbps: 400 });
    const slow = profileModel("h100", "bf16", { bandwidthGbps: 12.5 });
    const seq = makePlan("sequential", d);
    const pipe = makePlan("interleaved", d, { degree: 4 });
    expect(predict(slow, seq).totalMs).toBeGreaterThan(predict(fast, seq).totalMs);
    const gain = (m: typeof fast) => predict(m, seq).totalMs - predict(m, pipe).totalMs;
    expect(gain(slow)).toBeGreaterThan(gain(fast));
  });
});
