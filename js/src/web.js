// Browser entry point: Session on onnxruntime-web (WASM, or WebGPU with the state kept on the GPU).
import { RuntimeUserError } from "./errors.js";
import { Session as BaseSession, checkThreads } from "./session.js";

export * from "./common.js";

// onnxruntime-web's JSEP build (the bundle's ort.webgpu.min.mjs, WASM and WebGPU) wraps OrtRun so that
// a second run started while one is suspended (a WebGPU readback) throws "Session already started" -
// for any session of that WASM module: two generate() calls at once, or the demo page starting a new
// continuation while the last one still runs. So every run here waits its turn.
let queue = Promise.resolve();
function exclusive(fn) {
  const turn = queue.then(fn);
  queue = turn.catch(() => {});
  return turn;
}

function webIO(gpuState) {
  const io = {
    gpuState,
    preallocate: false, // see session.js: WASM ignores pre-allocated CPU outputs; WebGPU keeps GPU buffers
    label: (u) => String(u).split("/").pop(),
    resolve: (u, name) => new URL(name, new URL(u, globalThis.location?.href)).href,
    async exists(u) {
      const r = await fetch(u, { method: "HEAD" }).catch(() => null);
      return !!r && r.ok;
    },
    async read(u) {
      const r = await fetch(u).catch((e) => { throw new RuntimeUserError(`${u}: ${e.message}`); });
      if (!r.ok) throw new RuntimeUserError(`${u}: HTTP ${r.status}`);
      return new Uint8Array(await r.arrayBuffer());
    },
    async readText(u) { return new TextDecoder().decode(await io.read(u)); },
    // the bytes we already fetched, plus the external-data files their initializers name (ORT fetches them)
    modelArg: (u, bytes) => bytes,
    exclusive,
    extraOptions: (u, external) => (external.length ? { externalData: external.map((path) => ({ path, data: io.resolve(u, path) })) } : {}),
  };
  return io;
}

export class Session extends BaseSession {
  /**
   * Load an export with onnxruntime-web.
   * @param {string} url the .onnx (companions and external data are fetched beside it)
   * @param {import("./index.d.ts").SessionOptions} [options] backend: "wasm" (default) or "webgpu"
   */
  static async create(url, options = {}) {
    options ??= {};
    if (url instanceof URL) url = url.href;
    checkThreads(options.threads);
    const ort = options.ort ?? (await import("onnxruntime-web"));
    const backend = options.backend ?? "wasm";
    if (backend !== "wasm" && backend !== "webgpu") throw new RuntimeUserError(`backend must be "wasm" or "webgpu", not ${backend}`);
    if (options.threads) ort.env.wasm.numThreads = options.threads; // global in onnxruntime-web
    const so = { executionProviders: [backend], ...(options.sessionOptions ?? {}) };
    const s = await this._create(ort, webIO(backend === "webgpu"), url, { ...options, sessionOptions: so });
    s.backend = backend;
    return s;
  }
}
