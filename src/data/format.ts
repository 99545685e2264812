// Megatron-LM's MMapIndexedDataset format (megatron/core/datasets/indexed_dataset.py):
//   PREFIX.bin  the tokens of every sequence, back to back, in one dtype;
//   PREFIX.idx  b"MMIDIDX\x00\x00", <Q version (1), <B dtype code, <Q sequence count S,
//               <Q document count D, int32 sizes[S], int64 byte pointers[S] into .bin,
//               int64 document_indices[D] (0, then the sequence index after each document's last).
// All little-endian. We write one sequence per document, as Megatron's preprocess_data.py does
// without --split-sentences, so S = D - 1.

export const INDEX_MAGIC = Buffer.from("MMIDIDX\x00\x00", "latin1");
export const INDEX_VERSION = 1n;
/** Bytes before the sizes array: magic 9, version 8, dtype 1, sequence count 8, document count 8. */
export const INDEX_HEADER_BYTES = 34;

/** Megatron's DType codes and item sizes. */
export const DTYPES = {
  uint8: { code: 1, bytes: 1 },
  int8: { code: 2, bytes: 1 },
  int16: { code: 3, bytes: 2 },
  int32: { code: 4, bytes: 4 },
  int64: { code: 5, bytes: 8 },
  float64: { code: 6, bytes: 8 },
  float32: { code: 7, bytes: 4 },
  uint16: { code: 8, bytes: 2 },
} as const;
export type TokenDtype = "uint16" | "int32";

/** The dtype Megatron picks for a vocabulary (DType.optimal_dtype): uint16 below 65500, else int32. */
export function optimalDtype(vocabSize: number): TokenDtype {
  return vocabSize < 65500 ? "uint16" : "int32";
}

/** The .bin bytes: every document's tokens, in order, as `dtype`. */
export function encodeBin(docs: ArrayLike<number>[], dtype: TokenDtype): Buffer {
  const total = docs.reduce((n, d) => n + d.length, 0);
  const limit = dtype === "uint16" ? 0xffff : 0x7fffffff;
  const out = dtype === "uint16" ? new Uint16Array(total) : new Int32Array(total);
  let at = 0;
  docs.forEach((d, j) => {
    for (let i = 0; i < d.length; i++) {
      const t = d[i];
      if (!Number.isInteger(t) || t < 0 || t > limit) throw new Error(`document ${j}, token ${i}: id ${t} does not fit ${dtype}`);
      out[at++] = t;
    }
  });
  // Typed arrays are host-endian; every platform Node supports here is little-endian.
  return Buffer.from(out.buffer, out.byteOffset, out.byteLength);
}

/** The .idx bytes for one sequence per document with the given token counts. */
export function encodeIndex(docLengths: number[], dtype: TokenDtype): Buffer {
  const S = docLengths.length;
  const D = S + 1;
  const buf = Buffer.alloc(INDEX_HEADER_BYTES + 4 * S + 8 * S + 8 * D);
  INDEX_MAGIC.copy(buf, 0);
  buf.writeBigUInt64LE(INDEX_VERSION, 9);
  buf.writeUInt8(DTYPES[dtype].code, 17);
  buf.writeBigUInt64LE(BigInt(S), 18);
  buf.writeBigUInt64LE(BigInt(D), 26);
  let off = INDEX_HEADER_BYTES;
  for (const n of docLengths) {
    if (n > 0x7fffffff) throw new Error(`a document of ${n} tokens does not fit the int32 sizes of the .idx`);
    buf.writeInt32LE(n, off);
    off += 4;
  }
  let ptr = 0n;
  const item = BigInt(DTYPES[dtype].bytes);
  for (const n of docLengths) {
    buf.writeBigInt64LE(ptr, off);
    ptr += BigInt(n) * item;
    off += 8;
  }
  for (let j = 0; j < D; j++) {
    buf.writeBigInt64LE(BigInt(j), off);
    off += 8;
  }
  return buf;
}
