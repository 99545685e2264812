// ampipe report on a synthetic bench directory (goals judged with their numbers, what is missing
// named) and the page itself: self-contained, and drawn by a real browser where one is installed.
import { execFileSync, spawnSync } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { reportCommand } from "../../../src/commands/report.ts";
import { makePlan } from "../../../src/plan/generators.ts";
import { simulatePlan } from "../../../src/plan/simulate.ts";
import { chromeTrace } from "../../../src/plan/trace.ts";
import { buildBenchReport } from "../../../src/report/bench.ts";
import { renderReport } from "../../../src/report/html.ts";
import { mdTable } from "../../../src/report/markdown.ts";
import type { CaseResult } from "../../../src/sweep/results.ts";
import { smallDims } from "../plan/helpers.ts";

const root = mkdtempSync(join(tmpdir(), "ampipe-report-test-"));
afterAll(() => rmSync(root, { recursive: true, force: true }));

const base = (over: Partial<CaseResult>): CaseResult => ({
  case: "", group: "s64-r0.5", model: null, seq_length: 64, comm_compute_ratio: 0.5, comm_compute_measured: 0.5, source: "grid", variant: "grouped", degree: 2, boundaries: [0, 32, 64],
  status: "ok", error: null, interconnect: "emulated", emulated: "emulated 8-way all-to-all (100 us + bytes / 0.1 GB/s)", bandwidth_gbps: 0.1,
  measured_ms: 10, measured_q1_ms: 9.5, measured_q3_ms: 10.5, baseline_ms: 13, baseline_q1_ms: 12.5, baseline_q3_ms: 13.5,
  predicted_ms: 10.5, predicted_baseline_ms: 13, prediction_error: 0.05, speedup: 1.3, speedup_q1: 1.25, speedup_q3: 1.35,
  speedup_vs_moe_overlap: null, moe_overlap_reference: null, overlap_efficiency: 0.8, ideal_bound_ms: 9, replayed_ms: 9.5,
  equivalence_ok: true, largest_relative_difference: 1e-7, steps: 4, trace: null, samples: [], elapsed_s: 1, finished: "2026-12-01T00:00:00Z", ...over,
});

/** A bench directory as ampipe bench leaves it, with chosen figures. */
function fakeRun(name: string, results: CaseResult[], cases: string[]): string {
  const dir = join(root, name);
  mkdirSync(join(dir, "traces"), { recursive: true });
  const plan = makePlan("grouped", smallDims({ seq_length: 64 }), { degree: 2 });
  const sim = simulatePlan(plan, (op) => (op.kind.startsWith("attn") ? 2 : 1));
  for (const r of results) {
    if (r.status !== "ok") continue;
    r.trace = `traces/${r.case}.trace.json`;
    writeFileSync(join(dir, r.trace), JSON.stringify(chromeTrace(plan, sim, "test")));
  }
  writeFileSync(join(dir, "bench.json"), JSON.stringify({
    format: "ampipe.bench", version: 1, fingerprint: "x", config_path: "test.yaml", cases, groups: {}, created: "2026-12-01T00:00:00Z", device: "cpu",
    settings: { steps: 4, seq_lengths: [64], comm_compute_ratios: [0.5] }, config: { model: {}, parallelism: { device: "cpu" } },
  }));
  writeFileSync(join(dir, "results.jsonl"), results.map((r) => JSON.stringify(r) + "\n").join(""));
  writeFileSync(join(dir, "calibration.json"), JSON.stringify({ format: "ampipe.calibration", version: 1, runs: [] }));
  return dir;
}

const complete = () => [
  base({ case: "s64-r0.5-moe-overlap-p2", source: "moe-overlap", variant: "moe-overlap", speedup: 1.1, prediction_error: -0.02 }),
  base({ case: "s64-r0.5-grouped-p2", speedup: 1.4, prediction_error: 0.08 }),
  base({ case: "s64-r0.5-planner", source: "planner", speedup: 1.38, prediction_error: -0.15 }),
];

describe("ampipe report (bench)", () => {
  it("judges each goal with its numbers and writes both files", () => {
    const rs = complete();
    const dir = fakeRun("complete", rs, rs.map((r) => r.case));
    const r = buildBenchReport(dir);
    expect(r.missing).toEqual([]);
    expect(r.summary).toMatch(/\*\*MISSED\*\* — predicted time within 10% of measured.*2 of 3 cases within 10%.*worst -15\.0% \(s64-r0\.5-planner\)/);
    // the planner: 1.40 / 1.38 - 1 = 1.4% slower than the best: within 3%
    expect(r.summary).toMatch(/\*\*MET\*\* — planner's choice within 3%.*s64-r0\.5: 1\.4% slower than s64-r0\.5-grouped-p2/);
    // 1.38 over sequential, 1.38 / 1.10 = 1.255 over moe-overlap
    expect(r.summary).toMatch(/\*\*MET\*\* — average speed-up.*1\.380x over sequential, 1\.255x over the best moe-overlap/);
    expect(r.headline).toHaveLength(3);
    expect(r.headline[2]).toMatch(/3 of 3 cases finished \(0 failed\); equivalence PASS in every finished case; EMULATED/);
    const lines: string[] = [];
    expect(reportCommand(dir, {}, { line: (s) => lines.push(s) })).toBe(0);
    expect(lines[0]).toBe(`wrote ${join(dir, "summary.md")} and ${join(dir, "report.html")} (opens offline)`);
    expect(lines.slice(1)).toEqual(r.headline);
  });

  it("says what a partial directory lacks: cases not run, failed cases, traces", () => {
    const rs = complete();
    rs[1] = base({ case: "s64-r0.5-grouped-p2", status: "error", error: "rank failure: rank 1 was killed by SIGKILL", speedup: null, measured_ms: null });
    const dir = fakeRun("partial", rs, [...rs.map((r) => r.case), "s64-r0.5-interleaved-p2"]);
    rmSync(join(dir, "traces", "s64-r0.5-planner.trace.json"));
    const r = buildBenchReport(dir);
    expect(r.missing.join("\n")).toContain("1 of 4 cases have no result");
    expect(r.missing.join("\n")).toContain("s64-r0.5-interleaved-p2");
    expect(r.missing.join("\n")).toContain("1 case(s) failed: s64-r0.5-grouped-p2 (rank failure: rank 1 was killed by SIGKILL)");
    expect(r.missing.join("\n")).toContain("trace of s64-r0.5-planner is missing");
    expect(r.summary).toContain("## Missing");
    expect(renderReport(r.doc)).toContain("This run is incomplete:");
  });

  it("refuses a directory that is not a bench run, naming what is missing", () => {
    const err: string[] = [];
    const write = process.stderr.write;
    process.stderr.write = ((s: string) => (err.push(s), true)) as typeof process.stderr.write;
    try {
      expect(reportCommand(join(root, "nope"))).toBe(2);
      mkdirSync(join(root, "empty"));
      expect(reportCommand(join(root, "empty"))).toBe(2);
    } finally {
      process.stderr.write = write;
    }
    expect(err.join("")).toContain("nope: no such directory");
    expect(err.join("")).toContain("not an ampipe bench directory: bench.json and results.jsonl are missing");
  });
});

describe("the report page", () => {
  const doc = {
    title: "t </script><b>",
    sections: [{ title: "s", text: ["<i>escaped</i>"], charts: [{ title: "c", spec: { data: { values: [{ a: 1, b: "</script>" }] }, mark: "bar", encoding: { x: { field: "a", type: "quantitative" }, y: { field: "b", type: "nominal" } } } }],
      tables: [{ columns: [{ key: "a", label: "A" }], rows: [{ a: 1.23456 }, { a: null }] }] }],
  };

  it("is self-contained: the charting libraries inlined, nothing fetched, text and data escaped", () => {
    const html = renderReport(doc);
    expect(html).not.toMatch(/<script[^>]*\ssrc=/i);
    expect(html).not.toMatch(/<link\b/i);
    expect(html).toMatch(/<script>\/\* vega \d+\.\d+\.\d+ \*\//);
    expect(html).toMatch(/<script>\/\* vega-lite \d+/);
    expect(html).toMatch(/<script>\/\* vega-embed \d+/);
    expect(html).toContain("<title>t &lt;/script&gt;&lt;b&gt;</title>");
    expect(html).toContain("&lt;i&gt;escaped&lt;/i&gt;");
    expect(html.match(/<\/script>/g)!.length).toBe(html.match(/<script[\s>]/g)!.length); // no early close
    expect(html).toContain("<td>1.235</td><");
    expect(html).toContain("<td>–</td>");
  });

  it("writes markdown tables with escaped cells", () => {
    expect(mdTable(["a", "b"], [["x|y", 0.123456]])).toBe("| a | b |\n| --- | ---: |\n| x\\|y | 0.1235 |\n");
  });

  const browser = ["chromium", "chromium-browser", "google-chrome", "google-chrome-stable"].map((b) => {
    const r = spawnSync("/bin/sh", ["-c", `command -v ${b}`], { encoding: "utf8" });
    return r.status === 0 ? r.stdout.trim() : null;
  }).find((b) => b) ?? process.env.AMPIPE_BROWSER ?? null;
  if (!browser) console.warn("report page browser test skipped: no headless Chromium found (install chromium, or set AMPIPE_BROWSER)");

  it.skipIf(!browser)("loads in headless Chromium with no error and draws every chart", () => {
    const rs = complete();
    const dir = fakeRun("browser", rs, rs.map((r) => r.case));
    expect(reportCommand(dir, {}, { line: () => {} })).toBe(0);
    const page = join(dir, "report.html");
    expect(existsSync(page)).toBe(true);
    const args = ["--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=20000", "--dump-dom", `file://${page}`];
    const r = spawnSync(browser!, args, { encoding: "utf8", timeout: 90_000 });
    expect(r.status, r.stderr).toBe(0);
    const body = r.stdout.match(/<body\s[^>]*>/)![0]; // (the libraries hold a bare "<body>" string)
    expect(body, body).toContain('data-status="ok"');
    expect(body).toContain('data-errors="0"');
    const charts = Number(body.match(/data-charts="(\d+)"/)![1]);
    expect(charts).toBe(5); // two speed-up charts, measured vs predicted, the timeline, overlap efficiency
    // vega-embed draws each chart as an SVG with marks in it
    const svgs = r.stdout.match(/<svg[^>]*class="marks"/g) ?? [];
    expect(svgs.length).toBe(charts);
    const consoleLines = r.stderr.split("\n").filter((l) => l.includes(":CONSOLE"));
    expect(consoleLines.filter((l) => /error|uncaught|warn/i.test(l))).toEqual([]);
    // nothing but the page itself was loaded
    expect(readFileSync(page, "utf8")).not.toMatch(/https?:\/\/[^"'\s]*\.(js|css)\b["']/);
  }, 120_000);
});
