// Ctrl-C for long runs: the first SIGINT/SIGTERM asks the ranks to stop after their current
// step, with a checkpoint (the bridge's `cancel`); a second one stops them at once.
import { type RankRun } from "../bridge/index.ts";

export interface SignalStop {
  /** A signal arrived (the command then exits 130). */
  readonly requested: boolean;
  off(): void;
}

export function stopOnSignals(run: () => RankRun | undefined, prog: string): SignalStop {
  let requested = false;
  const handler = (sig: NodeJS.Signals) => {
    const r = run();
    if (!r || requested) {
      process.stderr.write(`${prog}: ${sig}${requested ? " again" : ""}: stopping the ranks now (no checkpoint)\n`);
      void (r?.close() ?? Promise.resolve()).finally(() => process.exit(130));
      requested = true;
      return;
    }
    requested = true;
    process.stderr.write(`${prog}: ${sig}: stopping after the current step, with a checkpoint (again to abort)\n`);
    r.cancel();
  };
  process.on("SIGINT", handler);
  process.on("SIGTERM", handler);
  return {
    get requested() { return requested; },
    off() {
      process.off("SIGINT", handler);
      process.off("SIGTERM", handler);
    },
  };
}
