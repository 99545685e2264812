// Regenerates the committed plan fixtures in test/fixtures/plans/ (read by the Python executor's
// tests): `npx tsx scripts/gen-plan-fixtures.ts`. test/ts/plan/fixtures.test.ts regenerates them in
// memory and fails when the committed files differ.
import { mkdirSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { makePlan } from "../src/plan/generators.ts";
import { planToJson } from "../src/plan/io.ts";
import type { BlockDims, Plan, Variant } from "../src/plan/ir.ts";

export const FIXTURE_DIR = "test/fixtures/plans";
/** The same plans, shipped with the Python package as the benchmark's named schedules. */
export const SCHEDULE_DIR = "py/ampipe/bench/schedules";

/** Non-uniform boundaries for seq_length 48: later chunks shorter (their attention sees a longer prefix). */
export const NONUNIFORM: Record<number, number[]> = {
  2: [0, 28, 48],
  3: [0, 20, 36, 48],
  4: [0, 16, 29, 40, 48],
  8: [0, 9, 17, 24, 30, 36, 41, 45, 48],
};

export interface FixtureSpec {
  file: string;
  variant: Variant;
  degree: number;
  nonuniform: boolean;
  chunkQkv: boolean;
  dims: BlockDims;
}

/** The shared expert's FFN width in the `-shared` fixtures. */
export const SHARED_FFN = 48;

/** The fixture set: small dims, varied deterministically by position so every feature is covered. */
export function fixtureSpecs(): FixtureSpec[] {
  const cases: Array<[Variant, number, boolean]> = [["sequential", 1, false]];
  for (const variant of ["grouped", "interleaved"] as const) {
    for (const P of [1, 2, 3, 4, 8]) cases.push([variant, P, false]);
    for (const P of [2, 3, 4, 8]) cases.push([variant, P, true]);
  }
  // The peer baseline (whole-sequence qkv and attention, MoE pipelined over P pieces).
  for (const P of [2, 3, 4]) cases.push(["moe-overlap", P, false]);
  // With a shared expert (its own op per chunk): P in {1, 2, 3, 4}, grouped and interleaved.
  const shared: Array<[Variant, number, boolean]> = [["sequential", 1, false]];
  for (const variant of ["grouped", "interleaved"] as const) for (const P of [1, 2, 3, 4]) shared.push([variant, P, P === 3]);
  shared.push(["moe-overlap", 2, false]);
  const specs = cases.map(([variant, degree, nonuniform], i) => spec(variant, degree, nonuniform, i, null));
  return [...specs, ...shared.map(([variant, degree, nonuniform], i) => spec(variant, degree, nonuniform, i, SHARED_FFN))];
}

function spec(variant: Variant, degree: number, nonuniform: boolean, i: number, sharedFfn: number | null): FixtureSpec {
  return {
    file: `${variant}-p${degree}${nonuniform ? "-nonuniform" : ""}${sharedFfn === null ? "" : "-shared"}.json`,
    variant,
    degree,
    nonuniform,
    chunkQkv: variant !== "moe-overlap" && i % 3 !== 1, // every third plan uses one whole-sequence qkv
    dims: {
      seq_length: 48,
      micro_batch_size: 2,
      hidden_size: 32,
      num_attention_heads: 4,
      num_query_groups: i % 2 === 1 ? 2 : 4, // half of them GQA
      kv_channels: 8,
      num_experts: 4,
      moe_router_topk: i % 5 === 2 ? 1 : 2, // a few top-1
      moe_ffn_hidden_size: 64,
      moe_shared_expert_intermediate_size: sharedFfn,
      expert_model_parallel_size: i % 4 === 3 ? 2 : 1, // a few with EP 2
      dtype: "fp32",
    },
  };
}

export function fixturePlan(spec: FixtureSpec): Plan {
  return makePlan(spec.variant, spec.dims, {
    degree: spec.degree,
    boundaries: spec.nonuniform ? NONUNIFORM[spec.degree] : undefined,
    chunkQkv: spec.chunkQkv,
  });
}

// --- invalid plans: each breaks one rule of docs/contracts.md §2 ----------------------------------

export interface InvalidSpec {
  file: string;
  rule: string;
  /** Substrings (op ids or field names) a validator's error message is expected to contain. */
  mentions: string[];
  plan: unknown;
}

function base(): Plan {
  const spec = fixtureSpecs().find((s) => s.file === "interleaved-p3.json")!;
  return JSON.parse(JSON.stringify(fixturePlan({ ...spec, chunkQkv: true }))) as Plan;
}
const find = (ops: Plan["forward"], id: string) => {
  const op = ops.find((o) => o.id === id);
  if (!op) throw new Error(`fixture base has no op ${id}`);
  return op;
};

export function invalidSpecs(): InvalidSpec[] {
  const out: InvalidSpec[] = [];
  const add = (file: string, rule: string, mentions: string[], mutate: (p: Plan & Record<string, unknown>) => void) => {
    const p = base() as Plan & Record<string, unknown>;
    mutate(p);
    out.push({ file, rule, mentions, plan: p });
  };
  add("unknown-version.json", "unknown version", ["version"], (p) => { (p as Record<string, unknown>).version = 99; });
  add("old-version.json", "version 1 (before the counts op): refused, naming what changed", ["version", "counts"], (p) => { (p as Record<string, unknown>).version = 1; });
  add("old-version-2.json", "version 2 (before the shared-expert ops): refused, naming what changed", ["version", "shared"], (p) => { (p as Record<string, unknown>).version = 2; });
  add("dispatch-before-counts.json", "dispatch of chunk 1 listed before the count exchange that gives its split sizes", ["f.dispatch.1", "f.counts.1"], (p) => {
    const [op] = p.forward.splice(p.forward.findIndex((o) => o.id === "f.counts.1"), 1);
    p.forward.splice(p.forward.findIndex((o) => o.id === "f.dispatch.1") + 1, 0, op);
  });
  add("sequence-scope-route-unordered.json", "capacity_scope sequence, route of chunk 1 moved to another stream: route of chunk 2 does not wait for its running counts", ["f.route.2", "f.route.1"], (p) => {
    p.capacity_scope = "sequence";
    p.streams.push({ name: "compute2", kind: "compute" });
    Object.assign(find(p.forward, "f.route.1"), { stream: "compute2", deps: ["f.proj.1"] });
  });
  add("unknown-format.json", "unknown format", ["format"], (p) => { (p as Record<string, unknown>).format = "other.plan"; });
  add("unknown-kind.json", "unknown op kind", ["f.attn.1", "kind"], (p) => { (find(p.forward, "f.attn.1") as Record<string, unknown>).kind = "flash_attn"; });
  add("unknown-stream.json", "unknown stream", ["f.dispatch.1", "nccl"], (p) => { find(p.forward, "f.dispatch.1").stream = "nccl"; });
  add("duplicate-id.json", "duplicate op id", ["f.proj.1"], (p) => { find(p.forward, "f.route.1").id = "f.proj.1"; });
  add("dep-not-earlier.json", "a dep that is not earlier in the list", ["f.attn.0", "f.route.2"], (p) => { find(p.forward, "f.attn.0").deps = ["f.route.2"]; });
  add("missing-dep.json", "experts of chunk 1 do not wait for their dispatch", ["f.experts.1", "f.dispatch.1"], (p) => { find(p.forward, "f.experts.1").deps = []; });
  add("combine-bwd-early.json", "combine_bwd of chunk 0 does not wait for unpermute_bwd of chunk 0", ["b.combine.0", "b.unpermute.0"], (p) => { find(p.backward, "b.combine.0").deps = []; });
  add("qkv-bwd-too-early.json", "qkv_bwd of chunk 1 before the attn_bwd of chunks 1 and 2 (dK/dV incomplete)", ["b.qkv.1", "b.attn.1"], (p) => {
    const [op] = p.backward.splice(p.backward.findIndex((o) => o.id === "b.qkv.1"), 1);
    p.backward.splice(p.backward.findIndex((o) => o.id === "b.unpermute.2") + 1, 0, op);
  });
  add("attn-bwd-unordered.json", "attn_bwd of chunks 2 and 1 on different streams with no happens-before between them", ["b.attn.1", "b.attn.2"], (p) => {
    p.streams.push({ name: "compute2", kind: "compute" });
    Object.assign(find(p.backward, "b.attn.2"), { stream: "compute2", deps: ["b.proj.2"] });
    Object.assign(find(p.backward, "b.qkv.2"), { stream: "compute2", deps: [] });
    find(p.backward, "b.qkv.1").deps = ["b.qkv.2"];
  });
  const shared = () => JSON.parse(JSON.stringify(fixturePlan(fixtureSpecs().find((s) => s.file === "interleaved-p2-shared.json")!))) as Plan;
  {
    const p = shared();
    p.streams.push({ name: "compute2", kind: "compute" });
    Object.assign(find(p.backward, "b.shared.1"), { stream: "compute2", deps: ["b.unpermute.1"] });
    out.push({ file: "shared-bwd-unordered.json", rule: "shared_bwd of chunk 1 on another compute stream, proj_bwd of chunk 1 not waiting for its gradient", mentions: ["b.proj.1", "b.shared.1"], plan: p });
  }
  {
    const p = shared();
    p.forward = p.forward.filter((o) => o.id !== "f.shared.0");
    out.push({ file: "shared-missing.json", rule: "a block with a shared expert (dims) whose plan lacks the shared op of chunk 0", mentions: ["shared", "chunk 0"], plan: p });
  }
  {
    const p = shared();
    p.dims.moe_shared_expert_intermediate_size = null;
    out.push({ file: "shared-without-dims.json", rule: "shared ops in a plan whose dims have no shared expert", mentions: ["f.shared.0", "moe_shared_expert_intermediate_size"], plan: p });
  }
  const whole = fixturePlan(fixtureSpecs().find((s) => s.file === "moe-overlap-p3.json")!);
  out.push({
    file: "whole-attention-chunked-qkv.json",
    rule: "a whole-sequence attention (chunk_attention false) with per-chunk qkv",
    mentions: ["chunk_attention", "chunk_qkv"],
    plan: { ...whole, chunk_qkv: true },
  });
  return out;
}

/** Every generated file, keyed by path relative to the repository root. */
export function fixtureFiles(): Map<string, string> {
  const files = new Map<string, string>();
  const specs = fixtureSpecs();
  for (const s of specs) {
    files.set(`${FIXTURE_DIR}/${s.file}`, planToJson(fixturePlan(s)));
    files.set(`${SCHEDULE_DIR}/${s.file}`, planToJson(fixturePlan(s)));
  }
  const invalid = invalidSpecs();
  for (const s of invalid) files.set(`${FIXTURE_DIR}/invalid/${s.file}`, JSON.stringify(s.plan, null, 1) + "\n");
  files.set(
    `${FIXTURE_DIR}/invalid/index.json`,
    JSON.stringify(invalid.map(({ file, rule, mentions }) => ({ file, rule, mentions })), null, 2) + "\n",
  );
  const rows = specs.map((s) => {
    const d = s.dims;
    return `| \`${s.file}\` | ${s.variant} | ${s.degree} | ${s.nonuniform ? NONUNIFORM[s.degree].join(", ") : "uniform"} | ${s.chunkQkv} | ${d.num_query_groups} | ${d.moe_router_topk} | ${d.expert_model_parallel_size} | ${d.moe_shared_expert_intermediate_size ?? "-"} |`;
  });
  files.set(
    `${FIXTURE_DIR}/README.md`,
    [
      "# Plan fixtures",
      "",
      "Generated — do not edit. Regenerate with",
      "",
      "```sh",
      "npx tsx scripts/gen-plan-fixtures.ts",
      "```",
      "",
      "`test/ts/plan/fixtures.test.ts` regenerates them in memory and fails when these files differ,",
      "so a change to the generators shows up here and in the Python executor's tests together.",
      "",
      "All plans use seq_length 48, micro_batch_size 2, hidden_size 32, 4 heads, kv_channels 8,",
      "4 experts, moe_ffn_hidden_size 64, fp32, capacity_scope chunk (the capacity factor and drop",
      "policy are the model's: the tests set them). The other dims vary as listed:",
      "",
      "| file | variant | P | boundaries | chunk_qkv | query groups | top-k | EP | shared expert FFN |",
      "|---|---|---|---|---|---|---|---|---|",
      ...rows,
      "",
      "`invalid/` holds plans that break one rule each of docs/contracts.md §2; `invalid/index.json`",
      "lists each file with the rule and the substrings (op ids, field names) that a validator's",
      "error message should contain.",
      "",
    ].join("\n"),
  );
  return files;
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  const root = join(dirname(fileURLToPath(import.meta.url)), "..");
  const files = fixtureFiles();
  for (const [rel, text] of files) {
    mkdirSync(dirname(join(root, rel)), { recursive: true });
    writeFileSync(join(root, rel), text);
  }
  console.log(`wrote ${files.size} files under ${FIXTURE_DIR}/ and ${SCHEDULE_DIR}/`);
}
