// The layout shows the layers: src/commands/ parses options and prints, library code lives in
// its domain folder and never imports a command module; no import cycles between modules.
import { readFileSync, readdirSync, statSync } from "node:fs";
import { dirname, join, relative, resolve } from "node:path";
import { describe, expect, it } from "vitest";

const src = join(import.meta.dirname, "..", "..", "src");

function files(dir: string): string[] {
  return readdirSync(dir).flatMap((f) => {
    const p = join(dir, f);
    return statSync(p).isDirectory() ? files(p) : p.endsWith(".ts") && !p.endsWith(".d.ts") ? [p] : [];
  });
}

/** Module (path under src) -> the src modules it imports (static and dynamic, type-only ones aside). */
function importGraph(): Map<string, string[]> {
  const graph = new Map<string, string[]>();
  for (const f of files(src)) {
    const text = readFileSync(f, "utf8");
    const deps: string[] = [];
    for (const m of text.matchAll(/(?:^|\n)\s*(import|export)\s+(type\s+)?[^;]*?from\s+"(\.[^"]+)"|import\(\s*"(\.[^"]+)"\s*\)/g)) {
      if (m[2]) continue; // `import type`: no run-time edge
      const spec = m[3] ?? m[4];
      deps.push(relative(src, resolve(dirname(f), spec)));
    }
    graph.set(relative(src, f), deps.filter((d) => d.endsWith(".ts")));
  }
  return graph;
}

function cycles(graph: Map<string, string[]>): string[][] {
  const index = new Map<string, number>();
  const low = new Map<string, number>();
  const stack: string[] = [];
  const on = new Set<string>();
  const out: string[][] = [];
  const visit = (v: string) => {
    index.set(v, index.size);
    low.set(v, index.get(v)!);
    stack.push(v);
    on.add(v);
    for (const w of graph.get(v) ?? []) {
      if (!graph.has(w)) continue;
      if (!index.has(w)) {
        visit(w);
        low.set(v, Math.min(low.get(v)!, low.get(w)!));
      } else if (on.has(w)) low.set(v, Math.min(low.get(v)!, index.get(w)!));
    }
    if (low.get(v) === index.get(v)) {
      const comp: string[] = [];
      let w: string;
      do {
        w = stack.pop()!;
        on.delete(w);
        comp.push(w);
      } while (w !== v);
      if (comp.length > 1) out.push(comp.sort());
    }
  };
  for (const v of [...graph.keys()].sort()) if (!index.has(v)) visit(v);
  return out;
}

describe("the source layout", () => {
  const graph = importGraph();

  it("finds the imports it checks", () => {
    expect(graph.get("commands/run.ts")).toContain("run/run-block.ts");
    expect(cycles(new Map([["a", ["b"]], ["b", ["a"]], ["c", ["a"]]]))).toEqual([["a", "b"]]);
  });

  it("keeps library code out of src/commands: nothing outside it imports a command module", () => {
    const wrong = [...graph].filter(([m]) => !m.startsWith("commands/") && m !== "cli.ts")
      .flatMap(([m, deps]) => deps.filter((d) => d.startsWith("commands/")).map((d) => `${m} -> ${d}`));
    expect(wrong).toEqual([]);
  });

  it("has no import cycles", () => {
    expect(cycles(graph)).toEqual([]);
  });
});
