// Rank command results are checked on receipt against their schema: a result of another shape
// is a ResultError naming the rank, the command and each field at fault, and fails the request.
import { describe, expect, it } from "vitest";
import { z } from "zod";
import { PingResultSchema } from "../../../src/bridge/builtin.ts";
import { ResultError, checkResult } from "../../../src/bridge/index.ts";
import { RankResultSchema } from "../../../src/run/run-block.ts";
import { launchQuiet } from "./helpers.ts";

describe("typed rank results", () => {
  it("name the rank, the command and each field at fault", () => {
    const ping = { rank: 1, pid: 7, host: "h", backend: "gloo", device: "cpu",
      all_reduce: { ok: true, value: 3, expected: 3, seconds: 0.1 }, all_to_all: { ok: true, received: [1], expected: [1], seconds: 0.1 } };
    expect(checkResult(PingResultSchema, ping, "ping", 1)).toEqual(ping);
    let err: unknown;
    try {
      checkResult(PingResultSchema, { ...ping, all_reduce: { ...ping.all_reduce, ok: "yes" }, pid: undefined }, "ping", 1);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(ResultError);
    const e = err as ResultError;
    expect(e.rank).toBe(1);
    expect(e.command).toBe("ping");
    expect(e.message).toMatch(/^rank 1: command 'ping' returned a result of another shape/);
    expect(e.issues.join("\n")).toMatch(/pid: .*expected number/);
    expect(e.issues.join("\n")).toMatch(/all_reduce\.ok: .*expected boolean/);
    // run_block's differences may be inf (a tensor missing on one side): a number all the same
    const equivalence = RankResultSchema.shape.equivalence;
    expect(equivalence.parse({ largest_relative_differences: { y: Infinity }, worst: ["y", Infinity], tolerance: 1e-5, ok: false })
      .largest_relative_differences.y).toBe(Infinity);
    expect(equivalence.safeParse({ largest_relative_differences: { y: "1e-7" }, worst: ["y", 0], tolerance: 1e-5, ok: true }).success).toBe(false);
  });

  it("fail the request when a rank's result has another shape", async () => {
    const run = await launchQuiet({ worldSize: 1, dist: false });
    try {
      await expect(run.call(0, "echo", { t: 1 }, z.object({ t: z.number() }))).resolves.toEqual({ t: 1 });
      await expect(run.call(0, "echo", { t: "one" }, z.object({ t: z.number() })))
        .rejects.toThrow(/rank 0: command 'echo' returned a result of another shape[\s\S]*t: .*expected number/);
      await expect(run.callAll("echo", { t: 2 }, z.object({ t: z.number() }))).resolves.toEqual([{ t: 2 }]);
    } finally {
      await run.close();
    }
  });
});
