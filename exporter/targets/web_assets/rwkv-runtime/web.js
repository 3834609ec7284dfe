// Browser entry point: Session on onnxruntime-web (WASM, or WebGPU with the state kept on the GPU).
import { RuntimeUserError, importPeer } from "./errors.js";
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

const short = (e) => String(e?.cause?.message ?? e?.message ?? e).split("\n")[0].slice(0, 200);

function webIO(gpuState) {
  const io = {
    gpuState,
    preallocate: false, // see session.js: WASM ignores pre-allocated CPU outputs; WebGPU keeps GPU buffers
    label: (u) => String(u).split("/").pop(),
    resolve(u, name) {
      // name is a plain file name (checked as Python's plain_file_name); as a URL it must still land in
      // the model's own folder: URL parsing reads "%2e%2e" as "..", and "?" / "#" would change the request
      const base = new URL(u, globalThis.location?.href), url = new URL(name, base), dir = new URL("./", base).href;
      if (/[?#%]/.test(name) || url.origin !== base.origin || !url.href.startsWith(dir) || url.href.slice(dir.length).includes("/")) {
        throw new RuntimeUserError(`${io.label(u)}: names a file ${JSON.stringify(String(name).slice(0, 60))} outside the model's folder; re-export the model`);
      }
      return url.href;
    },
    async exists(u) {
      // a network error is not "absent" (that would silently drop the sequence graph): tried again
      // once (a kept-alive connection the server has just closed fails the first try), then an error
      const head = () => fetch(u, { method: "HEAD" });
      const r = await head().catch(() => head()).catch((e) => { throw new RuntimeUserError(`${u}: ${short(e)}`); });
      return r.ok;
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
    const ort = options.ort ?? (await importPeer("onnxruntime-web", () => import("onnxruntime-web")));
    const backend = options.backend ?? "wasm";
    if (backend !== "wasm" && backend !== "webgpu") throw new RuntimeUserError(`backend must be "wasm" or "webgpu", not ${backend}`);
    if (options.threads) ort.env.wasm.numThreads = options.threads; // global in onnxruntime-web
    // where ORT Web's .wasm / .mjs files are served (bundlers do not copy them; see README "Bundlers")
    if (options.wasmPaths) ort.env.wasm.wasmPaths = options.wasmPaths;
    const so = { executionProviders: [backend], ...(options.sessionOptions ?? {}) };
    const s = await this._create(ort, webIO(backend === "webgpu"), url, { ...options, sessionOptions: so });
    s.backend = backend;
    return s;
  }
}
