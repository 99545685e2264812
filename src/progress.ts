// Progress over a known number of items with an ETA: a live cli-progress bar on a terminal,
// plain lines ("[3/12] ...") otherwise (a log file or CI), so output stays readable in both.
import cliProgress from "cli-progress";

export interface Progress {
  /** Sets the item about to run (shown on the bar; printed as a line off a terminal). */
  start(label: string): void;
  /** Marks one more item done, with a short note (e.g. its result). */
  done(note: string): void;
  /** Prints a line above the bar (or plainly). */
  log(line: string): void;
  stop(): void;
}

const fmtEta = (s: number) => (!Number.isFinite(s) ? "?" : s >= 60 ? `${Math.floor(s / 60)}m${String(Math.round(s % 60)).padStart(2, "0")}s` : `${Math.round(s)}s`);

export interface ProgressOptions {
  title: string;
  tty?: boolean;
  write?: (s: string) => void;
  /** Items already done (a resumed sweep): counted, not timed. */
  initial?: number;
  /**
   * Relative cost of each item still to run, in run order (e.g. predicted times): the ETA is the
   * time per unit of cost so far times the cost left, so long items late in a run are foreseen.
   * Default: every item costs the same.
   */
  weights?: number[];
}

export function createProgress(total: number, opts: ProgressOptions): Progress {
  const write = opts.write ?? ((s: string) => process.stdout.write(s));
  const tty = opts.tty ?? (process.stdout.isTTY === true && opts.write === undefined);
  let doneCount = opts.initial ?? 0;
  const t0 = performance.now();
  let ranHere = 0;
  const weights = opts.weights ?? Array.from({ length: total - doneCount }, () => 1);
  const totalWeight = weights.reduce((a, b) => a + b, 0);
  let doneWeight = 0;
  const eta = () => {
    if (ranHere === 0 || doneWeight <= 0) return Infinity;
    return (((performance.now() - t0) / 1000) / doneWeight) * Math.max(0, totalWeight - doneWeight);
  };
  const advance = () => {
    doneWeight += weights[ranHere] ?? 0;
    doneCount++;
    ranHere++;
  };
  if (!tty) {
    let current = "";
    return {
      start(label) {
        current = label;
      },
      done(note) {
        advance();
        write(`[${doneCount}/${total}] ${current}: ${note} (eta ${fmtEta(eta())})\n`);
      },
      log(line) {
        write(line + "\n");
      },
      stop() {},
    };
  }
  const bar = new cliProgress.SingleBar(
    { format: `${opts.title} [{bar}] {value}/{total} | ETA {eta_weighted} | {label}`, hideCursor: true, clearOnComplete: false },
    cliProgress.Presets.shades_classic,
  );
  bar.start(total, doneCount, { label: "", eta_weighted: "?" });
  // Redraw every second so the ETA counts down during a long item.
  const started = performance.now();
  let lastEtaS = Infinity;
  let lastAt = started;
  const timer = setInterval(() => bar.update({ eta_weighted: fmtEta(Math.max(0, lastEtaS - (performance.now() - lastAt) / 1000)) }), 1000);
  timer.unref();
  let current = "";
  return {
    start(label) {
      current = label;
      bar.update({ label });
    },
    done(note) {
      advance();
      lastEtaS = eta();
      lastAt = performance.now();
      process.stdout.write(`\r\x1b[2K[${doneCount}/${total}] ${current}: ${note}\n`); // each result stays on screen
      bar.update(doneCount, { label: "", eta_weighted: fmtEta(lastEtaS) });
    },
    log(line) {
      // cli-progress redraws on the next update: clear the bar's line, print, redraw.
      process.stdout.write("\r\x1b[2K" + line + "\n");
      bar.render();
    },
    stop() {
      clearInterval(timer);
      bar.stop();
    },
  };
}
