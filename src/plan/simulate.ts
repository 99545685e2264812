// Discrete-event simulation of a plan over its streams. Each op starts when it heads its stream
// and all its deps have finished; its duration is its solo cost, stretched while it shares the
// device: ops on several streams of one kind share that resource equally (processor sharing),
// and compute and communication slow each other by the overlap factor while both are active
// (copy engines and NCCL kernels take SMs and memory bandwidth; on CPU the comm thread takes a core).
import type { Op, Plan } from "./ir.ts";

export type PassName = "forward" | "backward";

export interface OverlapSlowdown {
  /** Factor (>= 1) by which compute ops slow down while a comm op is active. */
  compute: number;
  /** Factor (>= 1) by which comm ops slow down while a compute op is active. */
  comm: number;
}

export interface SimOptions {
  /** Compute/comm overlap slowdown: one factor for both, or one each. Default 1 (no slowdown). */
  overlapSlowdown?: number | OverlapSlowdown;
}

export interface OpTiming {
  id: string;
  kind: Op["kind"];
  chunk: number | null;
  stream: string;
  /** Solo cost in ms (what the cost model gave). */
  costMs: number;
  startMs: number;
  endMs: number;
}

export interface StreamUsage {
  name: string;
  kind: "compute" | "comm";
  busyMs: number;
  idleMs: number;
}

export interface PassResult {
  makespanMs: number;
  ops: OpTiming[];
  streams: StreamUsage[];
  /** Op ids of a longest chain of back-to-back ops (each started when its predecessor ended). */
  criticalPath: string[];
}

export interface SimResult {
  forward: PassResult;
  backward: PassResult;
  /** Forward + backward makespan: the backward starts once the forward is done. */
  totalMs: number;
}

/** Per-op solo cost in ms: a map from op id or a function. */
export type OpCosts = ReadonlyMap<string, number> | Record<string, number> | ((op: Op, pass: PassName) => number);

function costOf(costs: OpCosts, op: Op, pass: PassName): number {
  let v: number | undefined;
  if (typeof costs === "function") v = costs(op, pass);
  else if (costs instanceof Map) v = costs.get(op.id);
  else v = (costs as Record<string, number>)[op.id];
  if (v === undefined) throw new Error(`no cost for op ${op.id}`);
  if (!Number.isFinite(v) || v < 0) throw new Error(`cost of op ${op.id} must be a finite number >= 0, got ${v}`);
  return v;
}

export function resolveSlowdown(s: SimOptions["overlapSlowdown"]): OverlapSlowdown {
  const r = typeof s === "number" ? { compute: s, comm: s } : (s ?? { compute: 1, comm: 1 });
  for (const [k, v] of Object.entries(r))
    if (!Number.isFinite(v) || v < 1) throw new Error(`overlapSlowdown.${k} must be a number >= 1, got ${v}`);
  return r;
}

/** Simulates one op list. The plan is assumed valid (check.ts): deps name earlier ops. */
export function simulatePass(plan: Plan, pass: PassName, costs: OpCosts, opts: SimOptions = {}): PassResult {
  const slow = resolveSlowdown(opts.overlapSlowdown);
  const ops = plan[pass];
  const kindOf = new Map(plan.streams.map((s) => [s.name, s.kind] as const));
  const index = new Map(ops.map((o, i) => [o.id, i] as const));
  const queues = new Map<string, number[]>(plan.streams.map((s) => [s.name, []]));
  ops.forEach((o, i) => {
    const q = queues.get(o.stream);
    if (!q) throw new Error(`${pass} op ${o.id}: unknown stream "${o.stream}"`);
    q.push(i);
  });
  const cost = ops.map((o) => costOf(costs, o, pass));
  const start = new Array<number>(ops.length).fill(NaN);
  const end = new Array<number>(ops.length).fill(NaN);
  const remaining = [...cost];
  const head = new Map<string, number>(plan.streams.map((s) => [s.name, 0]));
  const running = new Set<number>();
  const busyStream = new Set<string>();
  const deps = ops.map((o) => o.deps.map((d) => {
    const j = index.get(d);
    if (j === undefined) throw new Error(`${pass} op ${o.id}: unknown dep "${d}"`);
    return j;
  }));
  let done = 0;
  let t = 0;
  const EPS = 1e-12;
  while (done < ops.length) {
    // Start every op that heads an idle stream and whose deps have finished.
    for (const [name, q] of queues) {
      if (busyStream.has(name)) continue;
      const h = head.get(name)!;
      if (h >= q.length) continue;
      const i = q[h];
      if (deps[i].every((j) => end[j] <= t)) {
        start[i] = t;
        running.add(i);
        busyStream.add(name);
        head.set(name, h + 1);
      }
    }
    if (running.size === 0) {
      const stuck = [...queues].filter(([n, q]) => head.get(n)! < q.length).map(([n, q]) => ops[q[head.get(n)!]].id);
      throw new Error(`${pass}: deadlock, nothing can start (waiting: ${stuck.join(", ")})`);
    }
    // Rates under processor sharing and the overlap slowdown.
    let nCompute = 0;
    let nComm = 0;
    for (const i of running) (kindOf.get(ops[i].stream) === "comm" ? nComm++ : nCompute++);
    const rate = (i: number) =>
      kindOf.get(ops[i].stream) === "comm"
        ? 1 / nComm / (nCompute > 0 ? slow.comm : 1)
        : 1 / nCompute / (nComm > 0 ? slow.compute : 1);
    let dt = Infinity;
    for (const i of running) dt = Math.min(dt, remaining[i] / rate(i));
    const rates = new Map([...running].map((i) => [i, rate(i)] as const));
    t += dt;
    for (const i of [...running]) {
      remaining[i] -= rates.get(i)! * dt;
      if (remaining[i] <= EPS * Math.max(1, cost[i])) {
        end[i] = t;
        running.delete(i);
        busyStream.delete(ops[i].stream);
        done++;
      }
    }
  }
  return passResult(plan, pass, start, end, cost);
}

/**
 * A pass's result from its ops' intervals (by list index): the makespan, each op's timing, the
 * streams' busy and idle time and a critical path. The simulator's, and a replay's made elsewhere
 * (`ampipe run`'s measured schedule, replayed by the ranks).
 */
export function passResult(plan: Plan, pass: PassName, start: readonly number[], end: readonly number[], cost: readonly number[]): PassResult {
  const ops = plan[pass];
  const index = new Map(ops.map((o, i) => [o.id, i] as const));
  const deps = ops.map((o) => o.deps.map((d) => index.get(d)!));
  const prevOnStream = new Array<number>(ops.length).fill(-1);
  const lastOn = new Map<string, number>();
  ops.forEach((o, i) => {
    prevOnStream[i] = lastOn.get(o.stream) ?? -1;
    lastOn.set(o.stream, i);
  });
  const makespan = ops.length === 0 ? 0 : Math.max(...end);
  const timings: OpTiming[] = ops.map((o, i) => ({
    id: o.id, kind: o.kind, chunk: o.chunk, stream: o.stream, costMs: cost[i], startMs: start[i], endMs: end[i],
  }));
  const streams: StreamUsage[] = plan.streams.map((s) => {
    const busy = ops.reduce((acc, o, i) => acc + (o.stream === s.name ? end[i] - start[i] : 0), 0);
    return { name: s.name, kind: s.kind, busyMs: busy, idleMs: makespan - busy };
  });
  // Critical path: from the last op to finish, repeatedly step to the predecessor (dep or
  // previous op on the stream) that finished last; that one released the op.
  const path: string[] = [];
  if (ops.length > 0) {
    let i = end.indexOf(makespan);
    while (i >= 0) {
      path.push(ops[i].id);
      const preds = [...deps[i], prevOnStream[i]].filter((j) => j >= 0);
      if (preds.length === 0) break;
      i = preds.reduce((a, b) => (end[b] > end[a] ? b : a));
    }
    path.reverse();
  }
  return { makespanMs: makespan, ops: timings, streams, criticalPath: path };
}

/** Simulates the forward then the backward list of a plan. */
export function simulatePlan(plan: Plan, costs: OpCosts, opts: SimOptions = {}): SimResult {
  const forward = simulatePass(plan, "forward", costs, opts);
  const backward = simulatePass(plan, "backward", costs, opts);
  return { forward, backward, totalMs: forward.makespanMs + backward.makespanMs };
}
