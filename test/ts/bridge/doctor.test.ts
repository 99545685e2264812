// `ampipe doctor` through pythonia: the real environment passes; a missing Python, and a
// Python whose torch/pyzmq are missing or too old, fail with a fix on the line.
import { spawnSync } from "node:child_process";
import { mkdirSync, mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";

const root = join(import.meta.dirname, "..", "..", "..");
const cli = join(root, "bin", "ampipe.js");

function doctor(env: NodeJS.ProcessEnv, json = true) {
  const r = spawnSync(process.execPath, [cli, "doctor", ...(json ? ["--json"] : [])], {
    encoding: "utf8", env: { ...process.env, ...env }, timeout: 60_000,
  });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr, report: json ? JSON.parse(r.stdout) : null };
}

type Check = { name: string; ok: boolean; required: boolean; value: string; fix: string | null };
const byName = (checks: Check[], name: string) => checks.find((c) => c.name === name)!;

/** A folder of fake packages that shadow the real ones on PYTHONPATH. */
function fakePackages(files: Record<string, string>): string {
  const dir = mkdtempSync(join(tmpdir(), "ampipe-doctor-"));
  for (const [pkg, source] of Object.entries(files)) {
    mkdirSync(join(dir, pkg));
    writeFileSync(join(dir, pkg, "__init__.py"), source);
  }
  return dir;
}

describe("ampipe doctor", () => {
  it("passes in this environment and reports the pieces", () => {
    const r = doctor({ AMPIPE_PYTHON: "" });
    expect(r.status).toBe(0);
    expect(r.report.ok).toBe(true);
    const names = r.report.checks.map((c: Check) => c.name);
    for (const n of ["node", "python", "torch", "pyzmq", "CUDA devices", "gloo backend", "nccl backend", "kernels"]) {
      expect(names).toContain(n);
    }
    expect(byName(r.report.checks, "python").value).toContain(join(root, ".venv"));
  });

  it("a missing Python fails, naming the path and how to fix it; the text form says FAIL", () => {
    const r = doctor({ AMPIPE_PYTHON: "/nonexistent/python3" }, false);
    expect(r.status).toBe(1);
    expect(r.stdout).toMatch(/FAIL python .*\/nonexistent\/python3 \(from AMPIPE_PYTHON\): not found/);
    expect(r.stdout).toMatch(/fix: point AMPIPE_PYTHON at a Python >= 3\.10/);
  });

  it("torch and pyzmq missing: each is named with the pip command that fixes it", () => {
    const fakes = fakePackages({
      torch: "raise ImportError(\"No module named 'torch'\")\n",
      zmq: "raise ImportError(\"No module named 'zmq'\")\n",
    });
    const r = doctor({ AMPIPE_PYTHON: "", PYTHONPATH: fakes });
    expect(r.status).toBe(1);
    const torch = byName(r.report.checks, "torch");
    expect(torch).toMatchObject({ ok: false, required: true });
    expect(torch.value).toMatch(/missing \(ImportError: No module named 'torch'\)/);
    expect(torch.fix).toMatch(/-m pip install 'torch>=2\.5'/);
    expect(byName(r.report.checks, "pyzmq").fix).toMatch(/pip install 'pyzmq>=26'/);
  });

  it("torch and pyzmq too old: named with the version found and the minimum", () => {
    const fakes = fakePackages({
      torch: "__version__ = '1.13.1'\n",
      zmq: "def pyzmq_version(): return '22.3.0'\ndef zmq_version(): return '4.3.4'\n",
    });
    const r = doctor({ AMPIPE_PYTHON: "", PYTHONPATH: fakes });
    expect(r.status).toBe(1);
    expect(byName(r.report.checks, "torch").value).toBe("1.13.1, older than 2.5");
    expect(byName(r.report.checks, "pyzmq").value).toBe("22.3.0 (libzmq 4.3.4), older than 26");
  });
});
