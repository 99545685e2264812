// `ampipe train` end to end on a tiny config and a tiny dataset: two ranks (EP 2, gloo), the
// pipelined block, metrics.jsonl / tb / checkpoints; resume after kill -9 of every process
// equals an uninterrupted run bitwise; Ctrl-C stops with a checkpoint; bad input exits 2.
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { processesWithEnv } from "../processes.ts";
import { ampipe, tinyConfig, tinyDataset, type Ran } from "./helpers.ts";

const dir = mkdtempSync(join(tmpdir(), "ampipe-train-test-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
const dataPrefix = tinyDataset(dir);
const config = (extra = "") => tinyConfig(dataPrefix, extra);
const configPath = join(dir, "train.yaml");
writeFileSync(configPath, config());

const ranksOf = (pid: number): number[] => processesWithEnv(`AMPIPE_PARENT_PID=${pid}`);
type Line = { kind: string; step: number; loss: number; [k: string]: unknown };
const metrics = (out: string): Line[] =>
  readFileSync(join(out, "metrics.jsonl"), "utf8").trim().split("\n").map((l) => JSON.parse(l) as Line);
const trainLosses = (out: string) => metrics(out).filter((l) => l.kind === "train").map((l) => [l.step, l.loss]);
const evalLosses = (out: string) => metrics(out).filter((l) => l.kind === "eval").map((l) => [l.step, l.loss]);
/**
 * True once metrics.jsonl has a train line for `step` or later. Polled while the run appends, so
 * only complete lines count: the file exists empty between its creation and the first write, and
 * a line may be read half-written.
 */
const reached = (out: string, step: number) => {
  const path = join(out, "metrics.jsonl");
  if (!existsSync(path)) return false;
  const text = readFileSync(path, "utf8");
  return text.slice(0, text.lastIndexOf("\n") + 1).split("\n").filter((l) => l)
    .map((l) => JSON.parse(l) as Line).some((l) => l.kind === "train" && l.step >= step);
};

describe("ampipe train", { timeout: 240_000 }, () => {
  // The uninterrupted run the others are compared with (run once, by whichever test asks first).
  const full = join(dir, "full");
  let fullRun: Promise<Ran> | undefined;
  const uninterrupted = () => (fullRun ??= ampipe(["train", configPath, "--out", full]));

  it("trains the pipelined block on two ranks and writes metrics, TensorBoard events and checkpoints", async () => {
    const ran = await uninterrupted();
    expect(ran.stderr).toBe("");
    expect(ran.code).toBe(0);
    expect(ran.stdout).toMatch(/block: pipelined, interleaved P=2, boundaries \[0, 24, 48\]/);
    expect(ran.stdout).toMatch(/step 24\/24: loss \d/);
    const lines = metrics(full);
    const train = lines.filter((l) => l.kind === "train");
    expect(train.map((l) => l.step)).toEqual([...Array(24).keys()].map((i) => i + 1));
    expect(lines.filter((l) => l.kind === "eval").map((l) => l.step)).toEqual([4, 8, 12, 16, 20, 24]);
    for (const k of ["loss", "lm_loss", "aux_loss", "z_loss", "grad_norm", "lr", "tokens_per_s", "step_ms"]) expect(train[0]).toHaveProperty(k);
    expect(train[23].loss).toBeLessThan(train[0].loss - 0.5);
    expect(readdirSync(join(full, "tb")).some((f) => f.startsWith("events.out.tfevents"))).toBe(true);
    expect(readdirSync(join(full, "checkpoints")).sort()).toEqual([4, 8, 12, 16, 20, 24].map((s) => `step-${String(s).padStart(8, "0")}`));
    expect(readdirSync(join(full, "checkpoints", "step-00000024")).sort()).toEqual(["manifest.json", "rank-00000.pt", "rank-00001.pt"]);
    const summary = JSON.parse(readFileSync(join(full, "train.json"), "utf8"));
    expect(summary).toMatchObject({ format: "ampipe.train", step: 24, stopped: false, block: { pipelined: true, degree: 2 } });
    expect(JSON.parse(readFileSync(join(full, "config.json"), "utf8")).data.path).toBe(dataPrefix);
    expect(JSON.parse(readFileSync(join(full, "plan.json"), "utf8")).boundaries).toEqual([0, 24, 48]);
  });

  it("resumes after kill -9 of the controller and every rank, with the uninterrupted run's losses bitwise", async () => {
    const out = join(dir, "killed");
    let killed: number[] = [];
    const first = await ampipe(["train", configPath, "--out", out], (pid) => {
      const timer = setInterval(() => {
        if (!reached(out, 6)) return;
        clearInterval(timer);
        killed = [pid, ...ranksOf(pid)];
        for (const p of killed) process.kill(p, "SIGKILL");
      }, 20);
    });
    expect(first.code).toBe(null); // killed
    expect(killed.length).toBe(3);
    const again = await ampipe(["train", configPath, "--out", out]);
    expect(again.stderr).toBe("");
    expect(again.code).toBe(0);
    // The killed controller's lock is stale: taken over, saying whose it was.
    expect(again.stdout).toMatch(new RegExp(`ampipe train: took over .* from a run that is gone \\(pid ${first.pid} on `));
    await uninterrupted();
    const from = Number(/resumed from the checkpoint of step (\d+)/.exec(again.stdout)?.[1]);
    expect([4, 8, 12, 16, 20]).toContain(from); // killed at step 6 or soon after, before the end
    expect(trainLosses(out)).toEqual(trainLosses(full)); // every step once, bitwise
    expect(evalLosses(out)).toEqual(evalLosses(full));
    expect(ranksOf(first.pid)).toEqual([]);
  });

  it("skips a checkpoint that lost its manifest, or has a corrupt shard, naming it, and resumes from the one before with the uninterrupted run's losses", async () => {
    const out = join(dir, "nomanifest");
    const eight = ["train", configPath, "--out", out, "--steps", "8"];
    expect((await ampipe(eight)).code).toBe(0);
    const uninterrupted8 = trainLosses(out);
    const step8 = join(out, "checkpoints", "step-00000008");
    rmSync(join(step8, "manifest.json"));
    const again = await ampipe(eight);
    expect(again.code).toBe(0);
    expect(again.stdout).toMatch(/step-00000008: no manifest\.json .*skipped/);
    expect(again.stdout).toMatch(/resumed from the checkpoint of step 4/);
    expect(trainLosses(out)).toEqual(uninterrupted8);
    // A shard flipped on disk: its checksum no longer matches the manifest.
    const shard = join(step8, "rank-00001.pt");
    const bytes = readFileSync(shard);
    bytes[bytes.length >> 1] ^= 0xff;
    writeFileSync(shard, bytes);
    const third = await ampipe(eight);
    expect(third.code).toBe(0);
    expect(third.stdout).toMatch(/step-00000008\/rank-00001\.pt: size or sha256 does not match manifest\.json \(corrupt\); skipped/);
    expect(third.stdout).toMatch(/resumed from the checkpoint of step 4/);
    expect(trainLosses(out)).toEqual(uninterrupted8);
  });

  it("a checkpoint write that fails on one rank (disk full) stops the run naming the file and the errno; the previous checkpoint stays, a rerun resumes", async () => {
    const out = join(dir, "diskfull");
    const ran = await ampipe(["train", configPath, "--out", out], undefined, { AMPIPE_FAULT_CHECKPOINT: "8:1:ENOSPC" });
    expect(ran.code).toBe(1);
    expect(ran.stderr).toMatch(/rank 1: \S*step-00000008\/rank-00001\.pt: ENOSPC \(No space left on device\)\. Its partial files were removed; the newest checkpoint is still \S*step-00000004/);
    expect(readdirSync(join(out, "checkpoints"))).toEqual(["step-00000004"]);
    expect(readdirSync(join(out, "checkpoints", "step-00000004")).sort()).toEqual(["manifest.json", "rank-00000.pt", "rank-00001.pt"]);
    expect(existsSync(join(out, "ampipe.lock"))).toBe(false);
    expect(ranksOf(ran.pid)).toEqual([]);
    const again = await ampipe(["train", configPath, "--out", out]);
    expect(again.code).toBe(0);
    expect(again.stdout).toMatch(/resumed from the checkpoint of step 4\b/);
    await uninterrupted();
    expect(trainLosses(out)).toEqual(trainLosses(full));
    expect(evalLosses(out)).toEqual(evalLosses(full));
  });

  it("refuses a second run on the directory, naming the first; stops after the current step with a checkpoint on Ctrl-C and exits 130", async () => {
    const out = join(dir, "interrupted");
    const args = ["train", configPath, "--out", out, "--steps", "400", "--set", "train.checkpoint_interval=1000"];
    let second: Ran | undefined;
    const ran = await ampipe(args, (pid) => {
      const timer = setInterval(() => {
        if (!reached(out, 3)) return;
        clearInterval(timer);
        // A second run on the same directory while the first trains: refused at once.
        void ampipe(args).then((r) => { second = r; process.kill(pid, "SIGINT"); });
      }, 20);
    });
    expect(second!.code).toBe(2);
    expect(second!.stderr).toMatch(new RegExp(`${out.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")} is in use by another run: pid ${ran.pid} on .*, \`ampipe train .*--steps 400.*\`, since \\d{4}-`));
    expect(second!.stdout).not.toMatch(/ranks ready/);
    expect(ran.stderr).toMatch(/SIGINT: stopping after the current step, with a checkpoint/);
    expect(ran.code).toBe(130);
    expect(existsSync(join(out, "ampipe.lock"))).toBe(false); // released at exit
    const step = Number(/stopped at step (\d+) with a checkpoint/.exec(ran.stdout)?.[1]);
    expect(step).toBeGreaterThanOrEqual(3);
    expect(existsSync(join(out, "checkpoints", `step-${String(step).padStart(8, "0")}`, "manifest.json"))).toBe(true);
    expect(Math.max(...metrics(out).map((l) => l.step))).toBe(step);
    expect(ranksOf(ran.pid)).toEqual([]);
  });

  it("stops after the current step with a checkpoint on SIGTERM and exits 143; a rerun resumes with the uninterrupted run's losses", async () => {
    const out = join(dir, "terminated");
    const ran = await ampipe(["train", configPath, "--out", out], (pid) => {
      const timer = setInterval(() => {
        if (!reached(out, 3)) return;
        clearInterval(timer);
        process.kill(pid, "SIGTERM");
      }, 20);
    });
    expect(ran.stderr).toMatch(/SIGTERM: stopping after the current step, with a checkpoint/);
    expect(ran.code).toBe(143);
    const step = Number(/stopped at step (\d+) with a checkpoint/.exec(ran.stdout)?.[1]);
    expect(step).toBeGreaterThanOrEqual(3);
    expect(existsSync(join(out, "checkpoints", `step-${String(step).padStart(8, "0")}`, "manifest.json"))).toBe(true);
    expect(existsSync(join(out, "ampipe.lock"))).toBe(false);
    expect(ranksOf(ran.pid)).toEqual([]);
    const again = await ampipe(["train", configPath, "--out", out]);
    expect(again.code).toBe(0);
    expect(again.stdout).toMatch(new RegExp(`resumed from the checkpoint of step ${step}\\b`));
    await uninterrupted();
    expect(trainLosses(out)).toEqual(trainLosses(full));
    expect(evalLosses(out)).toEqual(evalLosses(full));
  });

  it("refuses bad input before any rank starts training, naming the problem (exit 2)", async () => {
    const write = (name: string, text: string) => { const p = join(dir, name); writeFileSync(p, text); return p; };
    const unknown = await ampipe(["train", write("unknown.yaml", config("  lr_decay: cosine")), "--out", join(dir, "bad1")]);
    expect(unknown.code).toBe(2);
    expect(unknown.stderr).toMatch(/train\.lr_decay|lr_decay/);
    const missing = await ampipe(["train", configPath, "--out", join(dir, "bad2"), "--set", `data.path=${join(dir, "nothing")}`]);
    expect(missing.code).toBe(2);
    expect(missing.stderr).toMatch(/nothing\.(bin|idx)/);
    const vocab = await ampipe(["train", configPath, "--out", join(dir, "bad3"), "--set", "model.vocab_size=200"]);
    expect(vocab.code).toBe(2);
    expect(vocab.stderr).toMatch(/model\.vocab_size: 200 is too small .*256/);
    const batch = await ampipe(["train", configPath, "--out", join(dir, "bad4"), "--set", "train.global_batch_size=6"]);
    expect(batch.code).toBe(2);
    expect(batch.stderr).toMatch(/train\.global_batch_size: must be a multiple of/);
    // A run directory that holds another config's run.
    await uninterrupted();
    const other = await ampipe(["train", configPath, "--out", full, "--set", "train.lr=1e-3"]);
    expect(other.code).toBe(2);
    expect(other.stderr).toMatch(/holds a run with another config \(differs in train\.lr\).*--fresh/);
    for (const r of [unknown, missing, vocab, batch, other]) expect(r.stdout).not.toMatch(/ranks ready/);
  });
});
