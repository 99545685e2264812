// Invariants of generated plans and of the simulator over random dims, degrees, boundaries and variants.
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { expectedOps, happensBefore, needsOf, planIssues } from "../../../src/plan/check.ts";
import { makePlan } from "../../../src/plan/generators.ts";
import { VARIANTS, hasSharedExpert, type Plan } from "../../../src/plan/ir.ts";
import { simulatePlan } from "../../../src/plan/simulate.ts";
import { smallDims } from "./helpers.ts";

const planArb = fc
  .record({
    seq: fc.integer({ min: 1, max: 200 }),
    variant: fc.constantFrom(...VARIANTS),
    degree: fc.integer({ min: 1, max: 12 }),
    uniform: fc.boolean(),
    cuts: fc.array(fc.double({ min: 0, max: 1, noNaN: true }), { minLength: 0, maxLength: 11 }),
    chunkQkv: fc.boolean(),
    gqa: fc.boolean(),
    ep: fc.constantFrom(1, 2, 4),
    shared: fc.boolean(),
  })
  .map((x): Plan => {
    const dims = smallDims({ seq_length: x.seq, num_query_groups: x.gqa ? 2 : 4, expert_model_parallel_size: x.ep,
      moe_shared_expert_intermediate_size: x.shared ? 16 : null });
    const chunkQkv = x.variant === "moe-overlap" ? undefined : x.chunkQkv; // moe-overlap: always whole-sequence qkv
    if (x.variant === "sequential") return makePlan("sequential", dims, { chunkQkv });
    if (x.uniform) return makePlan(x.variant, dims, { degree: Math.min(x.degree, x.seq), chunkQkv });
    const inner = [...new Set(x.cuts.map((c) => Math.floor(c * x.seq)).filter((c) => c > 0 && c < x.seq))].sort((a, b) => a - b);
    return makePlan(x.variant, dims, { boundaries: [0, ...inner, x.seq], chunkQkv });
  });

const indexOf = (ops: Plan["forward"]) => new Map(ops.map((o, i) => [o.id, i] as const));

describe("generated plans (property-based)", () => {
  it("every op appears exactly once, deps are earlier (so acyclic), every data dependency is covered", () => {
    fc.assert(
      fc.property(planArb, (p) => {
        expect(planIssues(p)).toEqual([]);
        const P = p.boundaries.length - 1;
        for (const list of ["forward", "backward"] as const) {
          const ops = p[list];
          const keys = ops.map((o) => `${o.kind}@${o.chunk}`);
          expect(new Set(keys).size).toBe(keys.length);
          expect(new Set(keys)).toEqual(new Set(expectedOps(list, P, p.chunk_qkv, p.chunk_attention ?? true, hasSharedExpert(p.dims)).map((e) => `${e.kind}@${e.chunk}`)));
          const idx = indexOf(ops);
          ops.forEach((o, i) => o.deps.forEach((d) => expect(idx.get(d)!).toBeLessThan(i)));
          // independent re-check of coverage, by reachability over deps + stream order
          const anc = happensBefore(ops, ops.map((o) => o.deps.map((d) => idx.get(d)!)));
          ops.forEach((o, i) => {
            for (const n of needsOf(o.kind, o.chunk, P, p.chunk_qkv, p.chunk_attention ?? true, p.capacity_scope, hasSharedExpert(p.dims))) {
              const j = ops.findIndex((x) => x.kind === n.kind && x.chunk === n.chunk);
              expect((anc[i] >> BigInt(j)) & 1n, `${o.id} needs ${ops[j].id}`).toBe(1n);
            }
          });
        }
      }),
      { numRuns: 150, seed: 7 },
    );
  });

  it("deps are minimal: dropping any one of them makes the plan invalid", () => {
    fc.assert(
      fc.property(planArb, fc.nat(), (p, pick) => {
        const all = [...p.forward, ...p.backward].flatMap((o) => o.deps.map((d) => [o.id, d] as const));
        fc.pre(all.length > 0);
        const [id, dep] = all[pick % all.length];
        const q: Plan = JSON.parse(JSON.stringify(p));
        const op = [...q.forward, ...q.backward].find((o) => o.id === id)!;
        op.deps = op.deps.filter((d) => d !== dep);
        const issues = planIssues(q);
        expect(issues.length).toBeGreaterThan(0);
        expect(issues.some((i) => i.id === id)).toBe(true);
      }),
      { numRuns: 150, seed: 11 },
    );
  });

  it("simulation: deps respected, one op at a time per stream, makespan = critical path, bounds hold", () => {
    const costArb = fc.dictionary(fc.constantFrom("qkv", "attn", "proj", "route", "dispatch", "experts", "combine", "unpermute", "aux_loss"), fc.double({ min: 0, max: 10, noNaN: true }));
    fc.assert(
      fc.property(planArb, costArb, fc.constantFrom(1, 1.5), (p, base, slow) => {
        const cost = (o: { kind: string; chunk: number | null }) => (base[o.kind.replace(/_bwd$/, "")] ?? 1) * (1 + (o.chunk ?? 0) * 0.1);
        const sim = simulatePlan(p, (o) => cost(o), { overlapSlowdown: slow });
        for (const pass of ["forward", "backward"] as const) {
          const r = sim[pass];
          const end = new Map(r.ops.map((o) => [o.id, o.endMs] as const));
          const eps = 1e-9 * Math.max(1, r.makespanMs);
          r.ops.forEach((o, i) => {
            for (const d of p[pass][i].deps) expect(o.startMs).toBeGreaterThanOrEqual(end.get(d)! - eps);
            // an op never runs faster than its solo cost, and no slower than slowdown x its cost
            expect(o.endMs - o.startMs).toBeGreaterThanOrEqual(o.costMs - eps);
            if (p.streams.filter((s) => s.kind === "compute").length === 1) expect(o.endMs - o.startMs).toBeLessThanOrEqual(o.costMs * slow + eps);
          });
          for (const s of p.streams) {
            const mine = r.ops.filter((o) => o.stream === s.name);
            mine.forEach((o, k) => k > 0 && expect(o.startMs).toBeGreaterThanOrEqual(mine[k - 1].endMs - eps));
          }
          const solo = (kind: "compute" | "comm") =>
            r.ops.filter((o) => p.streams.find((s) => s.name === o.stream)!.kind === kind).reduce((s, o) => s + o.costMs, 0);
          expect(r.makespanMs).toBeGreaterThanOrEqual(Math.max(solo("compute"), solo("comm")) - eps);
          if (slow === 1) expect(r.makespanMs).toBeLessThanOrEqual(solo("compute") + solo("comm") + eps);
          // the critical path is a gap-free chain ending at the makespan
          const path = r.criticalPath.map((id) => r.ops.find((o) => o.id === id)!);
          expect(path[0].startMs).toBe(0);
          expect(path[path.length - 1].endMs).toBeCloseTo(r.makespanMs, 9);
          path.forEach((o, k) => k > 0 && expect(o.startMs).toBeCloseTo(path[k - 1].endMs, 9));
        }
      }),
      { numRuns: 100, seed: 3 },
    );
  });
});
