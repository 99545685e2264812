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

export function createProgress(total: number, opts: { title: string; tty?: boolean; write?: (s: string) => void; initial?: number }): Progress {
  const write = opts.write ?? ((s: string) => process.stdout.write(s));
  const tty = opts.tty ?? (process.stdout.isTTY === true && opts.write === undefined);
  let doneCount = opts.initial ?? 0;
  const t0 = performance.now();
  let ranHere = 0;
  const eta = () => {
    if (ranHere === 0) return Infinity;
    return (((performance.now() - t0) / 1000) / ranHere) * (total - doneCount);
  };
  if (!tty) {
    let current = "";
    return {
      start(label) {
        current = label;
      },
      done(note) {
        doneCount++;
        ranHere++;
        write(`[${doneCount}/${total}] ${current}: ${note} (eta ${fmtEta(eta())})\n`);
      },
      log(line) {
        write(line + "\n");
      },
      stop() {},
    };
  }
  const bar = new cliProgress.SingleBar(
    { format: `${opts.title} [{bar}] {value}/{total} | ETA {eta_formatted} | {label}`, hideCursor: true, clearOnComplete: false, etaBuffer: 4 },
    cliProgress.Presets.shades_classic,
  );
  bar.start(total, doneCount, { label: "" });
  return {
    start(label) {
      bar.update({ label });
    },
    done(note) {
      doneCount++;
      ranHere++;
      bar.update(doneCount, { label: note });
    },
    log(line) {
      // cli-progress redraws on the next update: clear the bar's line, print, redraw.
      process.stdout.write("\r\x1b[2K" + line + "\n");
      bar.render();
    },
    stop() {
      bar.stop();
    },
  };
}
