// The noise envelope of a dropless comparison (docs/compare.md): the pipelined arm's divergence
// from the baseline against the control arm's (the baseline with every initial weight moved by
// one ulp, py/ampipe/train/compare.py). Both arms compute the same function as the baseline, so
// both divergences are rounding amplified by training; a block that computes something else
// shows up as a divergence above the control's.
//
// The rule, per seed and per recorded divergence (|Δloss| and |Δgrad norm| at every step, the
// relative parameter distance at every evaluation): the running maximum of the pipelined arm's
// divergence never exceeds K times the running maximum of the control's, where each control
// value counts as at least the resolution of what is compared (one fp32 ulp of the baseline's
// value; for the relative parameter distance fp32's unit roundoff 2^-24), so that two arms whose
// differences are both below what fp32 can show are not told apart.

/** One fp32 ulp at |x| (the spacing of fp32 numbers there). */
export function ulp32(x: number): number {
  const f = new Float32Array([Math.abs(x)]);
  if (!Number.isFinite(f[0])) return Infinity;
  const bits = new Uint32Array(f.buffer);
  const up = new Float32Array(new Uint32Array([bits[0] + 1]).buffer)[0];
  return up - f[0];
}

/** fp32's unit roundoff: the floor of a relative difference. */
export const UNIT_ROUNDOFF_32 = 2 ** -24;

export const DIVERGENCES = ["loss", "grad_norm", "param_distance"] as const;
export type Divergence = (typeof DIVERGENCES)[number];

export interface DivergenceCurve {
  steps: number[];
  pipelined: number[];
  control: number[];
  /** The resolution under which a control value is counted as this instead. */
  floor: number[];
}

export interface EnvelopeCheck {
  met: boolean;
  /** The first step where the pipelined arm's running max left the envelope. */
  first_outside: { step: number; pipelined: number; envelope: number } | null;
  /** max over steps of (pipelined running max) / (envelope / K): how close to K it came. */
  worst_ratio: number;
  worst_step: number | null;
}

/** The rule on one divergence curve with factor K. */
export function checkEnvelope(c: DivergenceCurve, factor: number): EnvelopeCheck {
  if (!(factor >= 1)) throw new Error(`the envelope factor must be >= 1; got ${factor}`);
  let rp = 0;
  let rc = 0;
  let firstOutside: EnvelopeCheck["first_outside"] = null;
  let worst = 0;
  let worstStep: number | null = null;
  for (let i = 0; i < c.steps.length; i++) {
    rp = Math.max(rp, c.pipelined[i]);
    rc = Math.max(rc, c.control[i], c.floor[i]);
    const ratio = rp === 0 ? 0 : rp / rc;
    if (ratio > worst) {
      worst = ratio;
      worstStep = c.steps[i];
    }
    if (rp > factor * rc && !firstOutside) firstOutside = { step: c.steps[i], pipelined: rp, envelope: factor * rc };
  }
  return { met: firstOutside === null, first_outside: firstOutside, worst_ratio: worst, worst_step: worstStep };
}

export interface SeedEnvelope {
  met: boolean;
  checks: Record<Divergence, EnvelopeCheck>;
}

export function checkSeed(curves: Record<Divergence, DivergenceCurve>, factor: number): SeedEnvelope {
  const checks = Object.fromEntries(DIVERGENCES.map((d) => [d, checkEnvelope(curves[d], factor)])) as Record<Divergence, EnvelopeCheck>;
  return { met: DIVERGENCES.every((d) => checks[d].met), checks };
}
