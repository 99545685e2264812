// The README's first command, `npm start` (set-up, then the main job on configs/default.yaml), runs
// and leaves the checkout's `git status` as it found it: set-up installs from the lock file
// without rewriting it, and every output lands in an ignored folder.
import { spawnSync } from "node:child_process";
import { describe, expect, it } from "vitest";
import { repoRoot } from "../../../src/python.ts";

const git = (...args: string[]) => spawnSync("git", args, { cwd: repoRoot, encoding: "utf8" });
const inCheckout = git("rev-parse", "--is-inside-work-tree").stdout?.trim() === "true";
const status = () => git("status", "--porcelain", "--untracked-files=all").stdout.split("\n").filter((l) => l).sort();

describe("npm start", () => {
  it.skipIf(!inCheckout)("runs the main job and leaves git status unchanged", { timeout: 600_000 }, () => {
    const before = status();
    // AMPIPE_SETUP_CHECK: set-up checks but installs nothing under the running suite (npm test's own
    // set-up has just run); everything else is `npm start` as the README gives it.
    const r = spawnSync("npm", ["start"], { cwd: repoRoot, encoding: "utf8", env: { ...process.env, AMPIPE_SETUP_CHECK: "1" } });
    expect(r.status, r.stdout.slice(-3000) + r.stderr.slice(-3000)).toBe(0);
    expect(r.stdout).toMatch(/equivalence PASS in every finished case/);
    expect(status()).toEqual(before);
  });
});
