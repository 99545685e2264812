// The emulated interconnect of a bench sweep: its label (as Python writes it), the sequential
// block's emulated delay, and the bandwidth that makes communication a given multiple of compute.
import type { EmulatedCommConfig, ExperimentConfig } from "../config/index.ts";
import { DTYPE_BYTES } from "../plan/ir.ts";
import { a2aRows, wireBytes } from "../plan/wire.ts";

/** Emulated label, as the Python side writes it (EmulatedComm.label). */
export function emulatedLabel(e: EmulatedCommConfig): string {
  const g = (x: number) => String(Number(x.toPrecision(6)));
  return `emulated ${e.world_size}-way all-to-all (${g(e.latency_us)} us + bytes / ${g(e.bandwidth_gbps)} GB/s)`;
}

/** Bytes the sequential block's four all-to-alls put on the wire per rank (dropless buffer, or E x capacity rows). */
function baselineWireBytes(cfg: ExperimentConfig, seqLength: number, worldSize: number): number {
  const m = cfg.model; // the group's model
  const rows = a2aRows(seqLength * m.micro_batch_size, m.moe_router_topk, m.num_experts, m.moe_expert_capacity_factor);
  return 4 * wireBytes(rows * m.hidden_size * DTYPE_BYTES[m.dtype], worldSize);
}

/** The emulated delay (ms) of the sequential block's four all-to-alls. */
export function baselineDelayMs(cfg: ExperimentConfig, emu: EmulatedCommConfig): number {
  return (4 * emu.latency_us) / 1e3 + (baselineWireBytes(cfg, cfg.model.seq_length, emu.world_size) / (emu.bandwidth_gbps * 1e9)) * 1e3;
}

/**
 * The emulated bandwidth (GB/s) at which the sequential block's four all-to-alls (dispatch,
 * combine and their backward) take `ratio` x `computeMs`: each moves a rank's buffer minus its
 * own 1/world share (src/plan/wire.ts), plus the latency per op.
 */
export function bandwidthForRatio(cfg: ExperimentConfig, seqLength: number, ratio: number, computeMs: number, emu: EmulatedCommConfig): number {
  const wire = baselineWireBytes(cfg, seqLength, emu.world_size);
  const budgetS = (ratio * computeMs) / 1e3 - (4 * emu.latency_us) / 1e6;
  if (budgetS <= 0) throw new Error(`bench.comm_compute_ratios: at ${ratio} the latency alone (4 x ${emu.latency_us} us) exceeds ${ratio} x compute (${computeMs.toFixed(2)} ms) at seq_length ${seqLength}`);
  return wire / budgetS / 1e9;
}
