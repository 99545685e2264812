// `ampipe data inspect` / inspectDataset: the Python reader's checks, reached from TypeScript
// before any rank starts.
import { mkdtempSync, rmSync, truncateSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { DatasetError, checkVocabulary, inspectDataset } from "../../../src/data/inspect.ts";
import { prepareDataset } from "../../../src/data/prepare.ts";

let dir: string;
beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), "ampipe-inspect-"));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe("inspectDataset", () => {
  it("summarises a prepared dataset with its split; the vocabulary check names the field", () => {
    const inputs = Array.from({ length: 10 }, (_, i) => {
      const p = join(dir, `d${i}.txt`);
      writeFileSync(p, `text number ${i}`);
      return p;
    });
    const r = prepareDataset({ inputs, out: join(dir, "ds"), validFraction: 0.2 });
    const s = inspectDataset(r.prefix);
    expect(s).toMatchObject({ dtype: "uint16", num_documents: 10, num_sequences: 10, num_tokens: r.sidecar.num_tokens, max_token_id: 256, sidecar: true, tokenizer: "byte", eod_id: 256 });
    expect(s.split.valid.documents).toBe(2);
    expect(s.split_origin).toEqual({ from: "sidecar", seed: 1234, valid_fraction: 0.2 });
    expect(s.split.train.tokens + s.split.valid.tokens).toBe(r.sidecar.num_tokens);
    expect(() => checkVocabulary(s, 257)).not.toThrow();
    expect(() => checkVocabulary(s, 256)).toThrow(/model\.vocab_size: 256 is too small for .*ds, whose token ids reach 256 \(needs at least 257\)/);
  });

  it("a corrupt pair is a DatasetError naming the file", () => {
    const r = prepareDataset({ inputs: [join(dir, "d0.txt")], out: join(dir, "bad"), validFraction: 0 });
    truncateSync(`${r.prefix}.bin`, 4);
    expect(() => inspectDataset(r.prefix)).toThrow(DatasetError);
    expect(() => inspectDataset(r.prefix)).toThrow(/bad\.bin: truncated \.bin: 4 bytes/);
    expect(() => inspectDataset(join(dir, "absent"))).toThrow(/absent\.idx: no such file/);
  });
});
