// Views of a simulated plan: a Chrome trace (opens in Perfetto / chrome://tracing) and a compact
// per-stream text timeline for the terminal.
import type { Plan } from "./ir.ts";
import type { PassResult, SimResult } from "./simulate.ts";

interface TraceEvent {
  name: string;
  ph: string;
  pid: number;
  tid: number;
  ts?: number;
  dur?: number;
  cat?: string;
  id?: number;
  bp?: string;
  args?: Record<string, unknown>;
}

export interface ChromeTrace {
  traceEvents: TraceEvent[];
  displayTimeUnit: "ms";
  metadata: Record<string, unknown>;
}

/**
 * One process ("ampipe <variant> P=<P>"), one thread per stream plus a "pass" track; the backward
 * follows the forward in time. Cross-stream deps are drawn as flow arrows. Times are in µs.
 */
export function chromeTrace(plan: Plan, sim: SimResult, label = "predicted"): ChromeTrace {
  const pid = 1;
  const tid = new Map(plan.streams.map((s, i) => [s.name, i + 1] as const));
  const events: TraceEvent[] = [
    { name: "process_name", ph: "M", pid, tid: 0, args: { name: `ampipe ${plan.variant} P=${plan.boundaries.length - 1} (${label})` } },
    { name: "thread_name", ph: "M", pid, tid: 0, args: { name: "pass" } },
    { name: "thread_sort_index", ph: "M", pid, tid: 0, args: { sort_index: 0 } },
  ];
  for (const s of plan.streams) {
    events.push({ name: "thread_name", ph: "M", pid, tid: tid.get(s.name)!, args: { name: `${s.name} (${s.kind})` } });
    events.push({ name: "thread_sort_index", ph: "M", pid, tid: tid.get(s.name)!, args: { sort_index: tid.get(s.name)! } });
  }
  let flowId = 0;
  const us = (ms: number) => Math.round(ms * 1e6) / 1e3;
  const addPass = (name: "forward" | "backward", r: PassResult, offsetMs: number) => {
    events.push({ name, ph: "X", pid, tid: 0, ts: us(offsetMs), dur: us(r.makespanMs), cat: "pass", args: { makespan_ms: r.makespanMs } });
    const critical = new Set(r.criticalPath);
    const byId = new Map(r.ops.map((o) => [o.id, o] as const));
    const ops = plan[name];
    r.ops.forEach((o, i) => {
      events.push({
        name: o.chunk === null ? o.kind : `${o.kind} ${o.chunk}`,
        ph: "X", pid, tid: tid.get(o.stream)!, ts: us(offsetMs + o.startMs), dur: us(o.endMs - o.startMs), cat: name,
        args: { id: o.id, kind: o.kind, chunk: o.chunk, deps: ops[i].deps, solo_ms: o.costMs, critical: critical.has(o.id) },
      });
      for (const d of ops[i].deps) {
        const from = byId.get(d)!;
        if (from.stream === o.stream) continue;
        flowId++;
        events.push({ name: "dep", ph: "s", pid, tid: tid.get(from.stream)!, ts: us(offsetMs + from.endMs), id: flowId, cat: "dep" });
        events.push({ name: "dep", ph: "f", bp: "e", pid, tid: tid.get(o.stream)!, ts: us(offsetMs + o.startMs), id: flowId, cat: "dep" });
      }
    });
  };
  addPass("forward", sim.forward, 0);
  addPass("backward", sim.backward, sim.forward.makespanMs);
  return {
    traceEvents: events,
    displayTimeUnit: "ms",
    metadata: { variant: plan.variant, boundaries: plan.boundaries, total_ms: sim.totalMs, source: label },
  };
}

const LETTER: Record<string, string> = {
  qkv: "q", attn: "a", proj: "p", route: "r", counts: "n", dispatch: "d", experts: "e", combine: "c", unpermute: "u", aux_loss: "x", shared: "s",
};

/** One line per stream: each op drawn with its kind's letter, upper case on odd chunks; '.' is idle. */
export function textTimeline(plan: Plan, r: PassResult, width = 72): string[] {
  const scale = r.makespanMs > 0 ? width / r.makespanMs : 0;
  const nameWidth = Math.max(...plan.streams.map((s) => s.name.length));
  return plan.streams.map((s) => {
    const row = new Array<string>(width).fill(".");
    for (const o of r.ops) {
      if (o.stream !== s.name) continue;
      const letter = LETTER[o.kind.replace(/_bwd$/, "")] ?? "?";
      const ch = o.chunk !== null && o.chunk % 2 === 1 ? letter.toUpperCase() : letter;
      const from = Math.floor(o.startMs * scale);
      const to = Math.max(from + (o.endMs > o.startMs ? 1 : 0), Math.round(o.endMs * scale));
      for (let x = from; x < Math.min(to, width); x++) row[x] = ch;
    }
    return `${s.name.padEnd(nameWidth)} |${row.join("")}|`;
  });
}

export const TIMELINE_LEGEND =
  "q qkv  a attn  p proj  r route  n counts  d dispatch  e experts  c combine  s shared  u unpermute  x aux_loss  " +
  "(upper case: odd chunks; '.': idle)";
