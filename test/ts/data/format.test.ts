// The writer's bytes against Megatron-LM's documented .idx layout, the tokenizers, the Brown
// tag stripping and the split rule.
import { describe, expect, it } from "vitest";
import { brownFiles, stripTags } from "../../../src/data/brown.ts";
import { DTYPES, INDEX_HEADER_BYTES, encodeBin, encodeIndex, optimalDtype } from "../../../src/data/format.ts";
import { splitDocuments, splitmix64, validCount } from "../../../src/data/split.ts";
import { getTokenizer } from "../../../src/data/tokenizers.ts";
import { readFileSync } from "node:fs";

describe("the .idx and .bin bytes", () => {
  it("writes Megatron's header, sizes, pointers and document indices", () => {
    const idx = encodeIndex([3, 0, 2], "uint16");
    expect(idx.length).toBe(34 + 3 * 4 + 3 * 8 + 4 * 8);
    expect(idx.subarray(0, 9).equals(Buffer.from([0x4d, 0x4d, 0x49, 0x44, 0x49, 0x44, 0x58, 0, 0]))).toBe(true); // "MMIDIDX\0\0"
    expect(idx.readBigUInt64LE(9)).toBe(1n); // version
    expect(idx.readUInt8(17)).toBe(8); // uint16
    expect(idx.readBigUInt64LE(18)).toBe(3n); // sequences
    expect(idx.readBigUInt64LE(26)).toBe(4n); // documents + 1
    const at = INDEX_HEADER_BYTES;
    expect([0, 1, 2].map((i) => idx.readInt32LE(at + 4 * i))).toEqual([3, 0, 2]);
    expect([0, 1, 2].map((i) => idx.readBigInt64LE(at + 12 + 8 * i))).toEqual([0n, 6n, 6n]); // bytes, 2 per token
    expect([0, 1, 2, 3].map((i) => idx.readBigInt64LE(at + 36 + 8 * i))).toEqual([0n, 1n, 2n, 3n]);
    expect(encodeIndex([1, 1], "int32").readBigInt64LE(at + 8 + 8)).toBe(4n); // int32: 4 bytes per token
    expect(encodeIndex([1], "int32").readUInt8(17)).toBe(DTYPES.int32.code);
  });

  it("packs tokens little-endian in the dtype and refuses ids that do not fit", () => {
    expect([...encodeBin([[1, 256], [65535]], "uint16")]).toEqual([1, 0, 0, 1, 0xff, 0xff]);
    expect([...encodeBin([[70000]], "int32")]).toEqual([0x70, 0x11, 0x01, 0x00]);
    expect(() => encodeBin([[1], [2, 65536]], "uint16")).toThrow(/document 1, token 1: id 65536 does not fit uint16/);
  });

  it("chooses the dtype Megatron would: uint16 below 65500, else int32", () => {
    expect(optimalDtype(257)).toBe("uint16");
    expect(optimalDtype(50257)).toBe("uint16");
    expect(optimalDtype(65499)).toBe("uint16");
    expect(optimalDtype(65500)).toBe("int32");
  });
});

describe("tokenizers", () => {
  it("byte: UTF-8 bytes, EOD 256, round trip", () => {
    const t = getTokenizer("byte");
    expect([t.vocabSize, t.eodId]).toEqual([257, 256]);
    expect(t.encode("aé")).toEqual([97, 0xc3, 0xa9]);
    const s = "Grand Jury said “no evidence” ✓\n";
    expect(t.decode([...t.encode(s), t.eodId])).toBe(s);
  });

  it("gpt2: GPT-2's BPE ids, EOD 50256, literal <|endoftext|> is plain text", () => {
    const t = getTokenizer("gpt2");
    expect([t.vocabSize, t.eodId]).toEqual([50257, 50256]);
    expect(t.encode("Hello world")).toEqual([15496, 995]); // GPT-2's well-known ids
    expect(t.encode("<|endoftext|>")).not.toContain(50256);
    const s = "The jury further said in term-end presentments";
    expect(t.decode(t.encode(s))).toBe(s);
  });

  it("names the option for an unknown tokenizer", () => {
    expect(() => getTokenizer("sentencepiece")).toThrow(/--tokenizer: unknown tokenizer "sentencepiece" \(known: byte, gpt2\)/);
  });
});

describe("Brown Corpus", () => {
  it("strips the part-of-speech tags", () => {
    expect(stripTags("The/at jury/nn said/vbd ./.")).toBe("The jury said .");
    expect(stripTags("\n\n\tA/at 1-1/2/cd inch/nn ''/'' \n\n\tNext/ap line/nn ./.\n")).toBe("A 1-1/2 inch ''\nNext line .");
  });

  it("reads the 500 files of the package; the first starts as Brown's ca01 does", () => {
    const files = brownFiles();
    expect(files.length).toBe(500);
    const text = stripTags(readFileSync(files[0], "utf8"));
    expect(text.startsWith("The Fulton County Grand Jury said Friday an investigation of Atlanta's recent primary election")).toBe(true);
    expect(text).not.toMatch(/\/(at|nn|vbd|np-tl)\b/);
  });
});

describe("train/valid split by document", () => {
  it("splitmix64 matches its reference first output for state 0", () => {
    expect(splitmix64(0n)).toBe(0xe220a8397b1dcdafn);
  });

  it("is a partition, deterministic from the seed, with the stated valid count", () => {
    const a = splitDocuments(500, 1234, 0.05);
    expect(splitDocuments(500, 1234, 0.05)).toEqual(a);
    expect(a.valid.length).toBe(25);
    expect([...a.train, ...a.valid].sort((x, y) => x - y)).toEqual(Array.from({ length: 500 }, (_, i) => i));
    expect(new Set([...a.train, ...a.valid]).size).toBe(500);
    expect(splitDocuments(500, 1235, 0.05).valid).not.toEqual(a.valid);
    // the rule: the valid documents are the ones with the smallest keys
    const base = splitmix64(1234n);
    const key = (j: number) => splitmix64((base + BigInt(j)) & ((1n << 64n) - 1n));
    const maxValid = a.valid.map(key).reduce((m, k) => (k > m ? k : m));
    expect(a.train.every((j) => key(j) > maxValid)).toBe(true);
  });

  it("counts: none for fraction 0, at least one valid and one train document otherwise", () => {
    expect(validCount(10, 0)).toBe(0);
    expect(validCount(10, 0.01)).toBe(1);
    expect(validCount(2, 0.9)).toBe(1);
    expect(validCount(1, 0.5)).toBe(0);
    expect(validCount(20, 0.125)).toBe(3); // floor(2.5 + 0.5): rounds half up
    expect(splitDocuments(3, 7, 0).valid).toEqual([]);
    expect(() => splitDocuments(3, -1, 0.1)).toThrow(/--seed/);
    expect(() => splitDocuments(3, 1, 1)).toThrow(/--valid-fraction: must be in \[0, 1\)/);
  });
});
