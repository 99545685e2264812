// The analytic cost model. Each op gets a work figure from the block dims and its chunk (FLOPs
// for matmul-bound ops, bytes moved for memory-bound ops, bytes on the wire for the all-to-alls),
// and a time  t = a_kind * work + b_kind  (ms). Device profiles give default coefficients;
// calibration.ts fits them to measured op times by least squares.
import { DTYPE_BYTES, OP_KINDS, type BlockDims, type Op, type OpKind, type Plan } from "./ir.ts";
import { simulatePlan, type OpCosts, type SimOptions, type SimResult } from "./simulate.ts";
import { COUNT_BYTES, a2aRows, wireBytes } from "./wire.ts";

export type WorkUnit = "flops" | "bytes" | "wire_bytes";

/** Which work figure each kind's time is linear in. */
export const WORK_UNIT: Record<OpKind, WorkUnit> = {
  qkv: "flops", attn: "flops", proj: "flops", route: "flops", experts: "flops",
  counts: "wire_bytes", dispatch: "wire_bytes", combine: "wire_bytes", unpermute: "bytes", aux_loss: "bytes",
  qkv_bwd: "flops", attn_bwd: "flops", proj_bwd: "flops", route_bwd: "flops", experts_bwd: "flops",
  dispatch_bwd: "wire_bytes", combine_bwd: "wire_bytes", unpermute_bwd: "bytes", aux_loss_bwd: "bytes",
  shared: "flops", shared_bwd: "flops",
};

export interface WorkOptions {
  /** Expert FFN activation: swiglu has three weight matrices, gelu two. Default swiglu. */
  expertActivation?: "swiglu" | "gelu";
  /** Ranks the all-to-all spans; default dims.expert_model_parallel_size (set it for an emulated interconnect). */
  commWorldSize?: number;
}

/**
 * Causal (query, key) pairs of one (sequence, head) for the rows [lo, hi) attending to the prefix
 * [0, hi) with a lower-right-aligned mask: row i sees i+1 keys. This is why later chunks cost more.
 */
export function causalPairs(lo: number, hi: number): number {
  const q = hi - lo;
  return q * lo + (q * (q + 1)) / 2;
}

/** The work figure of one op (in its kind's unit, WORK_UNIT). `chunk` null means the whole sequence. */
export function opWork(dims: BlockDims, boundaries: readonly number[], kind: OpKind, chunk: number | null, opts: WorkOptions = {}): number {
  const S = dims.seq_length;
  const [lo, hi] = chunk === null ? [0, S] : [boundaries[chunk], boundaries[chunk + 1]];
  const B = dims.micro_batch_size;
  const T = (hi - lo) * B; // tokens in the chunk
  const H = dims.hidden_size;
  const d = dims.kv_channels;
  const nh = dims.num_attention_heads;
  const g = dims.num_query_groups;
  const E = dims.num_experts;
  const K = dims.moe_router_topk;
  const F = dims.moe_ffn_hidden_size;
  const eb = DTYPE_BYTES[dims.dtype];
  const mats = (opts.expertActivation ?? "swiglu") === "swiglu" ? 3 : 2;
  const world = opts.commWorldSize ?? dims.expert_model_parallel_size;
  const bwd = kind.endsWith("_bwd");
  const base = (bwd ? kind.slice(0, -4) : kind) as OpKind;
  // Backward of a matmul is two matmuls of the same size; attention backward (FlashAttention-2
  // style, recomputing the scores) is about 2.5 times its forward.
  const mul = !bwd ? 1 : base === "attn" ? 2.5 : 2;
  let w: number;
  switch (base) {
    case "qkv": w = 2 * T * H * (nh + 2 * g) * d + 8 * T * H; break;
    case "attn": w = 4 * B * nh * d * causalPairs(lo, hi); break;
    case "proj": w = 2 * T * nh * d * H + 12 * T * H; break;
    case "route": w = 2 * T * H * E + 2 * T * K * H; break;
    case "experts": w = 2 * T * K * H * F * mats; break;
    // the shared expert: every token through one FFN of its width (the gate's 2·T·H is noise)
    case "shared": w = 2 * T * H * (dims.moe_shared_expert_intermediate_size ?? 0) * mats; break;
    case "counts": w = wireBytes(E * COUNT_BYTES, world); break; // latency-bound
    // the dropless buffer (dims carry no capacity factor; calibration fits the rest)
    case "dispatch": case "combine": w = wireBytes(a2aRows(T, K, E, null) * H * eb, world); break;
    case "unpermute": w = eb * (T * K * H + 2 * T * H); break;
    case "aux_loss": w = eb * S * B * E * 4; break;
    default: throw new Error(`unknown op kind ${kind}`);
  }
  return base === "dispatch" || base === "combine" || base === "counts" ? w : w * mul;
}

/** Per-kind linear coefficients: time_ms = a * work + b. */
export interface Coefficient {
  a: number;
  b: number;
  /** How the coefficient was obtained ("profile" or "fit"), samples used and relative RMS error of the fit. */
  source: "profile" | "fit";
  samples?: number;
  rel_rmse?: number;
}

export interface DeviceProfile {
  name: string;
  description: string;
  /** Sustained dense matmul throughput by dtype (FLOP/s). */
  flops_per_s: Record<BlockDims["dtype"], number>;
  /** Fraction of the matmul throughput that attention reaches (forward; backward likewise). */
  attention_efficiency: number;
  /** Sustained memory bandwidth for elementwise/gather ops (bytes/s). */
  memory_bytes_per_s: number;
  /** Fixed cost per op: kernel launches, Python dispatch (ms). */
  op_overhead_ms: number;
  /** The expert-parallel interconnect: bandwidth in GB/s (1e9 bytes/s, as in `emulated_comm`) per rank, latency per op. */
  interconnect: { bandwidth_gbps: number; latency_us: number };
  /** Compute/comm slowdown while both are active (simulate.ts). */
  overlap_slowdown: number;
}

/**
 * Default profiles. Figures are sustained (not peak) rates: H100 SXM dense bf16 ~990 TFLOP/s peak,
 * fp32 (no TF32) ~67; HBM3 3.35 TB/s (H100) and HBM3e 4.8 TB/s (H200); NVLink 4 all-to-all ~200 GB/s
 * per GPU inside a node. The CPU profile is a few cores running torch's fp32 kernels with gloo over
 * loopback. Calibrate (calibration.ts) before trusting absolute numbers.
 */
export const PROFILES: Record<string, DeviceProfile> = {
  cpu: {
    name: "cpu",
    description: "a few CPU cores, torch fp32 kernels, gloo over loopback",
    flops_per_s: { fp32: 40e9, bf16: 15e9, fp16: 8e9 },
    attention_efficiency: 0.5,
    memory_bytes_per_s: 8e9,
    op_overhead_ms: 0.3, // the executor's per-op Python cost on CPU: calibrations here fit 0.2-1.2 ms
    interconnect: { bandwidth_gbps: 2, latency_us: 60 },
    overlap_slowdown: 1.25,
  },
  h100: {
    name: "h100",
    description: "NVIDIA H100 SXM, NVLink 4 inside a node",
    flops_per_s: { fp32: 45e12, bf16: 600e12, fp16: 600e12 },
    attention_efficiency: 0.6,
    memory_bytes_per_s: 2.6e12,
    op_overhead_ms: 0.008,
    interconnect: { bandwidth_gbps: 200, latency_us: 12 },
    overlap_slowdown: 1.1,
  },
  h200: {
    name: "h200",
    description: "NVIDIA H200 SXM (H100 compute, HBM3e), NVLink 4 inside a node",
    flops_per_s: { fp32: 45e12, bf16: 600e12, fp16: 600e12 },
    attention_efficiency: 0.62,
    memory_bytes_per_s: 3.8e12,
    op_overhead_ms: 0.008,
    interconnect: { bandwidth_gbps: 200, latency_us: 12 },
    overlap_slowdown: 1.1,
  },
};

export interface CostModel {
  profile: string;
  dtype: BlockDims["dtype"];
  coefficients: Record<OpKind, Coefficient>;
  overlapSlowdown: number;
  /**
   * Executor overhead per op (ms) that op timers do not see: the gap between one op ending and
   * the next starting on a stream (Python dispatch, event records, thread hand-offs). Added to
   * every op in simulation; 0 in the profiles (their `b` includes it), fitted by calibration.
   */
  opGapMs: number;
  work: WorkOptions;
  /** Set when coefficients were fitted to measurements (calibration.ts). */
  calibration?: { source: string; samples: number; fitted_kinds: OpKind[] };
}

export interface ModelOverrides {
  bandwidthGbps?: number;
  latencyUs?: number;
  overlapSlowdown?: number;
  opGapMs?: number;
  work?: WorkOptions;
}

export function getProfile(name: string): DeviceProfile {
  const p = PROFILES[name];
  if (!p) throw new Error(`profile: unknown device profile "${name}" (known: ${Object.keys(PROFILES).join(", ")})`);
  return p;
}

/** The uncalibrated model of a device profile for one dtype. */
export function profileModel(profileName: string, dtype: BlockDims["dtype"], over: ModelOverrides = {}): CostModel {
  const p = getProfile(profileName);
  const bw = over.bandwidthGbps ?? p.interconnect.bandwidth_gbps;
  const lat = over.latencyUs ?? p.interconnect.latency_us;
  if (!(bw > 0)) throw new Error(`bandwidth_gbps must be > 0, got ${bw}`);
  if (!(lat >= 0)) throw new Error(`latency_us must be >= 0, got ${lat}`);
  const coefficients = {} as Record<OpKind, Coefficient>;
  for (const kind of OP_KINDS) {
    const unit = WORK_UNIT[kind];
    let a: number;
    let b = p.op_overhead_ms;
    if (unit === "wire_bytes") {
      a = 1e3 / (bw * 1e9);
      b = lat / 1e3;
    } else if (unit === "bytes") a = 1e3 / p.memory_bytes_per_s;
    else {
      const eff = kind.startsWith("attn") ? p.attention_efficiency : 1;
      a = 1e3 / (p.flops_per_s[dtype] * eff);
    }
    coefficients[kind] = { a, b, source: "profile" };
  }
  const opGapMs = over.opGapMs ?? 0;
  if (!(opGapMs >= 0)) throw new Error(`op gap must be >= 0 ms, got ${opGapMs}`);
  return { profile: p.name, dtype, coefficients, overlapSlowdown: over.overlapSlowdown ?? p.overlap_slowdown, opGapMs, work: over.work ?? {} };
}

/** Predicted solo time (ms) of one op. */
export function opTimeMs(model: CostModel, dims: BlockDims, boundaries: readonly number[], kind: OpKind, chunk: number | null): number {
  const c = model.coefficients[kind];
  return c.a * opWork(dims, boundaries, kind, chunk, model.work) + c.b;
}

/** Op costs for the simulator from the model. */
export function planCosts(model: CostModel, plan: Plan): OpCosts {
  return (op: Op) => opTimeMs(model, plan.dims, plan.boundaries, op.kind, op.chunk) + model.opGapMs;
}

export function simOptions(model: CostModel): SimOptions {
  return { overlapSlowdown: model.overlapSlowdown };
}

/** Simulates a plan under a cost model. */
export function predict(model: CostModel, plan: Plan): SimResult {
  return simulatePlan(plan, planCosts(model, plan), simOptions(model));
}
