// `ampipe bench bridge`: the controller <-> rank round trip (median, p99) and the rate of
// streamed metric events, plus a slow-controller phase showing that a controller which
// stops reading costs the rank dropped (counted) events, not time.
import { Command } from "commander";
import { quantileSorted } from "simple-statistics";
import { closeOnSignals, launchRanks, type RankRun } from "../bridge/index.ts";
import { nonNegative, positiveInt, reportFailure } from "../commands/ping.ts";

export interface BridgeBenchOptions { rounds: number; warmup: number; metrics: number; slowMs: number }

interface EmitResult { count: number; dropped: number; seconds: number }

export interface BridgeBenchResult {
  round_trip_us: { median: number; p99: number; mean: number; min: number; rounds: number };
  metrics: { count: number; received: number; dropped: number; seconds: number; per_second: number; rank_seconds: number };
  slow_controller: {
    blocked_ms: number; count: number; received: number; dropped: number;
    rank_seconds: number; rank_seconds_unblocked: number;
  } | null;
}

function blockEventLoop(ms: number): void {
  const end = performance.now() + ms;
  while (performance.now() < end) { /* a controller busy elsewhere */ }
}

export async function benchBridge(run: RankRun, o: BridgeBenchOptions): Promise<BridgeBenchResult> {
  const payload = { t: 0 };
  for (let i = 0; i < o.warmup; i++) await run.request(0, "echo", payload);
  const samples: number[] = [];
  for (let i = 0; i < o.rounds; i++) {
    const t = performance.now();
    await run.request(0, "echo", payload);
    samples.push((performance.now() - t) * 1000);
  }
  samples.sort((a, b) => a - b);

  let received = 0;
  const off = run.onEvent((e) => { if (e.kind === "metric") received++; });
  const t0 = performance.now();
  const r = (await run.request(0, "emit_metrics", { count: o.metrics })) as EmitResult;
  const seconds = (performance.now() - t0) / 1000;
  const got = received;

  let slow: BridgeBenchResult["slow_controller"] = null;
  if (o.slowMs > 0) {
    received = 0;
    const pending = run.request(0, "emit_metrics", { count: o.metrics });
    await new Promise((res) => setTimeout(res, 20)); // the rank has started emitting
    blockEventLoop(o.slowMs);
    const s = (await pending) as EmitResult;
    slow = {
      blocked_ms: o.slowMs, count: s.count, received, dropped: s.dropped,
      rank_seconds: s.seconds, rank_seconds_unblocked: r.seconds,
    };
  }
  off();
  return {
    round_trip_us: {
      median: quantileSorted(samples, 0.5), p99: quantileSorted(samples, 0.99),
      mean: samples.reduce((a, b) => a + b, 0) / samples.length, min: samples[0], rounds: samples.length,
    },
    metrics: { count: r.count, received: got, dropped: r.dropped, seconds, per_second: got / seconds, rank_seconds: r.seconds },
    slow_controller: slow,
  };
}

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
