// Decode tokens/s of an export on onnxruntime-node: warm-up steps, then `tokens` timed greedy steps.
//   node bench/node-bench.mjs MODEL.onnx [tokens=64] [threads]   -> one JSON line
import { Session } from "../src/node.js";

const [model, tokens = "64", threads] = process.argv.slice(2);
const s = await Session.create(model, { graphs: ["step"], ...(threads ? { threads: Number(threads) } : {}) });
let state = s.newState(1), tok = 0;
for (let i = 0; i < 4; i++) ({ state } = await s.step([tok], state));
const n = Number(tokens);
const t0 = performance.now();
for (let i = 0; i < n; i++) {
  const r = await s.step([tok], state);
  state = r.state;
  let best = 0; // greedy on the CPU, as generation does
  const l = r.logits[0];
  for (let j = 1; j < l.length; j++) if (l[j] > l[best]) best = j;
  tok = best;
}
const sec = (performance.now() - t0) / 1000;
console.log(JSON.stringify({ runtime: "node", tokens: n, seconds: sec, tokens_per_s: n / sec, threads: threads ? Number(threads) : null }));
