// Browser decode tokens/s (scripts/bench_edge.py serves this with the model): ?model=&backend=&threads=&tokens=
import { Session } from "./rwkv-runtime/web.js";

const q = new URLSearchParams(location.search);
const backend = q.get("backend") ?? "wasm", n = Number(q.get("tokens") ?? 32);
try {
  const s = await Session.create(q.get("model"), { backend, threads: Number(q.get("threads") ?? 1), graphs: ["step"] });
  let state = s.newState(1), tok = 0;
  for (let i = 0; i < 3; i++) ({ state } = await s.step([tok], state));
  const t0 = performance.now();
  for (let i = 0; i < n; i++) {
    const r = await s.step([tok], state);
    state.dispose(); // a step never frees the state passed in (WebGPU: its GPU buffers)
    state = r.state;
    const l = r.logits[0];
    let best = 0;
    for (let j = 1; j < l.length; j++) if (l[j] > l[best]) best = j;
    tok = best;
  }
  const sec = (performance.now() - t0) / 1000;
  const { env } = await import("onnxruntime-web");
  window.benchResult = { runtime: `browser-${backend}`, tokens: n, seconds: sec, tokens_per_s: n / sec,
    threads: backend === "wasm" ? env.wasm.numThreads : null, isolated: crossOriginIsolated,
    state_location: state.values[s.manifest.state[0].name].location };
} catch (e) {
  window.benchResult = { error: String(e?.message ?? e) };
}
document.getElementById("log").textContent = JSON.stringify(window.benchResult);
