// The bytes an expert-parallel all-to-all puts on the wire: the one model, for the cost model
// (costs.ts), the bench sweep's emulated bandwidth (sweep/emulation.ts) and, in Python, the emulated
// interconnect and the benchmarks (py/ampipe/wire.py, the same functions;
// test/ts/plan/wire.test.ts holds the two to the same numbers).

/** Bytes per expert of the count exchange before a dispatch (one int64). */
export const COUNT_BYTES = 8;

/**
 * Slots per expert for `tokens` tokens: ceil((tokens x topk / E) x factor), in Megatron's order of
 * operations (`get_capacity`, as the router computes it); null when dropless (no factor).
 */
export function expertCapacity(tokens: number, topk: number, experts: number, capacityFactor: number | null): number | null {
  return capacityFactor === null ? null : Math.ceil(((tokens * topk) / experts) * capacityFactor);
}

/** Rows of a chunk's dispatch (and combine) buffer: every token's top-k slots when dropless, else E x capacity rows. */
export function a2aRows(tokens: number, topk: number, experts: number, capacityFactor: number | null): number {
  const cap = expertCapacity(tokens, topk, experts, capacityFactor);
  return cap === null ? tokens * topk : experts * cap;
}

/** Bytes a rank sends for a buffer of `bufferBytes` among `world` ranks: all but its own 1/world share. */
export function wireBytes(bufferBytes: number, world: number): number {
  return (bufferBytes * (world - 1)) / world;
}
