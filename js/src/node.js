// Node.js entry point: Session on onnxruntime-node, reading files from disk.
import { access, readFile, writeFile, rename, unlink } from "node:fs/promises";
import { basename, dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { RuntimeUserError, importPeer } from "./errors.js";
import { Session as BaseSession, checkThreads } from "./session.js";

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
    options ??= {};
    if (path instanceof URL && path.protocol === "file:") path = fileURLToPath(path);
    checkThreads(options.threads);
    const ort = options.ort ?? (await importPeer("onnxruntime-node", () => import("onnxruntime-node")));
    const so = { ...(options.sessionOptions ?? {}) };
    if (options.threads) { so.intraOpNumThreads = options.threads; so.interOpNumThreads = 1; }
    return this._create(ort, nodeIO, path, { ...options, sessionOptions: so });
  }

  /** Write a state as .npz (atomically: a temporary file renamed into place). */
  async saveStateFile(state, path) {
    if (typeof path !== "string" || !path) throw new RuntimeUserError(`a state file must be a path string, not ${typeof path}`);
    const bytes = await state.save();
    // a name of its own (two saves to one path never share a temporary file), removed on any failure
    const tmp = `${path}.${process.pid}.${Math.random().toString(36).slice(2, 10)}.tmp`;
    try {
      await writeFile(tmp, bytes);
      await rename(tmp, path);
    } catch (e) {
      await unlink(tmp).catch(() => {});
      const why = { ENOENT: "no such folder", EISDIR: "is a directory", EACCES: "permission denied", ENOSPC: "no space left on device" }[e.code];
      throw new RuntimeUserError(`${path}: cannot write the state (${why ?? e.message})`);
    }
  }
}
