// The tokenizers `ampipe data prepare` offers. Both ship their vocabulary (nothing is
// downloaded at run time); every document ends with the tokenizer's end-of-document id.
import { createRequire } from "node:module";

type R50k = typeof import("gpt-tokenizer/encoding/r50k_base");
let r50kModule: R50k | undefined;
/** Loaded on first use (its 50k-entry vocabulary, ~40 ms here), so other commands do not pay for it. */
const r50k = (): R50k => (r50kModule ??= createRequire(import.meta.url)("gpt-tokenizer/encoding/r50k_base") as R50k);

export interface Tokenizer {
  name: TokenizerName;
  /** Ids are 0 .. vocabSize - 1. */
  vocabSize: number;
  /** End-of-document id, appended to every document. */
  eodId: number;
  encode(text: string): number[];
  decode(ids: Iterable<number>): string;
}

export const TOKENIZER_NAMES = ["byte", "gpt2"] as const;
export type TokenizerName = (typeof TOKENIZER_NAMES)[number];

/** UTF-8 bytes 0..255, EOD 256. */
const byteTokenizer: Tokenizer = {
  name: "byte",
  vocabSize: 257,
  eodId: 256,
  encode: (text) => Array.from(Buffer.from(text, "utf8")),
  decode: (ids) => Buffer.from([...ids].filter((i) => i < 256)).toString("utf8"),
};

/**
 * GPT-2's BPE (tiktoken's r50k_base, the same 50257-entry vocabulary and merges), EOD = 50256
 * `<|endoftext|>`. Text that spells `<|endoftext|>` is encoded as ordinary text, as Megatron's
 * GPT2BPETokenizer does; only the appended EOD is the special id.
 */
const gpt2Tokenizer: Tokenizer = {
  name: "gpt2",
  vocabSize: 50257,
  eodId: 50256,
  encode: (text) => r50k().encode(text, { disallowedSpecial: new Set() }),
  decode: (ids) => r50k().decode(ids),
};

export function getTokenizer(name: string): Tokenizer {
  if (name === "byte") return byteTokenizer;
  if (name === "gpt2") return gpt2Tokenizer;
  throw new Error(`--tokenizer: unknown tokenizer "${name}" (known: ${TOKENIZER_NAMES.join(", ")})`);
}
