// The run directory's bookkeeping: config comparison, metrics.jsonl truncation on resume, and the
// plain-line progress used off a terminal.
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { makeProgress } from "../../../src/train/progress.ts";
import { differingFields, MetricsLog, prepareRunDir } from "../../../src/train/rundir.ts";

const dir = mkdtempSync(join(tmpdir(), "ampipe-rundir-test-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe("run directory", () => {
  it("names every differing field", () => {
    expect(differingFields({ a: 1, b: { c: [1, 2], d: "x" } }, { a: 1, b: { c: [1, 3], e: 0 } })).toEqual(["b.c", "b.d", "b.e"]);
    expect(differingFields({ a: 1 }, { a: 1 })).toEqual([]);
  });

  it("refuses another config, ignores where results go, and --fresh starts over", () => {
    const d = join(dir, "run");
    expect(prepareRunDir(d, { train: { lr: 1 }, run: { output_dir: "a" } }, false)).toBe(false);
    expect(() => prepareRunDir(d, { train: { lr: 2 }, run: { output_dir: "a" } }, false)).toThrow(/differs in train\.lr.*--fresh/);
    expect(() => prepareRunDir(d, { train: { lr: 1 }, run: { output_dir: "b" } }, false)).not.toThrow();
    new MetricsLog(d).append({ kind: "train", step: 1 });
    expect(prepareRunDir(d, { train: { lr: 2 } }, true)).toBe(false);
    expect(new MetricsLog(d).read()).toEqual([]);
    expect(JSON.parse(readFileSync(join(d, "config.json"), "utf8"))).toEqual({ train: { lr: 2 } });
  });

  it("drops the metric lines of steps after the checkpoint a run resumes from, and a line cut by a kill", () => {
    const log = new MetricsLog(join(dir, "run"));
    for (const step of [1, 2, 3, 4]) log.append({ kind: "train", step, loss: step });
    log.append({ kind: "eval", step: 4, loss: 0 });
    writeFileSync(log.path, readFileSync(log.path, "utf8") + '{"kind":"train","st');
    expect(log.truncateAfter(2)).toBe(4);
    expect(log.read().map((l) => l.step)).toEqual([1, 2]);
  });

  it("prints plain progress lines every n updates and at the end when there is no terminal", () => {
    const out: string[] = [];
    const p = makeProgress({ total: 5, format: "loss {loss}", every: 2, tty: false, write: (s) => out.push(s) });
    for (let i = 1; i <= 5; i++) p.update(i, { loss: String(10 - i) });
    p.log("eval");
    p.stop();
    expect(out).toEqual(["[2/5] loss 8\n", "[4/5] loss 6\n", "[5/5] loss 5\n", "eval\n"]);
  });
});
