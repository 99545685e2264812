// The measured choice of the training block (src/train/tune.ts): which arms are timed, and the
// decision from the ranks' step times.
import { describe, expect, it } from "vitest";
import { profileModel } from "../../../src/plan/costs.ts";
import { planBlock } from "../../../src/plan/planner.ts";
import { armName, decide, describeDecision, tuneArms, type TuneArm } from "../../../src/train/tune.ts";

const arms: TuneArm[] = [{ name: "baseline", plan: null }, { name: "grouped P=2", plan: null }, { name: "interleaved P=3", plan: null }];

describe("tune decision", () => {
  it("chooses the fastest plan when it beats the baseline by more than the noise", () => {
    const base = [100, 101, 99, 100, 102, 98];
    const d = decide(arms, [{ baseline: base, "grouped P=2": base.map((x) => x / 1.2), "interleaved P=3": base.map((x) => x / 1.1) }], 1);
    expect(d.chosen).toBe("grouped P=2");
    expect(d.arms.find((a) => a.name === "grouped P=2")!.speedup).toBeCloseTo(1.2, 10);
    expect(d.rounds).toBe(6);
    expect(describeDecision(d)).toMatch(/chose grouped P=2: grouped P=2 is 1\.200x the baseline/);
  });

  it("keeps the baseline when no plan is faster by more than the measured noise", () => {
    // the baseline's own spread: quartiles 95 and 105 around a median of 100, so the noise is ±5%
    const base = [90, 95, 100, 105, 110];
    const d = decide(arms, [{ baseline: base, "grouped P=2": base.map((x) => x / 1.04), "interleaved P=3": base.map((x) => x * 1.3) }], 1);
    expect(d.noise).toBeCloseTo(0.05, 10);
    expect(d.chosen).toBe("baseline");
    expect(d.reason).toMatch(/no plan beats the baseline by more than the noise \(best grouped P=2: 1\.040x, noise ±5\.0%\)/);
    // and a noise floor of 1% when the baseline's steps all took the same time
    const flat = decide(arms, [{ baseline: [100, 100, 100], "grouped P=2": [99.5, 99.5, 99.5], "interleaved P=3": [200, 200, 200] }], 1);
    expect(flat.noise).toBe(0.01);
    expect(flat.chosen).toBe("baseline");
  });

  it("pairs each round's arms and takes the slowest rank of each round", () => {
    // rank 1 is slow in round 0 for every arm: the ranks wait for each other, so that round's step is rank 1's
    const r0 = { baseline: [100, 100, 100], "grouped P=2": [80, 80, 80], "interleaved P=3": [90, 90, 90] };
    const r1 = { baseline: [104, 100, 100], "grouped P=2": [83.2, 80, 80], "interleaved P=3": [93.6, 90, 90] };
    const d = decide(arms, [r0, r1], 0);
    expect(d.arms[0].stepMs).toEqual([104, 100, 100]);
    expect(d.arms[1].speedup).toBeCloseTo(1.25, 10);
    expect(d.chosen).toBe("grouped P=2");
  });

  it("uses only the rounds every rank and arm finished (a cancelled tuning)", () => {
    const d = decide(arms, [{ baseline: [100, 100, 100], "grouped P=2": [50, 50], "interleaved P=3": [100, 100, 100] }], 1);
    expect(d.rounds).toBe(2);
    expect(() => decide(arms, [{ baseline: [], "grouped P=2": [], "interleaved P=3": [] }], 1)).toThrow(/no measured round/);
  });

  it("times the baseline and the planner's best candidates, one-chunk plans excluded", () => {
    const dims = { seq_length: 256, micro_batch_size: 2, hidden_size: 128, num_attention_heads: 4, num_query_groups: 4, kv_channels: 32, num_experts: 4, moe_router_topk: 2, moe_ffn_hidden_size: 256, expert_model_parallel_size: 2, dtype: "fp32" as const };
    const choice = planBlock(dims, profileModel("cpu", "fp32"));
    const got = tuneArms(choice, 3, true, "chunk");
    expect(got[0]).toMatchObject({ name: "baseline", plan: null });
    expect(got.length).toBe(4);
    for (const a of got.slice(1)) {
      expect(a.plan!.boundaries.length).toBeGreaterThan(2);
      expect(a.name).toBe(armName(a.plan));
    }
    const expected = choice.candidates.filter((c) => c.boundaries.length > 2).slice(0, 3);
    expect(got.slice(1).map((a) => a.plan!.boundaries)).toEqual(expected.map((c) => c.boundaries));
  });
});
