// The bridge benchmark (`ampipe bench bridge`, src/commands/bench/bridge.ts): the controller <->
// rank round trip (median, p99) and the rate of streamed metric events, plus a slow-controller
// phase showing that a controller which stops reading costs the rank dropped (counted) events,
// not time.
import { quantileSorted } from "simple-statistics";
import { z } from "zod";
import { EmitResultSchema } from "../bridge/builtin.ts";
import type { RankRun } from "../bridge/index.ts";

export interface BridgeBenchOptions { rounds: number; warmup: number; metrics: number; slowMs: number }

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
  const echoed = z.object({ t: z.literal(0) });
  for (let i = 0; i < o.warmup; i++) await run.call(0, "echo", payload, echoed);
  const samples: number[] = [];
  for (let i = 0; i < o.rounds; i++) {
    const t = performance.now();
    await run.call(0, "echo", payload, echoed);
    samples.push((performance.now() - t) * 1000);
  }
  samples.sort((a, b) => a - b);

  let received = 0;
  const off = run.onEvent((e) => { if (e.kind === "metric") received++; });
  const t0 = performance.now();
  const r = await run.call(0, "emit_metrics", { count: o.metrics }, EmitResultSchema);
  const seconds = (performance.now() - t0) / 1000;
  const got = received;

  let slow: BridgeBenchResult["slow_controller"] = null;
  if (o.slowMs > 0) {
    received = 0;
    const pending = run.call(0, "emit_metrics", { count: o.metrics }, EmitResultSchema);
    await new Promise((res) => setTimeout(res, 20)); // the rank has started emitting
    blockEventLoop(o.slowMs);
    const s = await pending;
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
