// Loading experiment configs: YAML or JSON files, `--set a.b=value` overrides, and one
// ConfigError whose lines each name a field and the rule it broke.
import { readFileSync } from "node:fs";
import { extname } from "node:path";
import { parseDocument, parse as parseYamlScalar } from "yaml";
import type { z } from "zod";
import { ExperimentSchema, type ExperimentConfig } from "./schema.ts";

export interface ConfigIssue {
  /** Dotted field path, e.g. "model.hidden_size" ("" for the whole document). */
  path: string;
  message: string;
}

export class ConfigError extends Error {
  readonly issues: ConfigIssue[];
  readonly source: string | undefined;

  constructor(issues: ConfigIssue[], source?: string) {
    const where = source ? `${source}: ` : "";
    const lines = issues.map((i) => `  ${i.path || "(config)"}: ${i.message}`);
    // A problem with the file itself (unreadable, not YAML) reads better on one line.
    super(issues.length === 1 && !issues[0].path
      ? `${where}${issues[0].message}`
      : `${where}invalid experiment config\n${lines.join("\n")}`);
    this.name = "ConfigError";
    this.issues = issues;
    this.source = source;
  }
}

function editDistance(a: string, b: string): number {
  const d = Array.from({ length: a.length + 1 }, (_, i) => [i, ...Array<number>(b.length).fill(0)]);
  for (let j = 1; j <= b.length; j++) d[0][j] = j;
  for (let i = 1; i <= a.length; i++) {
    for (let j = 1; j <= b.length; j++) {
      d[i][j] = Math.min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] === b[j - 1] ? 0 : 1));
    }
  }
  return d[a.length][b.length];
}

/** The keys the schema knows at a dotted path ("" = top level, "model", ...). */
function knownKeys(path: (string | number | symbol)[]): string[] {
  let s: z.ZodType = ExperimentSchema;
  // Unwrap pipes/defaults/nullables down to the object at `path`.
  const unwrap = (t: z.ZodType): z.ZodType => {
    const def = (t as unknown as { def: Record<string, unknown> }).def;
    if (def.type === "pipe") return unwrap(def.in as z.ZodType);
    if (def.type === "default" || def.type === "nullable" || def.type === "optional") {
      return unwrap(def.innerType as z.ZodType);
    }
    return t;
  };
  for (const key of ["", ...path.map(String)]) {
    s = unwrap(s);
    if (key === "") continue;
    const shape = (s as unknown as { shape?: Record<string, z.ZodType> }).shape;
    if (!shape || !(key in shape)) return [];
    s = shape[key];
  }
  const shape = (unwrap(s) as unknown as { shape?: Record<string, z.ZodType> }).shape;
  return shape ? Object.keys(shape) : [];
}

function suggest(key: string, candidates: string[]): string {
  let best = "";
  let bestD = Infinity;
  for (const c of candidates) {
    const d = editDistance(key, c);
    if (d < bestD) [best, bestD] = [c, d];
  }
  return best && bestD <= Math.max(2, Math.floor(key.length / 3)) ? ` (did you mean "${best}"?)` : "";
}

function toIssues(error: z.ZodError): ConfigIssue[] {
  const out: ConfigIssue[] = [];
  for (const i of error.issues) {
    const path = i.path.map(String).join(".");
    if (i.code === "unrecognized_keys") {
      const known = knownKeys(i.path);
      for (const k of i.keys) {
        const hint = suggest(k, known);
        out.push({
          path: path ? `${path}.${k}` : k,
          message: hint ? `unknown field${hint}` : `unknown field; known fields here: ${known.join(", ")}`,
        });
      }
    } else {
      out.push({ path, message: i.message });
    }
  }
  return out;
}

/** Validates a plain object (parsed YAML/JSON) and returns the resolved config. */
export function resolveConfig(obj: unknown, source?: string): ExperimentConfig {
  const r = ExperimentSchema.safeParse(obj ?? {});
  if (!r.success) throw new ConfigError(toIssues(r.error), source);
  return r.data;
}

/** Parses YAML or JSON text into a plain object (no validation). */
export function parseConfigText(text: string, source = "<config>", format?: "yaml" | "json"): unknown {
  const fmt = format ?? (extname(source).toLowerCase() === ".json" ? "json" : "yaml");
  if (fmt === "json") {
    try {
      return JSON.parse(text);
    } catch (e) {
      throw new ConfigError([{ path: "", message: `not valid JSON: ${(e as Error).message}` }], source);
    }
  }
  const doc = parseDocument(text, { uniqueKeys: true, prettyErrors: true });
  if (doc.errors.length > 0) {
    throw new ConfigError(
      doc.errors.map((e) => ({ path: "", message: `not valid YAML: ${e.message.split("\n")[0]}` })),
      source,
    );
  }
  return doc.toJS();
}

/**
 * Applies `a.b.c=value` overrides to a plain object (before validation). Values are read as
 * YAML scalars/flow collections, so `8`, `true`, `null`, `auto` and `[0, 128, 256]` work.
 */
export function applyOverrides(obj: unknown, overrides: readonly string[]): Record<string, unknown> {
  const root: Record<string, unknown> =
    obj && typeof obj === "object" && !Array.isArray(obj) ? structuredClone(obj as Record<string, unknown>) : {};
  for (const o of overrides) {
    const eq = o.indexOf("=");
    if (eq <= 0) {
      throw new ConfigError([{ path: o, message: 'an override must look like "section.field=value"' }], "--set");
    }
    const keys = o.slice(0, eq).trim().split(".");
    let value: unknown;
    try {
      value = parseYamlScalar(o.slice(eq + 1));
    } catch (e) {
      throw new ConfigError([{ path: keys.join("."), message: `cannot read value: ${(e as Error).message}` }], "--set");
    }
    let node = root;
    for (const k of keys.slice(0, -1)) {
      const next = node[k];
      if (next === undefined || next === null) node[k] = {};
      else if (typeof next !== "object" || Array.isArray(next)) {
        throw new ConfigError([{ path: keys.join("."), message: `"${k}" is not a section` }], "--set");
      }
      node = node[k] as Record<string, unknown>;
    }
    node[keys[keys.length - 1]] = value;
  }
  return root;
}

/** Reads, validates and resolves a YAML or JSON config file. */
export function loadConfig(path: string, overrides: readonly string[] = []): ExperimentConfig {
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch (e) {
    throw new ConfigError([{ path: "", message: `cannot read file: ${(e as Error).message}` }], path);
  }
  const obj = applyOverrides(parseConfigText(text, path), overrides);
  return resolveConfig(obj, path);
}
