// What `ampipe train` decides and writes before a rank starts: the config (its options as
// overrides), the dataset, the run directory (resuming or fresh) and the block (src/train/choose.ts).
import type { ExperimentConfig } from "../config/index.ts";
import { loadConfig } from "../config/index.ts";
import type { Plan } from "../plan/ir.ts";
import { chooseBlock, type ChooseOptions } from "./choose.ts";
import { resolveDataset } from "./dataset.ts";
import { lockRunDir } from "./lock.ts";
import { prepareRunDir } from "./rundir.ts";
import type { TuneArm } from "./tune.ts";

/** The options that decide what is prepared. */
export interface PrepareOptions extends ChooseOptions {
  steps?: number;
  out?: string;
  fresh?: boolean;
}

export interface TrainSetup {
  cfg: ExperimentConfig;
  outDir: string;
  plan: Plan | null;
  planSource: string;
  resuming: boolean;
  /** Arms to time before training (degree auto, a fresh run): the block is decided on the ranks. */
  tune: TuneArm[] | null;
  /** The best pipelined candidate (for a profile when the baseline is the block). */
  bestCandidate: Plan | null;
}

/** Everything checked and written before a rank starts: config, dataset, plan, run directory. */
export function prepareTraining(configPath: string, o: PrepareOptions): TrainSetup {
  // The options are overrides like any --set, so the schema checks them with the rest.
  const set = [...o.set, ...(o.steps !== undefined ? [`train.steps=${o.steps}`] : [])];
  const cfg = loadConfig(configPath, set);
  if (o.out !== undefined) cfg.run.output_dir = o.out;
  const data = resolveDataset(cfg);
  cfg.data.path = data.prefix;
  if (data.built) process.stdout.write(`built the default dataset ${data.prefix} (Brown Corpus, ${cfg.data.tokenizer} tokenizer) in ${data.seconds.toFixed(1)} s\n`);
  const outDir = cfg.run.output_dir;
  lockRunDir(outDir, "ampipe train"); // held until this process exits
  const resuming = prepareRunDir(outDir, cfg as unknown as Record<string, unknown>, o.fresh ?? false);
  const choice = chooseBlock(cfg, o, outDir, resuming);
  return { cfg, outDir, plan: choice.plan, planSource: choice.source, resuming, tune: choice.tune, bestCandidate: choice.bestCandidate };
}
