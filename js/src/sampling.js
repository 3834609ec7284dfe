// Sampling with the Python runtime's semantics (runtime/sampling.py, ChatRWKV's PIPELINE): penalties
// on the logits with decaying occurrence counts, softmax, top-p cut, top-k, temperature on the
// probabilities, temperature 0 = greedy. The random generator is numpy's (random.js), so a seeded
// sampler picks the same tokens as Python's for the same logits (see docs/edge.md for the limits).
import { NumpyRandom } from "./random.js";

const f32 = Math.fround;

/** @type {import("./index.d.ts").SamplingParams} */
export const DEFAULT_SAMPLING = Object.freeze({
  temperature: 1.0, top_p: 0.85, top_k: 0, presence_penalty: 0, frequency_penalty: 0, penalty_decay: 0.996,
  seed: null, ban: [], stop: [],
});

/** float32 softmax as numpy computes it on a float32 array (rounding each operation to float32). */
export function softmax32(logits) {
  let m = -Infinity;
  for (let i = 0; i < logits.length; i++) if (logits[i] > m) m = logits[i];
  const e = new Float64Array(logits.length);
  let s = 0;
  for (let i = 0; i < logits.length; i++) { e[i] = f32(Math.exp(f32(logits[i] - m))); s += e[i]; }
  s = f32(s);
  for (let i = 0; i < e.length; i++) e[i] = f32(e[i] / s);
  return e;
}

/** Python's sample_probs: probs (float64 copy made here) -> token id. */
export function sampleProbs(probsIn, temperature, topP, topK, rng) {
  if (temperature <= 0) return argmax(probsIn);
  const probs = Float64Array.from(probsIn);
  const order = Array.from(probs.keys()).sort((a, b) => probs[b] - probs[a]);
  let cum = 0, cutoff = probs[order[0]];
  for (const i of order) {
    cum += probs[i];
    if (cum >= topP) { cutoff = probs[i]; break; }
  }
  for (let i = 0; i < probs.length; i++) if (probs[i] < cutoff) probs[i] = 0;
  if (topK > 0 && topK < probs.length) for (let j = topK; j < order.length; j++) probs[order[j]] = 0;
  if (temperature !== 1) for (let i = 0; i < probs.length; i++) probs[i] = probs[i] ** (1 / temperature);
  let s = 0;
  for (let i = 0; i < probs.length; i++) s += probs[i];
  for (let i = 0; i < probs.length; i++) probs[i] /= s;
  return rng.choice(probs);
}

export function argmax(x) {
  let best = 0;
  for (let i = 1; i < x.length; i++) if (x[i] > x[best]) best = i;
  return best;
}

/** One sequence's sampler: parameters, random generator, occurrence counts. Call it with logits. */
export class Sampler {
  /** @param {Partial<import("./index.d.ts").SamplingParams>} params */
  constructor(params = {}) {
    this.params = { ...DEFAULT_SAMPLING, ...params };
    this.rng = new NumpyRandom(this.params.seed);
    /** @type {Map<number, number>} */
    this.occurrence = new Map();
  }

  /** @param {Float32Array|number[]} logitsIn one row of logits @returns {number} token id */
  sample(logitsIn) {
    const p = this.params;
    const logits = Float32Array.from(logitsIn);
    for (const t of p.ban) logits[t] = -Infinity;
    for (const [t, n] of this.occurrence) logits[t] = f32(logits[t] - f32(p.presence_penalty + n * p.frequency_penalty));
    const token = sampleProbs(softmax32(logits), p.temperature, p.top_p, p.top_k, this.rng);
    for (const [t, n] of this.occurrence) this.occurrence.set(t, n * p.penalty_decay);
    this.occurrence.set(token, (this.occurrence.get(token) ?? 0) + 1);
    return token;
  }
}
