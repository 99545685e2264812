// `ampipe data prepare` end to end on tiny inputs: the files it writes, the sidecar, the
// all-or-nothing commit, the first-use Brown build, and the CLI's errors.
import * as fs from "node:fs";
import { mkdtempSync, readFileSync, readdirSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { spawnSync } from "node:child_process";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import type { FsOps } from "../../../src/data/files.ts";
import { ensureDataset, prepareDataset, readSidecar } from "../../../src/data/prepare.ts";
import { repoRoot } from "../../../src/python.ts";

let dir: string;
beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), "ampipe-data-"));
});
afterEach(() => fs.rmSync(dir, { recursive: true, force: true }));

const write = (name: string, text: string) => {
  const p = join(dir, name);
  writeFileSync(p, text);
  return p;
};

describe("prepareDataset", () => {
  it("writes one sequence per document, each ending in EOD, at the offsets the index says", () => {
    const a = write("a.txt", "ab");
    const b = write("b.jsonl", '{"text": "é"}\n\n{"text": ""}\n');
    const r = prepareDataset({ inputs: [a, b], out: join(dir, "out/ds"), validFraction: 0 });
    const bin = readFileSync(join(dir, "out/ds.bin"));
    const idx = readFileSync(join(dir, "out/ds.idx"));
    // documents: "ab" + EOD, "é" (2 bytes) + EOD, "" + EOD
    expect([...new Uint16Array(bin.buffer, bin.byteOffset, bin.length / 2)]).toEqual([97, 98, 256, 0xc3, 0xa9, 256, 256]);
    expect(idx.readBigUInt64LE(18)).toBe(3n);
    expect(idx.readBigUInt64LE(26)).toBe(4n);
    expect([0, 1, 2].map((i) => idx.readInt32LE(34 + 4 * i))).toEqual([3, 3, 1]);
    expect([0, 1, 2].map((i) => idx.readBigInt64LE(46 + 8 * i))).toEqual([0n, 6n, 12n]);
    const s = r.sidecar;
    expect(readSidecar(r.prefix)).toEqual(s);
    expect(s).toMatchObject({ tokenizer: "byte", vocab_size: 257, eod_id: 256, max_token_id: 256, dtype: "uint16", num_documents: 3, num_tokens: 7 });
    expect(s.files.bin.bytes).toBe(bin.length);
    expect(s.files.idx.bytes).toBe(idx.length);
    expect(s.split).toEqual({ seed: 1234, valid_fraction: 0, train: [0, 1, 2], valid: [] });
    expect(s.source).toMatchObject({ kind: "files", inputs: [{ format: "text", documents: 1 }, { format: "jsonl", documents: 2 }] });
    expect(readdirSync(join(dir, "out")).sort()).toEqual(["ds.bin", "ds.idx", "ds.json"]);
  });

  it("reads a .jsonl larger than its 4 MiB read chunks, multi-byte characters across the chunk edges", () => {
    const texts = ["é".repeat(1_500_001), "x✓".repeat(700_001), "tail"]; // 3 MB, 2.8 MB, 4 B of UTF-8
    const p = write("big.jsonl", texts.map((text) => JSON.stringify({ text })).join("\n")); // no final newline
    const r = prepareDataset({ inputs: [p], out: join(dir, "big"), validFraction: 0 });
    expect(r.sidecar.num_documents).toBe(3);
    const idx = readFileSync(join(dir, "big.idx"));
    expect([0, 1, 2].map((i) => idx.readInt32LE(34 + 4 * i))).toEqual(texts.map((t) => Buffer.byteLength(t) + 1));
    const bin = readFileSync(join(dir, "big.bin"));
    const ids = new Uint16Array(bin.buffer, bin.byteOffset, bin.length / 2);
    const second = ids.subarray(3_000_003, 3_000_003 + 2_800_004);
    expect(Buffer.from(second).toString("utf8")).toBe(texts[1]);
  });

  it("--format brown strips the tags of a tagged input file", () => {
    const p = write("cx01", "\n\n\tThe/at jury/nn said/vbd ./.\n");
    prepareDataset({ inputs: [p], format: "brown", out: join(dir, "b"), validFraction: 0 });
    const bin = readFileSync(join(dir, "b.bin"));
    const ids = [...new Uint16Array(bin.buffer, bin.byteOffset, bin.length / 2)];
    expect(Buffer.from(ids.slice(0, -1)).toString("utf8")).toBe("The jury said .");
    expect(ids.at(-1)).toBe(256);
  });

  it("gpt2: ids of GPT-2's BPE, EOD 50256", () => {
    const r = prepareDataset({ inputs: [write("h.txt", "Hello world")], tokenizer: "gpt2", out: join(dir, "g"), validFraction: 0 });
    const bin = readFileSync(join(dir, "g.bin"));
    expect([...new Uint16Array(bin.buffer, bin.byteOffset, bin.length / 2)]).toEqual([15496, 995, 50256]);
    expect(r.sidecar).toMatchObject({ vocab_size: 50257, eod_id: 50256, dtype: "uint16" });
  });

  it("splits by document, deterministically from the seed", () => {
    const inputs = Array.from({ length: 40 }, (_, i) => write(`d${i}.txt`, `document ${i}`));
    const one = prepareDataset({ inputs, out: join(dir, "s1"), seed: 7, validFraction: 0.25 }).sidecar.split;
    const two = prepareDataset({ inputs, out: join(dir, "s2"), seed: 7, validFraction: 0.25 }).sidecar.split;
    const other = prepareDataset({ inputs, out: join(dir, "s3"), seed: 8, validFraction: 0.25 }).sidecar.split;
    expect(two).toEqual(one);
    expect(one.valid.length).toBe(10);
    expect(other.valid).not.toEqual(one.valid);
  });

  it("names a missing input file, a bad .jsonl line, and writes nothing", () => {
    expect(() => prepareDataset({ inputs: [join(dir, "nope.txt")], out: join(dir, "x") })).toThrow(/--input: .*nope\.txt: no such file/);
    const bad = write("bad.jsonl", '{"text": "ok"}\n{"body": "no text"}\n');
    expect(() => prepareDataset({ inputs: [bad], out: join(dir, "x") })).toThrow(/bad\.jsonl:2: no string field "text"/);
    expect(readdirSync(dir).filter((f) => f.startsWith("x"))).toEqual([]);
  });
});

describe("the commit is all or nothing", () => {
  const failing = (when: (op: string, path: string) => boolean): FsOps => ({
    ...fs,
    writeSync: ((fd: number, ...rest: unknown[]) => {
      if (when("write", String(fd))) throw new Error("ENOSPC: no space left on device");
      return (fs.writeSync as (...a: unknown[]) => number)(fd, ...rest);
    }) as typeof fs.writeSync,
    renameSync: (from: fs.PathLike, to: fs.PathLike) => {
      if (when("rename", String(to))) throw new Error(`EIO: rename to ${String(to)}`);
      fs.renameSync(from, to);
    },
  });

  it("a failure while writing leaves the old dataset as it was, and no temporary file", () => {
    const inp = write("in.txt", "old text");
    const prefix = join(dir, "ds");
    prepareDataset({ inputs: [inp], out: prefix, validFraction: 0 });
    const before = ["bin", "idx", "json"].map((e) => readFileSync(`${prefix}.${e}`));
    writeFileSync(inp, "a much longer new text");
    let writes = 0;
    expect(() => prepareDataset({ inputs: [inp], out: prefix, validFraction: 0, fs: failing((op) => op === "write" && ++writes === 2) })).toThrow(
      /writing the dataset failed \(ENOSPC.*nothing was replaced/,
    );
    expect(["bin", "idx", "json"].map((e) => readFileSync(`${prefix}.${e}`))).toEqual(before);
    expect(readdirSync(dir).sort()).toEqual(["ds.bin", "ds.idx", "ds.json", "in.txt"]);
  });

  it("a failure between the two renames removes the half-replaced pair", () => {
    const inp = write("in.txt", "old text");
    const prefix = join(dir, "ds");
    prepareDataset({ inputs: [inp], out: prefix, validFraction: 0 });
    writeFileSync(inp, "new");
    expect(() => prepareDataset({ inputs: [inp], out: prefix, validFraction: 0, fs: failing((op, p) => op === "rename" && p.endsWith(".idx")) })).toThrow(
      /the half-replaced pair was removed/,
    );
    // no new .bin beside the old .idx, no sidecar claiming a complete dataset, no temporaries
    expect(readdirSync(dir).sort()).toEqual(["in.txt"]);
  });

  it("the sidecar comes last: a failure renaming it leaves a consistent pair without one", () => {
    const prefix = join(dir, "ds");
    expect(() =>
      prepareDataset({ inputs: [write("in.txt", "text")], out: prefix, validFraction: 0, fs: failing((op, p) => op === "rename" && p.endsWith(".json")) }),
    ).toThrow(/the pair is complete but has no sidecar/);
    expect(readdirSync(dir).sort()).toEqual(["ds.bin", "ds.idx", "in.txt"]);
    expect(readSidecar(prefix)).toBeNull();
  });
});

describe("ensureDataset (the default Brown dataset, built on first use)", () => {
  it("builds once, then reuses; another split seed rebuilds", () => {
    const prefix = join(dir, "brown-byte");
    const first = ensureDataset({ prefix });
    expect(first.built).toBe(true);
    expect(first.sidecar).toMatchObject({ tokenizer: "byte", num_documents: 500, source: { kind: "brown" } });
    expect(first.sidecar.split.valid.length).toBe(25);
    const again = ensureDataset({ prefix });
    expect(again.built).toBe(false);
    expect(again.sidecar).toEqual(first.sidecar);
    expect(ensureDataset({ prefix, seed: 99 }).built).toBe(true);
    // a truncated .bin no longer matches its sidecar: rebuilt, not reused
    fs.truncateSync(`${prefix}.bin`, 10);
    expect(ensureDataset({ prefix, seed: 99 }).built).toBe(true);
  });
});

describe("ampipe data prepare (CLI)", () => {
  it("prints a summary; a missing input is exit 2 naming the file", () => {
    const cli = join(repoRoot, "bin", "ampipe.js");
    const ok = spawnSync(process.execPath, [cli, "data", "prepare", "--input", write("t.txt", "hi"), "--out", join(dir, "c"), "--json"], { encoding: "utf8" });
    expect(ok.status).toBe(0);
    expect(JSON.parse(ok.stdout)).toMatchObject({ num_documents: 1, num_tokens: 3, split: { train: 1, valid: 0 } });
    const bad = spawnSync(process.execPath, [cli, "data", "prepare", "--input", join(dir, "missing.txt"), "--out", join(dir, "m")], { encoding: "utf8" });
    expect(bad.status).toBe(2);
    expect(bad.stderr).toMatch(/--input: .*missing\.txt: no such file/);
  });
});
