// The dataset a training config names, made concrete and checked before any rank starts: the
// default Brown dataset is built on first use; a given prefix is opened by the ranks' own reader
// (`inspectDataset`: bad magic, version, sizes, split), and the model's vocabulary must hold
// every token id in it.
import { resolve } from "node:path";
import { type ExperimentConfig } from "../config/index.ts";
import { checkVocabulary, DatasetError, inspectDataset, type DatasetSummary } from "../data/inspect.ts";
import { ensureDataset } from "../data/prepare.ts";

/** Megatron's "train,valid" weights → the validation fraction (the schema checked the syntax). */
export function validFraction(split: string): number {
  const [train, valid] = split.split(",").map(Number);
  return valid / (train + valid);
}

export interface ResolvedDataset { prefix: string; built: boolean; seconds: number; summary: DatasetSummary }

/** The absolute dataset prefix for `cfg.data`; throws a DatasetError naming the file or field at fault. */
export function resolveDataset(cfg: ExperimentConfig): ResolvedDataset {
  const d = cfg.data;
  const fraction = validFraction(d.split);
  let prefix: string;
  let built = false;
  let seconds = 0;
  if (d.path === null) {
    ({ prefix, built, seconds } = ensureDataset({ tokenizer: d.tokenizer, seed: d.seed, validFraction: fraction }));
  } else {
    prefix = resolve(d.path.replace(/\.(bin|idx)$/, ""));
  }
  const summary = inspectDataset(prefix, { splitSeed: d.seed, validFraction: fraction });
  checkVocabulary(summary, cfg.model.vocab_size);
  for (const split of ["train", "valid"] as const) {
    const { tokens, documents } = summary.split[split];
    if (tokens < cfg.model.seq_length + 1)
      throw new DatasetError(`data.split: the ${split} split of ${prefix} has ${tokens} tokens in ${documents} documents, ` +
        `fewer than one sample of model.seq_length + 1 = ${cfg.model.seq_length + 1} (split ${d.split})`);
  }
  return { prefix, built, seconds, summary };
}
