// Running the `ampipe` CLI as a child process, for the end-to-end tests.
import { spawn } from "node:child_process";
import { join } from "node:path";

export const root = join(import.meta.dirname, "..", "..");

export interface Ran { code: number | null; stdout: string; stderr: string; pid: number }

/**
 * Runs `ampipe <args>`; resolves when it exits. `onStart` gets the child's pid and its live stdout;
 * `env` adds to the environment the child (and the ranks it starts) inherits.
 */
export function ampipe(args: string[], onStart?: (pid: number, stdout: () => string) => void, env?: Record<string, string>): Promise<Ran> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [join(root, "bin", "ampipe.js"), ...args],
      { cwd: root, stdio: ["ignore", "pipe", "pipe"], env: env ? { ...process.env, ...env } : process.env });
    let stdout = "";
    let stderr = "";
    child.stdout.setEncoding("utf8").on("data", (d: string) => (stdout += d));
    child.stderr.setEncoding("utf8").on("data", (d: string) => (stderr += d));
    onStart?.(child.pid!, () => stdout);
    child.on("error", reject);
    child.on("close", (code) => resolve({ code, stdout, stderr, pid: child.pid! }));
  });
}
