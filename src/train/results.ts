// What the rank commands of `ampipe train` return (py/ampipe/train/worker_commands.py), as zod
// schemas checked on receipt (`RankRun.callAll`): `train` (Trainer.run's summary), `train_tune`
// (the arms' measured step times and their calibration figures), `train_profile` (the breakdown).
import { z } from "zod";
import { msById } from "../bridge/index.ts";

/** The Python module that registers these commands on each rank. */
export const TRAIN_MODULE = "ampipe.train.worker_commands";

const num = z.number();
const msByName = z.record(z.string(), num);

/** `train`: the run's summary (py/ampipe/train/loop.py Trainer.end). */
export const TrainResultSchema = z.object({
  rank: z.int(), step: z.int(), steps: z.int(), stopped: z.boolean(), resumed_from: z.int().nullable(),
  last_checkpoint: z.int().nullable(), pipelined: z.boolean(), steps_run: z.int(),
  /** The last step's metric event (loss, lm_loss, aux_loss, z_loss, lr, grad norm, ...). */
  final: z.record(z.string(), z.union([num, z.boolean(), z.string()]).nullable()).nullable(),
  last_eval: z.object({ step: z.int(), loss: num, ppl: num }).nullable(),
  median_step_ms: num.nullable(), median_tokens_per_s: num.nullable(),
});
export type TrainResult = z.output<typeof TrainResultSchema>;

/** One arm's figures for the training-step model (py/ampipe/train/profile.py `arm_summaries`). */
export const ArmSummarySchema = z.object({
  steps: z.int(),
  step_ms: num.nullable(),
  moe_layers_ms: num.nullable(),
  blocks_per_step: z.int(),
  op_ms: z.object({ forward: msById, backward: msById }),
  pass_ms: z.object({ forward: num.optional(), backward: num.optional() }),
});

/** `train_tune`: per arm, the step times of the measured rounds, and its calibration figures. */
export const TuneResultSchema = z.object({
  rank: z.int(),
  step_ms: z.record(z.string(), z.array(num)),
  arms: z.record(z.string(), ArmSummarySchema),
});
export type TuneResult = z.output<typeof TuneResultSchema>;

/** One arm's medians over the quiet steps of one rank (py/ampipe/train/profile.py `breakdown`). */
export const ArmBreakdownSchema = z.object({
  step_ms: num,
  phases: msByName,
  phases_sum: num,
  coverage: num,
  python_gc: num,
  python_gc_between_phases: num,
  moe_layers: num,
  outside_moe_layers: num,
  block_passes: num,
  compute_ops: num,
  island_compute: num,
  op_bookkeeping: num,
  compute_waits: num,
  waits_on: msByName,
  executor_overhead: num,
  comm_stream_ops: num,
  collectives: msByName,
  emulated_delay: num,
  steps: z.int(),
});

/** `train_profile`: where this rank wrote its trace events, and the breakdown per arm. */
export const ProfileResultSchema = z.object({
  rank: z.int(),
  trace: z.string(),
  breakdown: z.record(z.string(), ArmBreakdownSchema),
  steps: z.record(z.string(), z.array(z.record(z.string(), z.unknown()))),
  torch_profiler: z.boolean(),
});
