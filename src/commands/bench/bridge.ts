// `ampipe bench bridge`: the bridge benchmark (src/bench/bridge.ts), its options and its report.
import type { Command } from "commander";
import { benchBridge, type BridgeBenchOptions } from "../../bench/bridge.ts";
import { closeOnSignals, launchRanks, type RankRun } from "../../bridge/index.ts";
import { nonNegative, positiveInt, reportFailure } from "../options.ts";

export function register(bench: Command): void {
  bench
    .command("bridge")
    .description("controller <-> rank round trip (median, p99) and streamed metric rate over loopback")
    .option("--rounds <n>", "round trips to time", positiveInt, 2000)
    .option("--warmup <n>", "untimed round trips first", positiveInt, 200)
    .option("--metrics <n>", "metric events to stream", positiveInt, 200_000)
    .option("--slow-ms <ms>", "block the controller this long while a rank streams (0: skip)", nonNegative, 1000)
    .option("--json", "print the result as JSON")
    .action(async (o: BridgeBenchOptions & { json?: boolean }) => {
      let run: RankRun | undefined;
      try {
        run = await launchRanks({ worldSize: 1, dist: false, threads: 1 });
        closeOnSignals(run);
        const r = await benchBridge(run, o);
        if (o.json) {
          console.log(JSON.stringify(r, null, 2));
          return;
        }
        const rt = r.round_trip_us;
        const m = r.metrics;
        console.log(`round trip (echo, ${rt.rounds} rounds): median ${rt.median.toFixed(0)} us, p99 ${rt.p99.toFixed(0)} us, ` +
          `mean ${rt.mean.toFixed(0)} us, min ${rt.min.toFixed(0)} us`);
        console.log(`metric stream: ${m.received} of ${m.count} events received in ${m.seconds.toFixed(3)} s = ` +
          `${Math.round(m.per_second).toLocaleString("en-US")} events/s (rank dropped ${m.dropped})`);
        if (r.slow_controller) {
          const s = r.slow_controller;
          console.log(`slow controller (event loop blocked ${s.blocked_ms} ms): the rank emitted ${s.count} events in ` +
            `${s.rank_seconds.toFixed(3)} s (unblocked: ${s.rank_seconds_unblocked.toFixed(3)} s); ` +
            `${s.received} received, ${s.dropped} dropped and counted`);
        }
      } catch (e) {
        reportFailure(e);
      } finally {
        await run?.close();
      }
    });
}
