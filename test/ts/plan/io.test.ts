// writeFileAtomic: whole or not at all, fsynced (the file, then its folder after the rename), as
// Python's ampipe.atomic; a failure leaves the old file and no temporary file.
import * as fs from "node:fs";
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it, vi } from "vitest";

vi.mock("node:fs", async (importOriginal) => {
  const real = await importOriginal<typeof import("node:fs")>();
  return { ...real, fsyncSync: vi.fn(real.fsyncSync), renameSync: vi.fn(real.renameSync) };
});
const { writeFileAtomic } = await import("../../../src/plan/io.ts");

const dir = mkdtempSync(join(tmpdir(), "ampipe-io-test-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe("writeFileAtomic", () => {
  it("writes the whole file, fsyncing it before the rename and the folder after", () => {
    const path = join(dir, "sub", "a.json");
    const fsync = vi.mocked(fs.fsyncSync);
    const rename = vi.mocked(fs.renameSync);
    fsync.mockClear();
    rename.mockClear();
    writeFileAtomic(path, "first\n");
    writeFileAtomic(path, "second\n");
    expect(readFileSync(path, "utf8")).toBe("second\n");
    expect(readdirSync(join(dir, "sub"))).toEqual(["a.json"]);
    // per write: fsync(file), rename, fsync(folder)
    expect(fsync).toHaveBeenCalledTimes(4);
    const order = (i: number) => [fsync.mock.invocationCallOrder[2 * i], rename.mock.invocationCallOrder[i], fsync.mock.invocationCallOrder[2 * i + 1]];
    for (const i of [0, 1]) {
      const [f, r, d] = order(i);
      expect(f).toBeLessThan(r);
      expect(r).toBeLessThan(d);
    }
  });

  it("leaves the old target and no temporary file when the write fails", () => {
    const target = join(dir, "taken");
    mkdirSync(target);
    writeFileSync(join(target, "keep"), "x");
    expect(() => writeFileAtomic(target, "new\n")).toThrow(/EISDIR|ENOTEMPTY|EEXIST|directory/);
    expect(readdirSync(dir).filter((f) => f.startsWith("taken"))).toEqual(["taken"]);
    expect(readFileSync(join(target, "keep"), "utf8")).toBe("x");
  });
});
