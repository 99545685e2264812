// `ampipe bench bridge` runs and its numbers are consistent (speed itself is not tested).
import { spawnSync } from "node:child_process";
import { join } from "node:path";
import { describe, expect, it } from "vitest";

const root = join(import.meta.dirname, "..", "..", "..");

describe("ampipe bench bridge", () => {
  it("reports round trips and a metric stream in which every event is received or counted as dropped", () => {
    const r = spawnSync(process.execPath, [join(root, "bin", "ampipe.js"), "bench", "bridge", "--json",
      "--rounds", "50", "--warmup", "5", "--metrics", "5000", "--slow-ms", "200"], { encoding: "utf8", timeout: 60_000 });
    expect(r.status, r.stderr).toBe(0);
    const out = JSON.parse(r.stdout);
    expect(out.round_trip_us.rounds).toBe(50);
    expect(out.round_trip_us.median).toBeGreaterThan(0);
    expect(out.round_trip_us.p99).toBeGreaterThanOrEqual(out.round_trip_us.median);
    expect(out.metrics.count).toBe(5000);
    expect(out.metrics.received + out.metrics.dropped).toBe(5000);
    expect(out.slow_controller.received + out.slow_controller.dropped).toBe(5000);
  });
});
