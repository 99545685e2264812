// The results of the commands every rank has (py/ampipe/worker/builtin.py), as zod schemas: what
// `ampipe ping` and `ampipe bench bridge` check on receipt.
import { z } from "zod";

/** `ping`: an all_reduce and an all_to_all_single, each checked on the rank. */
export const PingResultSchema = z.object({
  rank: z.int(),
  pid: z.int(),
  host: z.string(),
  backend: z.string().nullable(),
  device: z.string(),
  all_reduce: z.object({ ok: z.boolean(), value: z.number(), expected: z.number(), seconds: z.number() }),
  all_to_all: z.object({ ok: z.boolean(), received: z.array(z.number()), expected: z.array(z.number()), seconds: z.number() }),
});
export type PingResult = z.output<typeof PingResultSchema>;

/** `emit_metrics`: how many metric events the rank sent and how many it had to drop. */
export const EmitResultSchema = z.object({ count: z.int(), dropped: z.int(), seconds: z.number() });
export type EmitResult = z.output<typeof EmitResultSchema>;


/** What a round of pings got wrong, one line each (empty: every rank's collectives checked out). */
export function pingProblems(results: PingResult[], worldSize: number): string[] {
  const problems: string[] = [];
  results.forEach((r, i) => {
    if (r.rank !== i) problems.push(`rank ${i} answered as rank ${r.rank}`);
    if (!r.all_reduce.ok) problems.push(`rank ${i}: all_reduce gave ${r.all_reduce.value}, expected ${r.all_reduce.expected}`);
    if (!r.all_to_all.ok) {
      problems.push(`rank ${i}: all_to_all_single received [${r.all_to_all.received}], expected [${r.all_to_all.expected}]`);
    }
  });
  if (results.length !== worldSize) problems.push(`${results.length} of ${worldSize} ranks answered`);
  return problems;
}
