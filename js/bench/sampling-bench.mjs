// The sampler's draw over 65,536 log-probabilities in Node (as scripts/bench_sampling.py for Python): the
// runtime's sampleLogprobs against the same semantics sorting the whole vocabulary on every draw.
//   node bench/sampling-bench.mjs [rounds=5]   -> a table, ms per draw (best round)
import { sampleLogprobs, pairwiseSum } from "../src/sampling.js";
import { NumpyRandom } from "../src/random.js";

const V = 65536;
const rounds = Number(process.argv[2] ?? 5);

function fullSort(logp, temperature, topP, topK, rng) {
  const probs = logp.map(Math.exp);
  const order = Array.from(logp.keys()).sort((a, b) => (logp[b] > logp[a]) - (logp[b] < logp[a]));
  let acc = 0, at = -1;
  for (let j = 0; j < order.length && at < 0; j++) if ((acc += probs[order[j]]) >= topP) at = j;
  const keep = logp.map((v) => v >= logp[order[Math.max(at, 0)]]);
  const scaled = logp.map((v, i) => (keep[i] ? v / temperature : -Infinity));
  const q = scaled.map((v) => Math.exp(v));
  const s = pairwiseSum(q);
  return rng.choice(q.map((v) => v / s));
}

const g = new NumpyRandom(0);
const normal = () => Math.sqrt(-2 * Math.log(1 - g.random())) * Math.cos(2 * Math.PI * g.random());
function logSoftmax(x) {
  const m = Math.max(...x.filter((v) => v > -Infinity));
  const z = m + Math.log(pairwiseSum(x.map((v) => Math.exp(v - m))));
  return x.map((v) => v - z);
}
const peaked = Array.from({ length: V }, () => 3 * normal());
for (let i = 0; i < 8; i++) peaked[Math.floor(g.random() * V)] += 12; // a few likely tokens, a long tail
const dists = { peaked: logSoftmax(peaked), "flat (random model)": logSoftmax(Array.from({ length: V }, () => 0.5 * normal())) };

function time(fn, logp, topP, n = 10) {
  const rng = new NumpyRandom(1);
  const t0 = performance.now();
  for (let i = 0; i < n; i++) fn(logp, 1.0, topP, 0, rng);
  return (performance.now() - t0) / n;
}

console.log("| logits | top_p | runtime ms | full sort ms |\n|---|---:|---:|---:|");
for (const [name, logp] of Object.entries(dists)) {
  for (const topP of [1.0, 0.85]) {
    let a = Infinity, b = Infinity;
    for (let r = 0; r < rounds; r++) {
      a = Math.min(a, time(sampleLogprobs, logp, topP));
      b = Math.min(b, time(fullSort, logp, topP));
    }
    console.log(`| ${name} | ${topP} | ${a.toFixed(2)} | ${b.toFixed(2)} |`);
  }
}
