// The demo page: load the bundle's model, stream a continuation of the prompt as the user types,
// show tokens/s and the backend. window.demo exposes the state for automated checks.
import { Session } from "./rwkv-runtime/web.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const demo = (window.demo = { ready: null, runs: 0, last: null, error: null });

async function pickBackend() {
  const asked = params.get("backend");
  if (asked) return asked;
  if (navigator.gpu && (await navigator.gpu.requestAdapter().catch(() => null))) return "webgpu";
  return "wasm";
}

async function load() {
  const bundle = await (await fetch("./bundle.json")).json();
  const backend = await pickBackend();
  const threads = Number(params.get("threads")) || (crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1);
  const session = await Session.create(`./${bundle.model}`, {
    backend, threads, worldVocab: bundle.world_vocab ? `./${bundle.world_vocab}` : undefined,
  });
  const ort = session.ort;
  const label = backend === "webgpu" ? "WebGPU" : `WASM, ${ort.env.wasm.numThreads} thread${ort.env.wasm.numThreads > 1 ? "s" : ""}` +
    (crossOriginIsolated ? "" : " (no cross-origin isolation)");
  $("backend").textContent = label;
  $("model").textContent = `${bundle.architecture} · ${bundle.model} · ${session.graphs.join("+")}`;
  demo.backend = label;
  return session;
}

let generation = 0;
async function run(session) {
  const mine = ++generation;
  const prompt = $("prompt").value;
  const out = $("out");
  out.innerHTML = "";
  const p = document.createElement("span");
  p.className = "prompt";
  p.textContent = prompt;
  out.append(p, document.createTextNode(""));
  if (!prompt) return;
  let text = "";
  const t = { temperature: Number($("temp").value), top_p: 0.85, maxNewTokens: Number($("max").value) || 64 };
  const gen = session.generate(prompt, t); // gen.stats: this run's figures (a run the user's typing started may overlap)
  for await (const piece of gen) {
    if (mine !== generation) return; // the user typed again: this run is stale
    text += piece;
    out.lastChild.textContent = text;
    $("speed").textContent = `${gen.stats.tokensPerSecond.toFixed(1)} tokens/s`;
  }
  demo.runs++;
  demo.last = { prompt, text, stats: { ...gen.stats } };
}

// The first ~200 WASM steps run at about half speed (the browser is still compiling ONNX Runtime's
// WASM to optimised code), so the page runs them before it shows any speed: at most WARMUP_STEPS
// greedy steps or WARMUP_MS, whichever ends first (?warmup=0 skips it).
const WARMUP_STEPS = Number(params.get("warmup") ?? 200), WARMUP_MS = 8000;
async function warmUp(session) {
  if (!WARMUP_STEPS) return;
  $("speed").textContent = "warming up…";
  const t0 = performance.now();
  let steps = 0;
  const it = session.generateTokens([0], { temperature: 0, maxNewTokens: WARMUP_STEPS });
  for await (const _ of it) if (++steps >= WARMUP_STEPS || performance.now() - t0 > WARMUP_MS) break;
  it.state?.dispose(); // (WebGPU: its GPU buffers)
  demo.warmup = { steps, ms: performance.now() - t0 };
  $("speed").textContent = "–";
}

demo.ready = load().then(async (session) => {
  await warmUp(session);
  demo.session = session;
  let timer;
  const kick = () => { clearTimeout(timer); timer = setTimeout(() => run(session).catch(fail), 250); };
  for (const id of ["prompt", "max", "temp"]) $(id).addEventListener("input", kick);
  kick();
}).catch(fail);

function fail(e) {
  demo.error = String(e?.message ?? e);
  $("backend").textContent = "error";
  $("out").textContent = demo.error;
}
