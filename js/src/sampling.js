// Sampling with the Python runtime's semantics (runtime/sampling.py, ChatRWKV's PIPELINE), computed
// the same way: in log space, float64. Penalties on the logits with decaying occurrence counts;
// log-softmax; top-p cut, top-k, temperature dividing the log-probabilities; temperature 0 = greedy.
// logit_bias (OpenAI's) is added to the logits first, as the penalties are.
// Sums use numpy's pairwise summation and the random generator is numpy's (random.js), so a seeded
// sampler picks the same tokens as Python's for the same logits (limits: docs/edge.md).
import { RuntimeUserError } from "./errors.js";
import { NumpyRandom } from "./random.js";

/** @type {import("./index.d.ts").SamplingParams} */
export const DEFAULT_SAMPLING = Object.freeze({
  temperature: 1.0, top_p: 0.85, top_k: 0, presence_penalty: 0, frequency_penalty: 0, penalty_decay: 0.996,
  seed: null, ban: [], stop: [], logit_bias: null,
});

/** numpy's pairwise summation (what np.sum does on a contiguous float64 array). */
export function pairwiseSum(a, lo = 0, n = a.length) {
  if (n < 8) {
    let r = 0;
    for (let i = lo; i < lo + n; i++) r += a[i];
    return r;
  }
  if (n <= 128) {
    const r = Array.from({ length: 8 }, (_, j) => a[lo + j]);
    const end = n - (n % 8);
    for (let i = 8; i < end; i += 8) for (let j = 0; j < 8; j++) r[j] += a[lo + i + j];
    let res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (let i = end; i < n; i++) res += a[lo + i];
    return res;
  }
  let n2 = Math.floor(n / 2);
  n2 -= n2 % 8;
  return pairwiseSum(a, lo, n2) + pairwiseSum(a, lo + n2, n - n2);
}

function maxOf(x) {
  let m = -Infinity;
  for (let i = 0; i < x.length; i++) if (x[i] > m) m = x[i];
  return m;
}

export function argmax(x) {
  let best = 0;
  for (let i = 1; i < x.length; i++) if (x[i] > x[best]) best = i;
  return best;
}

function logSoftmax(x) {
  const m = maxOf(x);
  const e = x.map((v) => Math.exp(v - m));
  const z = m + Math.log(pairwiseSum(e));
  return x.map((v) => v - z);
}

/** Python's sample_logprobs: one token from log-probabilities (-Infinity = impossible). */
export function sampleLogprobs(logp, temperature, topP, topK, rng) {
  if (temperature <= 0) return argmax(logp);
  const useK = topK > 0 && topK < logp.length;
  const sorted = () => Array.from(logp.keys()).sort((a, b) => (logp[b] > logp[a]) - (logp[b] < logp[a])); // stable
  let keep, order = null;
  if (topP >= 1) {
    // as Python: top_p 1 keeps every possible token, no sort unless top_k asks for one
    keep = logp.map((v) => v > -Infinity);
  } else {
    const probs = logp.map(Math.exp);
    // as Python: the nucleus needs only the head of the descending order; the full sort is the fallback
    const cumulative = (o) => { let acc = 0; return Float64Array.from(o, (i) => (acc += probs[i])); };
    order = nucleusHead(logp, probs, topP);
    let cum = order && cumulative(order);
    if (!cum || cum[cum.length - 1] < topP) cum = cumulative((order = sorted())); // no head, or one that falls short
    const limit = Math.min(topP, cum[cum.length - 1]);
    let at = 0;
    while (at < cum.length && !(cum[at] >= limit)) at++;
    if (at === cum.length) at = 0; // numpy's argmax of an all-False mask
    const cutoff = logp[order[at]];
    keep = logp.map((v) => v >= cutoff);
  }
  if (useK) { order ??= sorted(); for (let j = topK; j < order.length; j++) keep[order[j]] = false; }
  const scaled = logp.map((v, i) => (keep[i] ? v / temperature : -Infinity));
  const m = maxOf(scaled);
  const q = scaled.map((v) => Math.exp(v - m));
  const s = pairwiseSum(q);
  for (let i = 0; i < q.length; i++) q[i] /= s;
  return rng.choice(q);
}

/** Python's _nucleus_head: the first entries of the stable descending order, enough that their
 *  cumulative sum reaches topP (the caller checks it on the sum it computes anyway), or null. Exactly
 *  the full order's head (the tokens with logp >= a bound come first, and a stable sort of them breaks
 *  ties as the full one does), and the cut is topP itself (it is below the total by more than either
 *  sum's rounding): the same token as the full sort. */
function nucleusHead(logp, probs, topP) {
  const n = logp.length;
  const total = pairwiseSum(probs);
  const margin = 2 * n * Number.EPSILON * total;
  if (!(topP <= total - margin)) return null;
  const top = maxOf(logp);
  for (const drop of [8, 16, 32]) { // tokens within e^-drop of the most likely one
    const head = [];
    for (let i = 0; i < n; i++) if (logp[i] >= top - drop) head.push(i);
    if (head.length > Math.floor(n / 4)) return null; // a flat distribution: the full sort costs little more
    let mass = 0;
    for (const i of head) mass += probs[i];
    if (mass >= topP + margin) {
      return head.sort((a, b) => (logp[b] > logp[a]) - (logp[b] < logp[a])); // stable
    }
  }
  return null;
}

function number(name, v, lo = null, hi = null) {
  if (typeof v !== "number" || !Number.isFinite(v)) throw new RuntimeUserError(`sampling: ${name} must be a finite number, not ${v}`);
  if ((lo !== null && v < lo) || (hi !== null && v > hi)) {
    throw new RuntimeUserError(`sampling: ${name} must be in [${lo}, ${hi ?? "inf"}], not ${v}`);
  }
}

function ids(name, list, vocab) {
  const arr = typeof list === "number" ? [list] : Array.from(list ?? []);
  for (const t of arr) {
    if (!Number.isInteger(t)) throw new RuntimeUserError(`sampling: ${name} holds ${t}, not a token id`);
    if (t < 0 || (vocab != null && t >= vocab)) throw new RuntimeUserError(`sampling: ${name} id ${t} is outside the vocabulary [0, ${vocab})`);
  }
  return new Set(arr);
}

/** logit_bias -> Map(token id -> value): an object (JSON's string keys, "42") or a Map of ids. */
function biasMap(bias, vocab) {
  if (bias === null || bias === undefined) return new Map();
  if (typeof bias !== "object" || Array.isArray(bias)) {
    throw new RuntimeUserError(`sampling: logit_bias must be an object {token id: value}, not ${Array.isArray(bias) ? "an array" : typeof bias}`);
  }
  const entries = bias instanceof Map ? [...bias] : Object.entries(bias).map(([k, v]) => [/^\d+$/.test(k) ? Number(k) : k, v]);
  ids("logit_bias", entries.map(([t]) => t), vocab);
  for (const [t, v] of entries) number(`logit_bias[${t}]`, v);
  return new Map(entries);
}

/** Check sampling parameters (as Python's check_params): one clear RuntimeUserError. */
export function checkParams(p, vocabSize = null) {
  number("temperature", p.temperature, 0);
  number("top_p", p.top_p, 0, 1);
  if (!Number.isInteger(p.top_k) || p.top_k < 0) throw new RuntimeUserError(`sampling: top_k must be an integer >= 0, not ${p.top_k}`);
  number("presence_penalty", p.presence_penalty);
  number("frequency_penalty", p.frequency_penalty);
  number("penalty_decay", p.penalty_decay, 0, 1);
  const seedOk = p.seed === null || p.seed === undefined || (typeof p.seed === "bigint" && p.seed >= 0n) ||
    (Number.isSafeInteger(p.seed) && p.seed >= 0);
  if (!seedOk) throw new RuntimeUserError(`sampling: seed must be an integer >= 0 (or null), not ${p.seed}`);
  ids("ban", p.ban, vocabSize);
  ids("stop", p.stop, vocabSize);
  biasMap(p.logit_bias, vocabSize);
  return p;
}

/** One sequence's sampler: parameters, random generator, occurrence counts. Call sample(logits). */
export class Sampler {
  /** @param {Partial<import("./index.d.ts").SamplingParams>} params @param {number|null} vocabSize */
  constructor(params = {}, vocabSize = null) {
    const known = Object.keys(DEFAULT_SAMPLING);
    params ??= {};
    if (typeof params !== "object") throw new RuntimeUserError(`sampling: settings must be an object, not ${typeof params}`);
    // constrained decoding (Python's SamplingParams.constraint) is not in this runtime: say so, not "unknown"
    const constrained = ["constraint", "responseFormat", "response_format", "jsonSchema", "regex", "grammar", "choice"]
      .find((k) => k in params);
    if (constrained) {
      throw new RuntimeUserError(`sampling: ${constrained}: constrained decoding is not available in the JavaScript runtime ` +
        "(docs/edge.md); constrain on the Python runtime or the server and stream its output");
    }
    // an unknown key (topP, max_new_tokens, ...) would silently sample with the default instead
    const unknown = Object.keys(params).filter((k) => !known.includes(k));
    if (unknown.length) {
      throw new RuntimeUserError(`sampling: unknown setting ${unknown[0]} (known: ${known.join(", ")}; generate also takes maxNewTokens, state, stopStrings, logprobs)`);
    }
    this.params = { ...DEFAULT_SAMPLING };
    for (const k of known) if (params[k] !== undefined) this.params[k] = params[k];
    checkParams(this.params, vocabSize);
    this.ban = ids("ban", this.params.ban, vocabSize);
    this.stop = ids("stop", this.params.stop, vocabSize);
    this.bias = biasMap(this.params.logit_bias, vocabSize);
    this.rng = new NumpyRandom(this.params.seed);
    /** @type {Map<number, number>} */
    this.occurrence = new Map();
  }

  /** @param {Float32Array|number[]} logits one row @returns {number} token id */
  sample(logits) {
    const p = this.params;
    if (!logits.length) throw new RuntimeUserError("sampling: logits must be one non-empty row");
    const x = Float64Array.from(logits);
    for (let i = 0; i < x.length; i++) {
      if (!Number.isFinite(x[i])) throw new RuntimeUserError("sampling: the logits contain NaN or inf (a damaged model or state?)");
    }
    for (const t of this.ban) {
      if (t >= x.length) throw new RuntimeUserError(`sampling: ban id ${t} is outside the vocabulary [0, ${x.length})`);
      x[t] = -Infinity;
    }
    if (this.ban.size >= x.length) throw new RuntimeUserError("sampling: every token is banned");
    for (const [t, v] of this.bias) {
      if (t >= x.length) throw new RuntimeUserError(`sampling: logit_bias id ${t} is outside the vocabulary [0, ${x.length})`);
      x[t] += v; // (a banned token stays -inf)
    }
    for (const [t, n] of this.occurrence) x[t] -= p.presence_penalty + n * p.frequency_penalty;
    if (!Number.isFinite(maxOf(x)) || x.some(Number.isNaN)) throw new RuntimeUserError("sampling: the penalties or logit_bias overflowed the logits (use smaller values)");
    const token = sampleLogprobs(logSoftmax(x), p.temperature, p.top_p, p.top_k, this.rng);
    for (const [t, n] of this.occurrence) this.occurrence.set(t, n * p.penalty_decay);
    this.occurrence.set(token, (this.occurrence.get(token) ?? 0) + 1);
    return token;
  }
}
