// The train/validation split by document, deterministic from a seed. The same rule is in
// py/ampipe/data/split.py (so a dataset without our sidecar splits the same way); a test
// checks both give the same lists.
//
// Rule: document j gets the key splitmix64((splitmix64(seed) + j) mod 2^64); documents are
// ordered by (key, j); the first n_valid of that order are the validation split, where
// n_valid = 0 for fraction 0, else min(N - 1, max(1, floor(fraction * N + 0.5))).
// Both lists are returned in ascending document order.

const MASK = (1n << 64n) - 1n;

export function splitmix64(x: bigint): bigint {
  let z = (x + 0x9e3779b97f4a7c15n) & MASK;
  z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & MASK;
  z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & MASK;
  return z ^ (z >> 31n);
}

export function validCount(numDocuments: number, fraction: number): number {
  if (fraction === 0 || numDocuments === 0) return 0;
  return Math.min(numDocuments - 1, Math.max(1, Math.floor(fraction * numDocuments + 0.5)));
}

export interface DocumentSplit {
  train: number[];
  valid: number[];
}

export function checkSplitArgs(seed: number, fraction: number): void {
  if (!Number.isInteger(seed) || seed < 0 || seed > 0xffffffff) throw new Error(`--seed: must be an integer in [0, 2^32 - 1], got ${seed}`);
  if (!Number.isFinite(fraction) || fraction < 0 || fraction >= 1) throw new Error(`--valid-fraction: must be in [0, 1), got ${fraction}`);
}

export function splitDocuments(numDocuments: number, seed: number, fraction: number): DocumentSplit {
  checkSplitArgs(seed, fraction);
  const base = splitmix64(BigInt(seed));
  const keyed = Array.from({ length: numDocuments }, (_, j) => ({ j, key: splitmix64((base + BigInt(j)) & MASK) }));
  keyed.sort((a, b) => (a.key < b.key ? -1 : a.key > b.key ? 1 : a.j - b.j));
  const n = validCount(numDocuments, fraction);
  const valid = keyed.slice(0, n).map((d) => d.j).sort((a, b) => a - b);
  const inValid = new Set(valid);
  const train = Array.from({ length: numDocuments }, (_, j) => j).filter((j) => !inValid.has(j));
  return { train, valid };
}
