// Writing a dataset whole or not at all. The pair is written to temporary files and fsynced,
// the old sidecar (our completeness mark) removed, the pair renamed into place, and the
// sidecar written last; a failure part-way removes whatever of the pair it left, so no
// .bin sits beside an .idx of another write.
import * as nodeFs from "node:fs";
import { dirname } from "node:path";

/** The file operations used, injectable so tests can make one fail. */
export type FsOps = Pick<typeof nodeFs, "openSync" | "writeSync" | "fsyncSync" | "closeSync" | "renameSync" | "unlinkSync" | "existsSync" | "mkdirSync">;

function writeDurable(fs: FsOps, path: string, data: Uint8Array): void {
  const fd = fs.openSync(path, "w");
  try {
    let at = 0;
    while (at < data.byteLength) at += fs.writeSync(fd, data, at, data.byteLength - at);
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

export function commitDataset(prefix: string, bin: Uint8Array, idx: Uint8Array, sidecar: string, fs: FsOps = nodeFs): void {
  const dir = dirname(prefix);
  fs.mkdirSync(dir, { recursive: true });
  const tag = `.tmp-${process.pid}`;
  const files = [
    { final: `${prefix}.bin`, tmp: `${prefix}.bin${tag}`, data: bin },
    { final: `${prefix}.idx`, tmp: `${prefix}.idx${tag}`, data: idx },
    { final: `${prefix}.json`, tmp: `${prefix}.json${tag}`, data: Buffer.from(sidecar, "utf8") },
  ];
  let phase: "temporaries" | "pair" | "sidecar" = "temporaries";
  try {
    for (const f of files) writeDurable(fs, f.tmp, f.data);
    removeQuietly(fs, files[2].final);
    fsyncDir(fs, dir);
    phase = "pair";
    fs.renameSync(files[0].tmp, files[0].final);
    fs.renameSync(files[1].tmp, files[1].final);
    fsyncDir(fs, dir);
    phase = "sidecar";
    fs.renameSync(files[2].tmp, files[2].final);
    fsyncDir(fs, dir);
  } catch (e) {
    for (const f of files) removeQuietly(fs, f.tmp);
    if (phase === "pair") {
      removeQuietly(fs, files[0].final);
      removeQuietly(fs, files[1].final);
    }
    const left = {
      temporaries: "nothing was replaced",
      pair: "the half-replaced pair was removed",
      sidecar: "the pair is complete but has no sidecar",
    }[phase];
    throw new Error(`${prefix}: writing the dataset failed (${(e as Error).message}); ${left}`);
  }
}
