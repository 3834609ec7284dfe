// Node.js entry point: Session on onnxruntime-node, reading files from disk.
import { access, readFile, writeFile, rename } from "node:fs/promises";
import { basename, dirname, join } from "node:path";
import { RuntimeUserError } from "./errors.js";
import { Session as BaseSession } from "./session.js";

export * from "./common.js";

const nodeIO = {
  gpuState: false,
  preallocate: true, // onnxruntime-node writes outputs into pre-allocated tensors
  label: (p) => basename(p),
  resolve: (p, name) => join(dirname(p), name),
  exists: (p) => access(p).then(() => true, () => false),
  async read(p) {
    try {
      return new Uint8Array(await readFile(p));
    } catch (e) {
      throw new RuntimeUserError(`${p}: ${e.code === "ENOENT" ? "no such file" : e.message}`);
    }
  },
  async readText(p) { return new TextDecoder().decode(await nodeIO.read(p)); },
  // the path, so onnxruntime finds external data (model.onnx.data) beside the model itself
  modelArg: (p) => p,
};

export class Session extends BaseSession {
  /**
   * Load an export with onnxruntime-node.
   * @param {string} path the .onnx (step or sequence graph; companions are found beside it)
   * @param {import("./index.d.ts").SessionOptions} [options]
   */
  static async create(path, options = {}) {
    const ort = options.ort ?? (await import("onnxruntime-node"));
    const so = { ...(options.sessionOptions ?? {}) };
    if (options.threads) { so.intraOpNumThreads = options.threads; so.interOpNumThreads = 1; }
    return this._create(ort, nodeIO, path, { ...options, sessionOptions: so });
  }

  /** Write a state as .npz (atomically: a temporary file renamed into place). */
  async saveStateFile(state, path) {
    const tmp = `${path}.tmp`;
    await writeFile(tmp, await state.save());
    await rename(tmp, path);
  }
}
