// Rank command results, typed: each command's result has a zod schema (beside the code that uses
// it), checked on receipt by `RankRun.call`/`callAll`/`broadcastAs`; a result of another shape is a
// `ResultError` naming the rank, the command and each field at fault, never a cast.
import { z } from "zod";
import { ResultError } from "./errors.ts";

/** Checks one rank's result of `command` against `schema`; returns the parsed value. */
export function checkResult<S extends z.ZodType>(schema: S, value: unknown, command: string, rank: number): z.output<S> {
  const r = schema.safeParse(value);
  if (r.success) return r.data;
  throw new ResultError(command, rank, r.error.issues.slice(0, 8).map((i) =>
    `${i.path.length ? i.path.map(String).join(".") : "(the result)"}: ${i.message}`));
}

/** A number as Python sends it: Infinity and NaN included (zod's number refuses both). */
export const anyNumber = z.custom<number>((v) => typeof v === "number", { message: "expected a number" });
/** `{op id: ms}` of one pass. */
export const msById = z.record(z.string(), z.number());
/** Per-op times of both passes, keyed by op id. */
export const opTimesMs = z.object({ forward: msById, backward: msById });
