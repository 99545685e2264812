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
}

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
        write(`[${value}/${o.total}] ${text}\n`);
      },
      log: (line) => write(line + "\n"),
      stop() {},
    };
  }
  const bar = new cliProgress.SingleBar({
    format: `{bar} {value}/{total} | ETA {eta_formatted} | ${o.format}`,
    hideCursor: true,
    clearOnComplete: false,
    etaBuffer: 20,
  }, cliProgress.Presets.shades_classic);
  const blank = Object.fromEntries([...o.format.matchAll(/\{(\w+)\}/g)].map((m) => [m[1], "…"]));
  bar.start(o.total, o.start ?? 0, blank);
  return {
    update: (value, fields) => bar.update(value, fields),
    log(line) {
      // cli-progress redraws on the next update; clear the line first so the text stays readable.
      process.stdout.write("\r\x1b[2K" + line + "\n");
      bar.render();
    },
    stop: () => bar.stop(),
  };
}
