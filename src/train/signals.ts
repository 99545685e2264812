// Ctrl-C for long runs: the first SIGINT/SIGTERM asks the ranks to stop after their current
// step, with a checkpoint (the bridge's `cancel`); a second one stops them at once. The
// command then exits with the signal's conventional status: 130 for SIGINT (Ctrl-C), 143 for
// SIGTERM (kill, a scheduler's stop).
import { type RankRun } from "../bridge/index.ts";

/** The exit status of a command stopped by `sig` (128 + the signal's number). */
export function signalExitCode(sig: NodeJS.Signals): number {
  return sig === "SIGTERM" ? 143 : sig === "SIGHUP" ? 129 : 130;
}

export interface SignalStop {
  /** A signal arrived. */
  readonly requested: boolean;
  /** The exit status for the first signal that arrived (130 SIGINT, 143 SIGTERM; 130 if none). */
  readonly exitCode: number;
  off(): void;
}

export function stopOnSignals(run: () => RankRun | undefined, prog: string): SignalStop {
  let first: NodeJS.Signals | null = null;
  const handler = (sig: NodeJS.Signals) => {
    const r = run();
    const again = first !== null;
    first ??= sig;
    if (!r || again) {
      process.stderr.write(`${prog}: ${sig}${again ? " again" : ""}: stopping the ranks now (no checkpoint)\n`);
      void (r?.close() ?? Promise.resolve()).finally(() => process.exit(signalExitCode(first!)));
      return;
    }
    process.stderr.write(`${prog}: ${sig}: stopping after the current step, with a checkpoint (again to abort)\n`);
    r.cancel();
  };
  process.on("SIGINT", handler);
  process.on("SIGTERM", handler);
  return {
    get requested() { return first !== null; },
    get exitCode() { return signalExitCode(first ?? "SIGINT"); },
    off() {
      process.off("SIGINT", handler);
      process.off("SIGTERM", handler);
    },
  };
}
