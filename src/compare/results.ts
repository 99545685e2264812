// What the rank command `compare` returns (py/ampipe/train/compare.py), as a zod schema checked
// on receipt (`RankRun.callAll`): per seed, each arm's training summary (the `train` command's),
// the parameter distance of each other arm from the baseline at the end, and the test fault if any.
import { z } from "zod";
import { TrainResultSchema } from "../train/results.ts";

const num = z.number();
export const ParameterDistanceSchema = z.object({ l2: num, relative: num, max_abs: num });

/** One seed's arms (the control arm only when it was trained). */
export const SeedResultSchema = z.object({
  seed: z.int(),
  stopped: z.boolean(),
  arms: z.object({ baseline: TrainResultSchema, pipelined: TrainResultSchema, control: TrainResultSchema.optional() }),
  parameter_distance: z.object({ pipelined: ParameterDistanceSchema, control: ParameterDistanceSchema.optional() }),
  fault: z.string().nullable().optional(),
});
export type SeedResult = z.output<typeof SeedResultSchema>;

/** `compare`: the seeds this call trained (every rank reports the same figures) and whether it was stopped. */
export const CompareResultSchema = z.object({ rank: z.int(), seeds: z.array(SeedResultSchema), stopped: z.boolean() });
