// The grid `ampipe bench` sweeps, from a config's `bench` section: groups (sequence length x
// comm/compute ratio), and in each group the cases — the peer baseline (moe-overlap) at its
// degrees first, then the AMPipe variants at each degree, then the planner's own choice. Every
// case runs against the sequential block. Pure: no I/O, so the grid can be tested and resumed.
import { ExperimentSchema, type BenchConfig, type ExperimentConfig } from "../config/index.ts";

export type CaseSource = "moe-overlap" | "grid" | "planner";

export type BenchModel = NonNullable<BenchConfig["models"]>[number];

export interface Group {
  /** `s1024`, `s1024-r0.5`, or with bench.models `<name>-s1024-r0.5`: the prefix of its cases' ids. */
  id: string;
  /** The bench.models entry (null: the config's model). */
  model: BenchModel | null;
  seqLength: number;
  /** Emulated comm/compute ratio the bandwidth is set for, or null (pipeline.emulated_comm as given, or real comm). */
  ratio: number | null;
}

export interface CaseSpec {
  /** Unique, stable across runs of one config: the resume key (`s1024-r0.5-grouped-p2`, `s1024-planner`). */
  id: string;
  group: Group;
  source: CaseSource;
  /** The plan variant; null for the planner (it chooses). */
  variant: "grouped" | "interleaved" | "moe-overlap" | null;
  /** Pipe degree; null for the planner. */
  degree: number | null;
}

/** The bench section with the quick slice applied (`--quick`). */
export function benchSettings(cfg: ExperimentConfig, quick: boolean): Omit<BenchConfig, "quick" | "seq_lengths"> & { seq_lengths: number[] } {
  const b = cfg.bench;
  if (quick && b.quick === null) throw new Error("--quick: the config has no bench.quick section");
  const merged = { ...b, ...(quick ? Object.fromEntries(Object.entries(b.quick ?? {}).filter(([, v]) => v !== undefined)) : {}) };
  const { quick: _q, ...rest } = merged as BenchConfig;
  const out = { ...rest, seq_lengths: rest.seq_lengths ?? [cfg.model.seq_length] };
  (out.models ?? []).forEach((m, i) => {
    if ((out.models ?? []).findIndex((x) => x.name === m.name) !== i) throw new Error(`bench.models[${i}].name: "${m.name}" is used twice`);
    for (const S of out.seq_lengths) {
      const r = ExperimentSchema.safeParse(mergeModel(cfg, m, S));
      if (!r.success) throw new Error(`bench.models[${i}] (${m.name}) at seq_length ${S}: ${r.error.issues.map((x) => `${x.path.join(".")}: ${x.message}`).join("; ")}`);
    }
  });
  return out;
}

/** The config with a bench model's fields and a sequence length (derived fields re-resolved). */
export function withModel(cfg: ExperimentConfig, m: BenchModel | null, seqLength: number): ExperimentConfig {
  const c = mergeModel(cfg, m, seqLength);
  return m ? ExperimentSchema.parse(c) : c;
}

function mergeModel(cfg: ExperimentConfig, m: BenchModel | null, seqLength: number): ExperimentConfig {
  const c = structuredClone(cfg);
  const { name: _n, ...fields } = m ?? { name: "" };
  // num_query_groups / kv_channels follow the model's heads and width unless the entry sets them.
  const derived = m && (m.hidden_size !== undefined || m.num_attention_heads !== undefined)
    ? { num_query_groups: m.num_query_groups ?? null, kv_channels: m.kv_channels ?? null } : {};
  c.model = { ...c.model, ...fields, ...derived, seq_length: seqLength } as ExperimentConfig["model"];
  return c;
}

const fmtRatio = (r: number) => String(r);

export function groupsOf(settings: ReturnType<typeof benchSettings>): Group[] {
  const ratios: Array<number | null> = settings.comm_compute_ratios ?? [null];
  const models: Array<BenchModel | null> = settings.models ?? [null];
  const out: Group[] = [];
  for (const model of models)
    for (const seqLength of settings.seq_lengths)
      for (const ratio of ratios)
        out.push({ id: `${model ? `${model.name}-` : ""}s${seqLength}${ratio === null ? "" : `-r${fmtRatio(ratio)}`}`, model, seqLength, ratio });
  return out;
}

/** Every case of the sweep, in run order. Degrees above a group's sequence length are skipped. */
export function expandGrid(settings: ReturnType<typeof benchSettings>): CaseSpec[] {
  const cases: CaseSpec[] = [];
  const uniq = (xs: number[]) => [...new Set(xs)].sort((a, b) => a - b);
  for (const group of groupsOf(settings)) {
    const fits = (P: number) => P <= group.seqLength;
    for (const P of uniq(settings.moe_overlap_degrees).filter(fits))
      cases.push({ id: `${group.id}-moe-overlap-p${P}`, group, source: "moe-overlap", variant: "moe-overlap", degree: P });
    for (const variant of [...new Set(settings.variants)])
      for (const P of uniq(settings.degrees).filter(fits))
        cases.push({ id: `${group.id}-${variant}-p${P}`, group, source: "grid", variant, degree: P });
    if (settings.planner) cases.push({ id: `${group.id}-planner`, group, source: "planner", variant: null, degree: null });
  }
  return cases;
}
