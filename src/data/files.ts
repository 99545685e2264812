// Writing a dataset whole or not at all. The .bin is streamed into a temporary file, then the
// .idx and the sidecar are written to theirs, all fsynced; the old sidecar (our completeness
// mark) is removed, the pair renamed into place, and the sidecar renamed last. A failure
// part-way removes the temporaries and whatever of the pair it replaced, so no .bin is left
// beside an .idx of another write.
import { createHash, randomBytes, type Hash } from "node:crypto";
import * as nodeFs from "node:fs";
import { dirname } from "node:path";

/** The file operations used, injectable so tests can make one fail. */
export type FsOps = Pick<typeof nodeFs, "openSync" | "writeSync" | "fsyncSync" | "closeSync" | "renameSync" | "unlinkSync" | "existsSync" | "mkdirSync">;

export interface FileFacts {
  bytes: number;
  sha256: string;
}

function writeAll(fs: FsOps, fd: number, data: Uint8Array): void {
  let at = 0;
  while (at < data.byteLength) at += fs.writeSync(fd, data, at, data.byteLength - at);
}

function writeDurable(fs: FsOps, path: string, data: Uint8Array): void {
  const fd = fs.openSync(path, "w");
  try {
    writeAll(fs, fd, data);
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

function fsyncDir(fs: FsOps, dir: string): void {
  const fd = fs.openSync(dir, "r");
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

const removeQuietly = (fs: FsOps, path: string) => {
  try {
    if (fs.existsSync(path)) fs.unlinkSync(path);
  } catch {
    // best effort: the error being reported matters more
  }
};

type Phase = "temporaries" | "pair" | "sidecar" | "done";
const LEFT: Record<Exclude<Phase, "done">, string> = {
  temporaries: "nothing was replaced",
  pair: "the half-replaced pair was removed",
  sidecar: "the pair is complete but has no sidecar",
};

/** PREFIX.bin streamed in with `append`, then `commit` (or `abort`, which any failure does itself). */
export class PairWriter {
  readonly bin: string;
  readonly idx: string;
  readonly sidecar: string;
  private readonly tmp: { bin: string; idx: string; sidecar: string };
  private fd: number | null;
  private readonly hash: Hash = createHash("sha256");
  private bytes = 0;
  private phase: Phase = "temporaries";

  constructor(
    readonly prefix: string,
    private readonly fs: FsOps = nodeFs,
  ) {
    this.bin = `${prefix}.bin`;
    this.idx = `${prefix}.idx`;
    this.sidecar = `${prefix}.json`;
    const tag = `.tmp-${process.pid}-${randomBytes(4).toString("hex")}`; // unique also across worker threads
    this.tmp = { bin: this.bin + tag, idx: this.idx + tag, sidecar: this.sidecar + tag };
    this.fd = this.guard(() => {
      fs.mkdirSync(dirname(prefix), { recursive: true });
      return fs.openSync(this.tmp.bin, "w");
    });
  }

  append(data: Uint8Array): void {
    this.guard(() => writeAll(this.fs, this.fd!, data));
    this.hash.update(data);
    this.bytes += data.byteLength;
  }

  /** Writes the .idx and the sidecar (made from the pair's sizes and checksums), then swaps them all in. */
  commit(idx: Uint8Array, sidecar: (files: { bin: FileFacts; idx: FileFacts }) => string): void {
    const fs = this.fs;
    this.guard(() => {
      fs.fsyncSync(this.fd!);
      fs.closeSync(this.fd!);
      this.fd = null;
      const files = {
        bin: { bytes: this.bytes, sha256: this.hash.digest("hex") },
        idx: { bytes: idx.byteLength, sha256: createHash("sha256").update(idx).digest("hex") },
      };
      writeDurable(fs, this.tmp.idx, idx);
      writeDurable(fs, this.tmp.sidecar, Buffer.from(sidecar(files), "utf8"));
      removeQuietly(fs, this.sidecar);
      fsyncDir(fs, dirname(this.prefix));
      this.phase = "pair";
      fs.renameSync(this.tmp.bin, this.bin);
      fs.renameSync(this.tmp.idx, this.idx);
      fsyncDir(fs, dirname(this.prefix));
      this.phase = "sidecar";
      fs.renameSync(this.tmp.sidecar, this.sidecar);
      fsyncDir(fs, dirname(this.prefix));
      this.phase = "done";
    });
  }

  /** Removes the temporaries (and a half-replaced pair); safe to call more than once. */
  abort(): void {
    const fs = this.fs;
    if (this.fd !== null) {
      try {
        fs.closeSync(this.fd);
      } catch {
        // already closed
      }
      this.fd = null;
    }
    for (const p of Object.values(this.tmp)) removeQuietly(fs, p);
    if (this.phase === "pair") {
      removeQuietly(fs, this.bin);
      removeQuietly(fs, this.idx);
    }
  }

  private guard<T>(step: () => T): T {
    try {
      return step();
    } catch (e) {
      const phase = this.phase;
      this.abort();
      throw new Error(`${this.prefix}: writing the dataset failed (${(e as Error).message}); ${phase === "done" ? "" : LEFT[phase]}`);
    }
  }
}
