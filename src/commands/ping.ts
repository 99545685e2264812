// `ampipe ping --ranks N`: every rank initialises torch.distributed, runs an all_reduce and
// an all_to_all_single and checks them; the controller prints the results with the round trip.
import { Command } from "commander";
import { PingResultSchema, pingProblems, type PingResult } from "../bridge/builtin.ts";
import { closeOnSignals, type RankRun } from "../bridge/index.ts";
import { startRun } from "../bridge/start.ts";
import { addRunOptions, nonNegative, reportFailure, type RunCliOptions } from "./options.ts";

export function register(program: Command): void {
  addRunOptions(program.command("ping"))
    .description("check the ranks and torch.distributed: all_reduce + all_to_all_single on every rank")
    .option("--seconds <s>", "keep pinging for this long (try faults by hand meanwhile)", nonNegative, 0)
    .option("--json", "print one JSON object per round")
    .action(async (o: RunCliOptions & { seconds: number; json?: boolean }) => {
      let run: RankRun | undefined;
      try {
        const t0 = performance.now();
        run = await startRun(o);
        const startup = performance.now() - t0;
        closeOnSignals(run);
        const r0 = run.ranks[0];
        if (!o.json) {
          console.log(`${run.worldSize} ranks ready in ${(startup / 1000).toFixed(2)} s ` +
            `(torch ${r0.torch}, ${r0.backend} on ${r0.device}; controller ${run.controller.endpoint})`);
        }
        const end = Date.now() + o.seconds * 1000;
        let seq = 0;
        let failed = false;
        do {
          const t = performance.now();
          const results = await run.broadcastAs("ping", { seq }, PingResultSchema);
          const rttMs = performance.now() - t;
          const problems = pingProblems(results, run.worldSize);
          if (o.json) {
            console.log(JSON.stringify({ seq, rtt_ms: rttMs, ok: problems.length === 0, problems, results }));
          } else {
            const okIf = (op: "all_reduce" | "all_to_all") => (results.every((r) => r[op].ok) ? "ok" : "FAILED");
            console.log(`ping ${seq}: all_reduce ${okIf("all_reduce")} (sum ${results[0].all_reduce.value}), ` +
              `all_to_all_single ${okIf("all_to_all")}, round trip ${rttMs.toFixed(2)} ms ` +
              `(slowest rank: all_reduce ${ms(results, "all_reduce")} ms, all_to_all ${ms(results, "all_to_all")} ms)`);
            for (const p of problems) console.log(`  ${p}`);
          }
          if (problems.length) failed = true;
          seq++;
          if (Date.now() < end) await new Promise((r) => setTimeout(r, 200));
        } while (Date.now() < end && !failed);
        if (failed) process.exitCode = 1;
      } catch (e) {
        reportFailure(e);
      } finally {
        await run?.close();
      }
    });
}

function ms(results: PingResult[], op: "all_reduce" | "all_to_all"): string {
  return (Math.max(...results.map((r) => r[op].seconds)) * 1000).toFixed(2);
}
