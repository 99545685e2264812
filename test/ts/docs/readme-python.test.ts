// The README's "Using it from Python" section runs as written: its shell commands and its
// Python, in order, in a fresh folder that sees the repository's configs, examples and tests.
import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, symlinkSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { pythonEnv, pythonPath, repoRoot } from "../../../src/python.ts";

function section(markdown: string, title: string): string {
  const start = markdown.indexOf(`## ${title}`);
  const end = markdown.indexOf("\n## ", start + 1);
  return markdown.slice(start, end < 0 ? undefined : end);
}

function blocks(text: string): Array<{ lang: string; code: string }> {
  return [...text.matchAll(/```(\w+)\n([\s\S]*?)```/g)].map((m) => ({ lang: m[1], code: m[2] }));
}

describe("README", () => {
  it("the Python section's commands and code run as written", { timeout: 240_000 }, () => {
    const readme = readFileSync(join(repoRoot, "README.md"), "utf8");
    const found = blocks(section(readme, "Using it from Python"));
    expect(found.filter((b) => b.lang === "python").length).toBeGreaterThanOrEqual(1);
    expect(found.every((b) => b.lang === "sh" || b.lang === "python")).toBe(true);
    const dir = mkdtempSync(join(tmpdir(), "ampipe-readme-"));
    for (const d of ["configs", "examples", "test"]) symlinkSync(join(repoRoot, d), join(dir, d));
    symlinkSync(join(repoRoot, ".venv"), join(dir, ".venv"));
    const env = pythonEnv();
    for (const b of found) {
      if (b.lang === "python") {
        const r = spawnSync(pythonPath(), ["-c", b.code], { cwd: dir, env, encoding: "utf8" });
        expect(r.status, `${b.code}\n${r.stderr}`).toBe(0);
        if (b.code.includes("swap_blocks")) expect(r.stdout).toContain("swapped 2 layer(s): decoder.layers.0, decoder.layers.1");
        continue;
      }
      for (const line of b.code.split("\n").filter((l) => l.trim())) {
        // `ampipe` is the CLI (bin/ampipe.js) and `py` the checkout's (not linked: ampipe finds its
        // kernels relative to its real path); everything else runs through the shell as written.
        const cmd = line
          .replace(/^ampipe /, `"${process.execPath}" "${join(repoRoot, "bin", "ampipe.js")}" `)
          .replace(/^PYTHONPATH=py /, `PYTHONPATH="${join(repoRoot, "py")}" `);
        const r = spawnSync("bash", ["-c", cmd], { cwd: dir, env, encoding: "utf8" });
        expect(r.status, `${line}\n${r.stderr}`).toBe(0);
        if (line.includes("megatron_swap.py")) expect(r.stdout).toMatch(/step 1: loss \d/);
      }
    }
  });
});
