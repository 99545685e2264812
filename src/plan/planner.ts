// The planner: searches pipe degree, variant and chunk boundaries for the smallest simulated
// forward+backward time under a cost model. Interior boundaries are multiples of `granularity`
// (docs/plan.md "Boundaries"). The sequential plan is always a candidate when P = 1 is allowed,
// so the result is never slower than sequential under the model.
import { opTimeMs, predict, type CostModel } from "./costs.ts";
import { makePlan } from "./generators.ts";
import { VARIANTS, parseDims, type BlockDims, type CapacityScope, type Plan, type Variant } from "./ir.ts";
import type { SimResult } from "./simulate.ts";

export interface PlannerOptions {
  /** Variants to consider; default grouped and interleaved (plus sequential for P = 1). moe-overlap only when asked. */
  variants?: Variant[];
  /** Degrees to consider; default 1..maxDegree. */
  degrees?: number[];
  /** Largest degree searched when `degrees` is not given (default 16). */
  maxDegree?: number;
  /** Interior boundaries are multiples of this (default: defaultGranularity). */
  granularity?: number;
  /** Fixed boundaries: only the variant is searched. */
  boundaries?: number[];
  /** QKV per chunk (default true). */
  chunkQkv?: boolean;
  /** Where a capacity is sized (default chunk). */
  capacityScope?: CapacityScope;
  /** Search non-uniform boundaries (default true). */
  searchBoundaries?: boolean;
}

export interface Candidate {
  variant: Variant;
  boundaries: number[];
  forwardMs: number;
  backwardMs: number;
  totalMs: number;
}

export interface PlanChoice {
  plan: Plan;
  sim: SimResult;
  best: Candidate;
  /** The one-chunk sequential plan under the same model. */
  sequential: Candidate;
  speedup: number;
  /** Best candidate per (variant, degree), sorted by total time. */
  candidates: Candidate[];
  granularity: number;
  evaluated: number;
}

/**
 * Default granularity: 64 tokens on GPU profiles (tensor-core friendly tiles), 8 on CPU, halved
 * while the sequence holds fewer than two granules.
 */
export function defaultGranularity(seqLength: number, profile: string): number {
  let g = profile === "cpu" ? 8 : 64;
  while (g > 1 && seqLength < 2 * g) g /= 2;
  return g;
}

/** Largest P for which every chunk can hold at least one granule. */
export const maxDegreeFor = (seqLength: number, g: number) => Math.max(1, Math.ceil(seqLength / g));

/** Uniform boundaries with interior points snapped to multiples of g; null if P chunks do not fit. */
export function snappedUniform(S: number, P: number, g: number): number[] | null {
  const b = [0];
  for (let c = 1; c < P; c++) b.push(Math.round((c * S) / P / g) * g);
  b.push(S);
  return strictlyIncreasing(b) ? b : null;
}

const strictlyIncreasing = (b: number[]) => b.every((x, i) => i === 0 || x > b[i - 1]);

/**
 * Boundaries that equalise the chunks' compute time under the model: the cumulative compute cost
 * of rows [0, x) is alpha*x + beta*x(x+1)/2 (flat per-token ops plus causal attention, whose
 * cost for a row grows with its position), so boundary c solves C(x) = c/P * C(S).
 */
export function balancedBoundaries(model: CostModel, dims: BlockDims, P: number, g: number): number[] | null {
  const S = dims.seq_length;
  const whole = [0, S];
  let flat = 0;
  let attn = 0;
  for (const kind of ["qkv", "proj", "route", "experts", "unpermute", "qkv_bwd", "proj_bwd", "route_bwd", "experts_bwd", "unpermute_bwd",
    "shared", "shared_bwd"] as const)
    flat += opTimeMs(model, dims, whole, kind, 0) - model.coefficients[kind].b;
  for (const kind of ["attn", "attn_bwd"] as const) attn += opTimeMs(model, dims, whole, kind, 0) - model.coefficients[kind].b;
  const alpha = flat / S;
  const beta = attn / ((S * (S + 1)) / 2);
  const C = (x: number) => alpha * x + (beta * x * (x + 1)) / 2;
  const total = C(S);
  const b = [0];
  for (let c = 1; c < P; c++) {
    const target = (c / P) * total;
    // solve beta/2 x^2 + (alpha + beta/2) x - target = 0
    const qa = beta / 2;
    const qb = alpha + beta / 2;
    const x = qa > 0 ? (-qb + Math.sqrt(qb * qb + 4 * qa * target)) / (2 * qa) : target / qb;
    b.push(Math.min(S - 1, Math.max(1, Math.round(x / g) * g)));
  }
  b.push(S);
  return strictlyIncreasing(b) ? b : null;
}

/** Plans for every candidate, evaluated under the model. */
class Evaluator {
  count = 0;
  private cache = new Map<string, Candidate>();
  constructor(private model: CostModel, private dims: BlockDims, private chunkQkv: boolean, private capacityScope: CapacityScope) {}
  eval(variant: Variant, boundaries: number[]): Candidate {
    const key = `${variant}:${boundaries.join(",")}`;
    const hit = this.cache.get(key);
    if (hit) return hit;
    this.count++;
    const plan = makePlan(variant, this.dims, { boundaries, chunkQkv: this.chunkQkv, capacityScope: this.capacityScope });
    const sim = predict(this.model, plan);
    const c = { variant, boundaries, forwardMs: sim.forward.makespanMs, backwardMs: sim.backward.makespanMs, totalMs: sim.totalMs };
    this.cache.set(key, c);
    return c;
  }
}

/**
 * Coordinate descent over interior boundaries: move one boundary by +-g*step while the simulated
 * time improves, halving the step when no move helps.
 */
function refine(ev: Evaluator, start: Candidate, S: number, g: number, maxEvals = 400): Candidate {
  let best = start;
  const P = start.boundaries.length - 1;
  let step = Math.max(1, Math.floor(S / P / g / 4));
  const budget = ev.count + maxEvals;
  while (step >= 1 && ev.count < budget) {
    let improved = false;
    for (let i = 1; i < P && ev.count < budget; i++) {
      for (const dir of [-1, 1]) {
        const b = [...best.boundaries];
        b[i] += dir * step * g;
        if (b[i] <= b[i - 1] || b[i] >= b[i + 1]) continue;
        const c = ev.eval(best.variant, b);
        if (c.totalMs < best.totalMs * (1 - 1e-9)) {
          best = c;
          improved = true;
        }
      }
    }
    if (!improved) step = Math.floor(step / 2);
  }
  return best;
}

/** Searches degree, variant and boundaries; returns the fastest plan under the model. */
export function planBlock(dimsIn: BlockDims, model: CostModel, opts: PlannerOptions = {}): PlanChoice {
  const dims = parseDims(dimsIn);
  const S = dims.seq_length;
  const chunkQkv = opts.chunkQkv ?? true;
  let g = opts.granularity ?? defaultGranularity(S, model.profile);
  // A degree the user fixed wins over the default granularity (not over an explicit one).
  if (opts.granularity === undefined && opts.degrees)
    while (g > 1 && maxDegreeFor(S, g) < Math.min(...opts.degrees)) g /= 2;
  if (!Number.isInteger(g) || g < 1) throw new Error(`granularity must be a positive integer, got ${g}`);
  const variants = opts.variants ?? ["grouped", "interleaved"];
  for (const v of variants)
    if (!VARIANTS.includes(v)) throw new Error(`variant must be one of ${VARIANTS.join(", ")}, got "${v}"`);
  const capacityScope = opts.capacityScope ?? "chunk";
  const ev = new Evaluator(model, dims, chunkQkv, capacityScope);
  const sequential = ev.eval("sequential", [0, S]);
  const perCombo: Candidate[] = [];
  if (opts.boundaries) {
    const b = opts.boundaries;
    for (const v of variants) {
      if (v === "sequential" && b.length !== 2) continue;
      perCombo.push(ev.eval(v, b));
    }
    if (perCombo.length === 0) throw new Error(`boundaries: ${b.length - 1} chunks fit none of the variants ${variants.join(", ")}`);
  } else {
    const degrees = opts.degrees ?? Array.from({ length: opts.maxDegree ?? 16 }, (_, i) => i + 1);
    for (const P of degrees) if (!Number.isInteger(P) || P < 1) throw new Error(`degree must be a positive integer, got ${P}`);
    const feasible = degrees.filter((P) => P <= maxDegreeFor(S, g));
    if (feasible.length === 0)
      throw new Error(`degree: none of ${degrees.join(", ")} fits seq_length ${S} with granularity ${g} (at most ${maxDegreeFor(S, g)} chunks)`);
    for (const P of feasible) {
      if (P === 1) {
        // One chunk: every variant builds the same lists; list it once, as sequential unless a variant was asked for.
        if (opts.variants === undefined || variants.includes("sequential")) perCombo.push(sequential);
        else perCombo.push(ev.eval(variants[0], [0, S]));
        continue;
      }
      for (const v of variants) {
        if (v === "sequential") continue;
        const starts = [snappedUniform(S, P, g), balancedBoundaries(model, dims, P, g)].filter((b): b is number[] => b !== null);
        if (starts.length === 0) continue;
        perCombo.push(starts.map((b) => ev.eval(v, b)).reduce((a, c) => (c.totalMs < a.totalMs ? c : a)));
      }
    }
    if (perCombo.length === 0) throw new Error(`no feasible plan for degrees ${feasible.join(", ")} and variants ${variants.join(", ")}`);
    // Refine the boundaries of the most promising (variant, degree) combinations.
    if (opts.searchBoundaries !== false) {
      const order = [...perCombo].sort((a, b) => a.totalMs - b.totalMs);
      for (const c of order.slice(0, 4)) {
        if (c.boundaries.length <= 2) continue;
        const r = refine(ev, c, S, g);
        perCombo[perCombo.indexOf(c)] = r;
      }
    }
  }
  perCombo.sort((a, b) => a.totalMs - b.totalMs);
  const best = perCombo[0];
  const plan = makePlan(best.variant, dims, { boundaries: best.boundaries, chunkQkv, capacityScope });
  const sim = predict(model, plan);
  plan.meta = {
    ...plan.meta,
    predicted: {
      profile: model.profile,
      calibrated: model.calibration !== undefined,
      overlap_slowdown: model.overlapSlowdown,
      op_gap_ms: model.opGapMs,
      forward_ms: sim.forward.makespanMs,
      backward_ms: sim.backward.makespanMs,
      total_ms: sim.totalMs,
      sequential_total_ms: sequential.totalMs,
      speedup: sequential.totalMs / sim.totalMs,
    },
    search: { granularity: g, evaluated: ev.count },
  };
  return {
    plan, sim, best, sequential, speedup: sequential.totalMs / best.totalMs, candidates: perCombo, granularity: g, evaluated: ev.count,
  };
}
