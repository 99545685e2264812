// Checking a dataset from TypeScript before any rank starts: `python -m ampipe.data inspect`
// opens it with the same reader the ranks use (one implementation of the checks), and returns
// its summary or the reader's error, which names the file.
import { spawnSync } from "node:child_process";
import { pythonChoice, pythonEnv } from "../python.ts";

export interface DatasetSummary {
  prefix: string;
  dtype: string;
  num_documents: number;
  num_sequences: number;
  num_tokens: number;
  max_token_id: number;
  sidecar: boolean;
  tokenizer: string | null;
  vocab_size: number | null;
  eod_id: number | null;
  split: Record<"train" | "valid", { documents: number; tokens: number }>;
  /** The sidecar's lists, or the split rule with these settings (a dataset without a sidecar). */
  split_origin: { from: "sidecar" | "rule"; seed: number; valid_fraction: number };
}

export class DatasetError extends Error {}

export interface InspectOptions {
  /** For a dataset without a sidecar: the split's seed and valid fraction. */
  splitSeed?: number;
  validFraction?: number;
  /** Also check the .bin's checksum (reads the whole file). */
  verify?: boolean;
}

export function inspectDataset(prefix: string, o: InspectOptions = {}): DatasetSummary {
  const py = pythonChoice();
  const args = ["-m", "ampipe.data", "inspect", prefix];
  if (o.splitSeed !== undefined) args.push("--split-seed", String(o.splitSeed));
  if (o.validFraction !== undefined) args.push("--valid-fraction", String(o.validFraction));
  if (o.verify) args.push("--verify");
  const r = spawnSync(py.path, args, { encoding: "utf8", env: pythonEnv(), timeout: 600_000 });
  if (r.error) throw new Error(`cannot run ${py.path} (from ${py.source}) to read the dataset: ${r.error.message}`);
  if (r.status === 2) throw new DatasetError(r.stderr.trim());
  if (r.status !== 0) throw new Error(`python -m ampipe.data inspect ${prefix} failed (exit ${r.status ?? r.signal}): ${r.stderr.trim().split("\n").slice(-5).join("\n")}`);
  return JSON.parse(r.stdout) as DatasetSummary;
}

/** Throws unless every token id of the dataset is below the model's vocabulary size. */
export function checkVocabulary(s: DatasetSummary, vocabSize: number, field = "model.vocab_size"): void {
  if (s.max_token_id >= vocabSize)
    throw new DatasetError(`${field}: ${vocabSize} is too small for ${s.prefix}, whose token ids reach ${s.max_token_id} (needs at least ${s.max_token_id + 1})`);
}
