// The browser side of tests/edge/test_browser.py: the Node checks of node.test.js, in a page, on
// onnxruntime-web (WASM with N threads, or WebGPU). Results go to window.checkResult.
import { Session } from "./runtime/rwkv-runtime/web.js";

const params = new URLSearchParams(location.search);
const backend = params.get("backend") ?? "wasm";
const threads = Number(params.get("threads") ?? 1);
const log = (s) => { document.getElementById("log").textContent += `\n${s}`; };

function maxDiff(a, b) {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

async function checkModel(c) {
  const s = await Session.create(c.url, { backend, threads });
  const r = { name: c.name, graphs: s.graphs };
  let state = s.newState(1), worst = 0;
  for (let i = 0; i < c.prompt.length; i++) {
    const out = await s.step([c.prompt[i]], state);
    worst = Math.max(worst, maxDiff(out.logits[0], c.step_logits[i]));
    state.dispose(); // a step never frees the state passed in (WebGPU: its GPU buffers)
    state = out.state;
  }
  r.stepMaxDiff = worst;
  r.stateLocation = state.values[s.manifest.state[0].name].location; // "gpu-buffer" on WebGPU
  const saved = await state.save(); // downloads GPU buffers; the Python side's format
  r.savedBytes = saved.length;
  state.dispose();
  const last = c.step_logits[c.step_logits.length - 1];
  r.prefillMaxDiff = 0;
  for (const chunk of [256, 5]) {
    const p = await s.prefill(c.prompt, undefined, chunk);
    r.prefillMaxDiff = Math.max(r.prefillMaxDiff, maxDiff(p.logits[0], last));
    p.state.dispose();
  }
  const loaded = await s.loadState(saved);
  r.reloadMaxDiff = maxDiff((await s.step([c.after_state_token], loaded)).logits[0], c.after_state_logits);
  const got = [];
  for await (const t of s.generateTokens(c.prompt, { temperature: 0, maxNewTokens: c.greedy.length })) got.push(t);
  r.greedyEqual = JSON.stringify(got) === JSON.stringify(c.greedy);
  r.greedyFirstMismatch = got.findIndex((t, i) => t !== c.greedy[i]);
  // two generations at once on one session (the demo page overlaps runs as the user types): the JSEP
  // build refuses a run while another is in flight on WebGPU, so web.js queues them; both are right
  const n = Math.min(12, c.greedy.length);
  const gen = async () => { const out = []; for await (const t of s.generateTokens(c.prompt, { temperature: 0, maxNewTokens: n })) out.push(t); return out; };
  const both = await Promise.all([gen(), gen()]);
  r.concurrentEqual = both.every((g) => JSON.stringify(g) === JSON.stringify(c.greedy.slice(0, n)));
  await s.release();
  return r;
}

async function main() {
  const cases = await (await fetch("./browser-cases.json")).json();
  const result = { backend, threads, isolated: crossOriginIsolated, models: [] };
  for (const c of cases) {
    log(`${c.name}…`);
    result.models.push(await checkModel(c));
  }
  const { env } = await import("onnxruntime-web");
  result.numThreads = env.wasm.numThreads;
  result.webgpuAdapter = backend === "webgpu" ? String(env.webgpu?.adapter?.info?.vendor ?? "") + "/" + String(env.webgpu?.adapter?.info?.architecture ?? "") : null;
  log(JSON.stringify(result, null, 1));
  window.checkResult = result;
}

main().catch((e) => { window.checkResult = { error: String(e?.stack ?? e) }; log(String(e?.stack ?? e)); });
