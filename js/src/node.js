// Node.js entry point: Session on onnxruntime-node, reading files from disk.
import { access, readFile, realpath, writeFile, rename, unlink } from "node:fs/promises";
import { basename, dirname, join, sep } from "node:path";
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
  /** The file `name` beside model `p` must really lie in the model's folder, as runtime/artifact.py
   *  confined_path: its real path (symlinks resolved) inside the real folder holding the model as named,
   *  or the folder of the model's real file (a Hugging Face cache links both into blobs/). A name that
   *  does not resolve (missing) is left to the caller's existence check. */
  async confine(p, name) {
    const real = await realpath(join(dirname(p), name)).catch(() => null);
    if (real === null) return;
    const roots = await Promise.all([realpath(dirname(p)), realpath(p).then(dirname)].map((r) => r.catch(() => null)));
    if (roots.some((r) => r !== null && real.startsWith(r.endsWith(sep) ? r : r + sep))) return;
    throw new RuntimeUserError(`${basename(p)}: names a file ${JSON.stringify(name.slice(0, 60))} outside the model's folder ` +
      `(it resolves to ${real.slice(0, 160)}, a link out of the folder); refusing to read it (keep an export's files together in one folder)`);
  },
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
