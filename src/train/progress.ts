// Progress of a long run: a live bar with ETA (cli-progress) on a terminal, plain lines
// (every `every` updates, and the last) when stdout is not one (CI logs, pipes).
import cliProgress from "cli-progress";

export interface Progress {
  /** The run is at `value` of `total`; `fields` fill the bar's {name} placeholders. */
  update(value: number, fields: Record<string, string>): void;
  /** A line above the bar (or a plain line). */
  log(line: string): void;
  stop(): void;
}

export interface ProgressOptions {
  total: number;
  start?: number;
  /** The bar's text after the bar, with {name} placeholders filled from update()'s fields. */
  format: string;
  /** Without a terminal: a line every `every` updates. */
  every?: number;
  tty?: boolean;
  write?: (s: string) => void;
  /**
   * Seconds left, where the caller knows better than a constant rate per item (items of unequal
   * cost, e.g. bench cases): shown instead of cli-progress's ETA, and on each plain line.
   */
  eta?: () => number;
}

const fmtEta = (s: number) => (!Number.isFinite(s) ? "?" : s >= 60 ? `${Math.floor(s / 60)}m${String(Math.round(s % 60)).padStart(2, "0")}s` : `${Math.round(s)}s`);

export function makeProgress(o: ProgressOptions): Progress {
  const write = o.write ?? ((s: string) => process.stdout.write(s));
  const tty = o.tty ?? Boolean(process.stdout.isTTY);
  if (!tty) {
    const every = o.every ?? 10;
    let n = 0;
    return {
      update(value, fields) {
        n++;
        if (n % every !== 0 && value !== o.total) return;
        const text = o.format.replace(/\{(\w+)\}/g, (_, k: string) => fields[k] ?? "");
        write(`[${value}/${o.total}] ${text}${o.eta ? ` (eta ${fmtEta(o.eta())})` : ""}\n`);
      },
      log: (line) => write(line + "\n"),
      stop() {},
    };
  }
  const bar = new cliProgress.SingleBar({
    format: `{bar} {value}/{total} | ETA ${o.eta ? "{eta_given}" : "{eta_formatted}"} | ${o.format}`,
    hideCursor: true,
    clearOnComplete: false,
    etaBuffer: 20,
  }, cliProgress.Presets.shades_classic);
  const blank = Object.fromEntries([...o.format.matchAll(/\{(\w+)\}/g)].map((m) => [m[1], "…"]));
  const given = () => (o.eta ? { eta_given: fmtEta(o.eta()) } : {});
  bar.start(o.total, o.start ?? 0, { ...blank, ...given() });
  return {
    update: (value, fields) => bar.update(value, { ...fields, ...given() }),
    log(line) {
      // cli-progress redraws on the next update; clear the line first so the text stays readable.
      process.stdout.write("\r\x1b[2K" + line + "\n");
      bar.render();
    },
    stop: () => bar.stop(),
  };
}
