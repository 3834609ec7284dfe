// Session: an exported RWKV model run with ONNX Runtime for JavaScript (onnxruntime-node, or
// onnxruntime-web on WASM / WebGPU). The same API shape as the Python runtime (runtime/session.py):
// create, newState, step, prefill, prefillMany, generate, saveState/loadState, setInitialState.
// Everything about the model comes from the manifest read out of the model bytes (onnx-meta.js).
//
// The state rule is Python's: a state passed in is read, never written or consumed, and every call
// returns a new state (keep any state to branch from it again). Inside one call (the chunks of a
// prefill, the steps of a generate) the intermediate states belong to the call, so they are recycled:
// on Node two pre-allocated buffer sets are written in turn (ORT writes the outputs into the spare
// set); on WebGPU the state outputs stay GPU buffers fed back as the next inputs, and the consumed
// intermediate ones are freed. onnxruntime-web's WASM backend (1.30) ignores pre-allocated CPU outputs
// (it returns them unwritten: checked in js/test), so there the outputs it returns become the state.
import { RuntimeUserError } from "./errors.js";
import { INITIAL_STATE_KEY, MANIFEST_KEY, TOKENIZER_KEY, checkCompanion, concreteShape, parseManifest, plainFileName } from "./manifest.js";
import { loadNpz, saveNpz } from "./npz.js";
import { scanModel } from "./onnx-meta.js";
import { Sampler } from "./sampling.js";
import { makeTokenizer } from "./tokenizers.js";
import { Batch, Row, TextStream, concatRows, pickRows } from "./generation.js";

export const EXPORT_ID_KEY = "__rwkv_export_id__"; // the export a saved state belongs to (as Python's)
export const MAX_BATCH = 1 << 16; // as Python's MAX_STATE_BATCH: more rows than this is a mistake (or damage)
const size = (shape) => shape.reduce((a, b) => a * b, 1);
const ARRAY = { float32: Float32Array, float16: Uint16Array };
const GEN_KEYS = new Set(["maxNewTokens", "state", "stopStrings", "logprobs"]); // generate's own settings besides the sampler's
const short = (e) => String(e?.message ?? e).split("\n")[0].slice(0, 200);
export const NO_TOKENIZER = "the model has no tokenizer (it was exported with --tokenizer none): give token ids to " +
  "generateTokens/step/prefill, or re-export with --tokenizer";

/** The inverse of pickRows: `part`'s rows written back into `arrays` at `rows`. */
function putRows(arrays, part, rows, n) {
  for (const [k, a] of Object.entries(arrays)) {
    const per = a.data.length / n;
    rows.forEach((r, j) => a.data.set(part[k].data.subarray(j * per, (j + 1) * per), r * per));
  }
}

/** A thread count option: an integer >= 0 (0/undefined: onnxruntime's default), checked here because
 *  onnxruntime's own error blames the model file. */
export function checkThreads(threads) {
  if (threads !== undefined && threads !== null && !(Number.isInteger(threads) && threads >= 0)) {
    throw new RuntimeUserError(`threads must be an integer >= 1 (or 0: onnxruntime's default), not ${String(threads).slice(0, 40)}`);
  }
}

/** A token id: an integer (number or bigint); never a string, boolean or null that Number() would coerce. */
function tokenId(t, vocab) {
  const ok = typeof t === "bigint" || (typeof t === "number" && Number.isInteger(t));
  if (!ok) {
    const what = Array.isArray(t) ? "an array (step takes one id per batch row; prefill takes rows of ids)" : typeof t === "string" ? JSON.stringify(t.slice(0, 20)) : String(t).slice(0, 40);
    throw new RuntimeUserError(`token ids must be integers, not ${what}`);
  }
  if (t < 0 || t >= vocab) throw new RuntimeUserError(`token id ${t} is outside [0, ${vocab})`);
  return BigInt(t);
}

/** float -> IEEE half bits (for a float16 state's fill value). */
function halfBits(x) {
  const f = new Float32Array([x]), u = new Uint32Array(f.buffer)[0];
  const sign = (u >>> 16) & 0x8000, exp = ((u >>> 23) & 0xff) - 127 + 15, mant = u & 0x7fffff;
  if (exp >= 31) return sign | 0x7c00; // overflow -> inf (RWKV-4's -1e30 becomes -inf)
  if (exp <= 0) return sign;
  return sign | (exp << 10) | (mant >>> 13);
}

/** The recurrent state of a batch. Made by Session.newState / loadState / stateFromArrays and returned
 *  by every step / prefill / generate; never changed by a call it is passed to. */
export class State {
  constructor(session, batch, values) {
    this.session = session;
    this.batch = batch;
    /** @type {Record<string, any>} ort Tensors by state input name */
    this.values = values;
    this._live = true;
  }

  _check() {
    if (!this._live) throw new RuntimeUserError("this state was disposed; keep (or clone()) a state you still need");
  }

  /** The state as plain arrays {name: {dtype, shape, data}} (copies; downloads GPU buffers). */
  async toArrays() {
    this._check();
    const out = {};
    for (const s of this.session.manifest.state) {
      const t = this.values[s.name];
      const data = t.location === "gpu-buffer" ? await t.getData() : t.data;
      out[s.name] = { dtype: s.dtype, shape: [...t.dims], data: new ARRAY[s.dtype](data) };
    }
    return out;
  }

  /** An independent copy. (Calls never write the state passed in, so branching needs no copy.) */
  async clone() { return this.session.stateFromArrays(await this.toArrays()); }

  /** .npz bytes: the same format as Python's State.save (the state tensors and the export id). */
  async save() {
    return saveNpz({ ...(await this.toArrays()), [EXPORT_ID_KEY]: { dtype: "str", shape: [], data: this.session.manifest.export_id } });
  }

  /** Free its GPU buffers now (WebGPU: needed, ORT does not free them on garbage collection; CPU
   *  states are garbage-collected and this only marks them unusable). */
  dispose() {
    if (!this._live) return;
    this._live = false;
    for (const t of Object.values(this.values)) if (t.location === "gpu-buffer") t.dispose();
  }
}

/**
 * One call's run of graphs over a state it must not write: the first run reads the caller's state;
 * later runs read the call's own intermediate states, which are recycled (Node: two buffer sets
 * written in turn; WebGPU: a consumed intermediate state's GPU buffers are freed). finish() hands
 * the last state over to the caller as a new State.
 */
class Chain {
  constructor(session, start) {
    this.s = session;
    this.start = start.values;
    this.cur = start.values;
    this.startState = start;
    this.batch = start.batch;
    this.spare = null; // Node: the buffer set the next run writes into
  }

  async run(kind, tokenData, dims) {
    const s = this.s;
    const into = s.io.preallocate ? (this.spare ?? s._cpuSet(this.batch)) : null;
    const { logits, values } = await s._run(kind, tokenData, dims, this.cur, into);
    if (this.cur !== this.start) {
      if (s.io.preallocate) this.spare = this.cur;
      else for (const t of Object.values(this.cur)) if (t.location === "gpu-buffer") t.dispose();
    } else if (s.io.preallocate) {
      this.spare = null;
    }
    this.cur = values;
    return logits;
  }

  /** The last state, as the caller's new State (null when nothing ran). */
  finish() {
    if (this.cur === this.start) return null;
    const st = new State(this.s, this.batch, this.cur);
    this.cur = this.start; // the chain keeps nothing of it
    this.spare = null;
    return st;
  }

  /** The chain is given up without handing its state over: WebGPU frees its intermediate buffers. */
  discard() {
    if (this.cur !== this.start && !this.s.io.preallocate) {
      for (const t of Object.values(this.cur)) if (t.location === "gpu-buffer") t.dispose();
    }
    this.cur = this.start;
    this.spare = null;
  }
}

export class Session {
  /**
   * Use Session.create from "rwkv-runtime" (Node) or "rwkv-runtime/web" (browser) instead.
   * @param {any} ort the onnxruntime module @param {object} io how files are read on this platform
   */
  static async _create(ort, io, source, options = {}) {
    if (typeof source !== "string" || !source) {
      throw new RuntimeUserError(`a model must be given as a path or URL string, not ${source === null ? "null" : typeof source}`);
    }
    options ??= {};
    const s = new this(); // the subclass (node.js / web.js) it was called on
    s.ort = ort;
    s.io = io;
    s.source = source;
    s.options = options;
    s.prefillChunk = options.prefillChunk ?? 256;
    if (!(Number.isInteger(s.prefillChunk) && s.prefillChunk >= 1)) {
      throw new RuntimeUserError(`prefillChunk must be an integer >= 1, not ${String(options.prefillChunk).slice(0, 40)}`);
    }
    s.device = io.gpuState ? "webgpu" : "cpu";
    const main = await s._loadGraph(source, null);
    s.manifest = main.manifest;
    s.metadata = main.metadata;
    s.sessions = { [s.manifest.graph]: main.session };
    s.labels = { [s.manifest.graph]: main.label };
    s.tokenTypes = { [s.manifest.graph]: main.tokenType };
    const wanted = options.graphs ?? ["step", "sequence"];
    for (const [kind, name] of Object.entries(s.manifest.companions)) {
      if (kind === s.manifest.graph || !wanted.includes(kind)) continue;
      const src = io.resolve(source, name); // a plain file name beside the model (parseManifest checked it)
      await io.confine?.(source, name); // Node: not a symlink out of the model's folder
      if (!(await io.exists(src))) continue; // a missing sequence graph: prefill steps instead
      const g = await s._loadGraph(src, name, kind);
      checkCompanion(s.manifest, g.manifest, name, kind);
      s.sessions[kind] = g.session;
      s.labels[kind] = name;
      s.tokenTypes[kind] = g.tokenType;
    }
    s.initial = {};
    if (s.manifest.initial_state === "embedded") s.initial = await s._initialState(main.label);
    s._exportInitial = s.initial;
    if (options.initialState !== undefined && options.initialState !== null) await s.setInitialState(options.initialState);
    return s;
  }

  /**
   * Make newState start from `initial` (as Python's set_initial_state): .npz bytes, a path/URL to
   * them, an object of arrays {name: {dtype, shape, data}} or a State, of batch 1 (a tensor left out
   * keeps its usual start). null goes back to the export's own start state. Checked as a saved state
   * is (names, dtypes, shapes, no NaN, the export id).
   */
  async setInitialState(initial) {
    if (initial === null || initial === undefined) { this.initial = this._exportInitial; return; }
    let where = "initial state", arrays;
    if (initial instanceof State) {
      if (initial.session !== this) throw new RuntimeUserError("an initial State must come from this session");
      arrays = await initial.toArrays();
    } else if (typeof initial === "string" || initial instanceof Uint8Array || initial instanceof ArrayBuffer) {
      if (typeof initial === "string") where = initial;
      arrays = await loadNpz(typeof initial === "string" ? await this.io.read(initial) : initial, where, this._npzLimits());
      if (EXPORT_ID_KEY in arrays && arrays[EXPORT_ID_KEY].dtype !== "str") throw new RuntimeUserError(`${where}: malformed export id`);
    } else if (initial && typeof initial === "object") {
      arrays = { ...initial };
    } else {
      throw new RuntimeUserError(`an initial state must be .npz bytes, a path/URL, an object of arrays or a State, not ${typeof initial}`);
    }
    if (EXPORT_ID_KEY in arrays) {
      const id = arrays[EXPORT_ID_KEY];
      this._checkExportId(id?.data ?? id, where);
      delete arrays[EXPORT_ID_KEY];
    }
    this._checkArrays(arrays, where, { requireAll: false, batch: 1, nan: true });
    const init = {};
    for (const [k, a] of Object.entries(arrays)) init[k] = { ...a, data: this._asDtype(a, k) };
    this.initial = init;
  }

  /** The export's learned initial state (base64 of an .npz in the metadata), checked as Python's
   *  decode_initial_state: names, dtypes, shapes [1, ...], no NaN. */
  async _initialState(label) {
    const where = `${label} (embedded initial state)`;
    const b64 = this.metadata[INITIAL_STATE_KEY];
    if (typeof b64 !== "string" || !b64) {
      throw new RuntimeUserError(`${label}: the manifest says it embeds an initial state, but none is there; re-export`);
    }
    let raw;
    try {
      raw = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    } catch {
      throw new RuntimeUserError(`${label}: the embedded initial state is not valid base64; re-export`);
    }
    const arrays = await loadNpz(raw, where, this._npzLimits());
    delete arrays[EXPORT_ID_KEY];
    this._checkArrays(arrays, where, { requireAll: false, batch: 1, nan: true });
    for (const [k, a] of Object.entries(arrays)) arrays[k] = { ...a, data: this._asDtype(a, k) };
    return arrays;
  }

  async _loadGraph(src, name, kind = null) {
    const label = name ?? this.io.label(src);
    const bytes = await this.io.read(src);
    let info;
    try {
      info = scanModel(bytes);
    } catch (e) {
      throw new RuntimeUserError(`${label}: ${e.message}`);
    }
    if (!(MANIFEST_KEY in info.metadata)) {
      throw new RuntimeUserError(`${label}: no rwkv manifest in this ONNX model (was it exported by rwkv-export?)`);
    }
    const manifest = parseManifest(info.metadata[MANIFEST_KEY], label);
    if (kind && manifest.graph !== kind) {
      throw new RuntimeUserError(`${label}: named as the ${kind} graph of this export but is a ${manifest.graph} graph; re-export the model`);
    }
    // the weights file(s) its initializers name: beside the graph, under a plain name (onnxruntime's own
    // message for a missing one is cut off before the file name; a "../x" or URL would read elsewhere)
    for (const w of info.externalData) {
      if (!plainFileName(w)) throw new RuntimeUserError(`${label}: names a weights file ${JSON.stringify(w.slice(0, 60))} outside the model's folder; re-export the model`);
      await this.io.confine?.(src, w);
      if (!(await this.io.exists(this.io.resolve(src, w)))) {
        throw new RuntimeUserError(`${label}: its weights file ${w} is missing; it must stay beside the graph under that name ` +
          "(copy or move the export's files together)");
      }
    }
    const so = { graphOptimizationLevel: "all", ...(this.options.sessionOptions ?? {}) };
    if (this.io.gpuState) {
      // state outputs stay on the GPU; logits (the one output the sampler reads) come to the CPU
      so.preferredOutputLocation = Object.fromEntries(manifest.state.map((st) => [st.output, "gpu-buffer"]));
    }
    let session;
    try {
      const extra = this.io.extraOptions ? this.io.extraOptions(src, info.externalData) : {};
      session = await this.ort.InferenceSession.create(this.io.modelArg(src, bytes), { ...so, ...extra });
    } catch (e) {
      const msg = short(e);
      if (info.externalData.length && /GetExtDataFromTensorProto|External data|external data/.test(msg)) {
        throw new RuntimeUserError(`${label}: its weights file ${info.externalData.join(", ")} is truncated or damaged; copy the ` +
          `export's files again or re-export (${msg})`);
      }
      throw new RuntimeUserError(`${label}: onnxruntime could not load the model (${msg})`);
    }
    const tokenType = checkGraphIO(manifest, session, label);
    return { manifest, metadata: info.metadata, session, label, tokenType };
  }

  get vocabSize() { return this.manifest.vocab_size; }
  /** Which graphs are loaded ("step", "sequence"). */
  get graphs() { return Object.keys(this.sessions); }

  // -- tokenizer ------------------------------------------------------------------------------
  async tokenizer() {
    this._tokenizer ??= await makeTokenizer(this.manifest.tokenizer, {
      embeddedJSON: this.metadata[TOKENIZER_KEY] ?? null,
      worldVocab: this.options.worldVocab ? () => this.io.readText(this.options.worldVocab) : null,
    });
    return this._tokenizer;
  }
  async encode(text) { return this._encodeWith(await this.tokenizer(), text); }
  async decode(ids) {
    if (!Array.isArray(ids) || !ids.every((t) => (typeof t === "number" && Number.isInteger(t) && t >= 0) || (typeof t === "bigint" && t >= 0n))) {
      throw new RuntimeUserError(`decode needs an array of integer token ids >= 0, not ${String(ids).slice(0, 40)}`);
    }
    return (await this.tokenizer()).decode(ids);
  }

  /** Text -> ids, checked: valid Unicode (a lone surrogate would silently become U+FFFD, where the
   *  Python runtime refuses it), and ids inside the model's vocabulary (a wrong --tokenizer). */
  _encodeWith(tok, text) {
    if (typeof text !== "string") throw new RuntimeUserError(`text to encode must be a string, not ${text === null ? "null" : typeof text}`);
    if (/[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/.test(text)) {
      throw new RuntimeUserError("the text holds a lone UTF-16 surrogate (not valid Unicode); pass well-formed text");
    }
    const ids = tok.encode(text);
    const bad = ids.find((i) => !(i >= 0 && i < this.vocabSize));
    if (bad !== undefined) {
      throw new RuntimeUserError(`the model's tokenizer (${this.manifest.tokenizer.kind ?? "none"}) encoded the text to token id ${bad}, ` +
        `outside the model's vocabulary [0, ${this.vocabSize}): the export's tokenizer does not fit this model; re-export with the right --tokenizer`);
    }
    return ids;
  }

  // -- state ------------------------------------------------------------------------------------
  _cpuSet(batch) {
    const out = {};
    for (const s of this.manifest.state) {
      const shape = concreteShape(s, batch);
      out[s.name] = new this.ort.Tensor(s.dtype, new ARRAY[s.dtype](size(shape)), shape);
    }
    return out;
  }

  /** A fresh state for `batch` sequences: the manifest's fill values (RWKV-4's pp = -1e30), or
   *  the export's learned initial state broadcast over the batch. */
  newState(batch = 1) {
    if (!Number.isInteger(batch) || batch < 1 || batch > MAX_BATCH) {
      throw new RuntimeUserError(`batch must be an integer in [1, ${MAX_BATCH}], not ${String(batch).slice(0, 40)}`);
    }
    const front = this._cpuSet(batch);
    for (const s of this.manifest.state) {
      const d = front[s.name].data;
      const init = this.initial[s.name];
      if (init) {
        const row = d.length / batch;
        for (let b = 0; b < batch; b++) d.set(init.data.subarray(0, row), b * row);
      } else if (s.init !== 0) {
        d.fill(s.dtype === "float16" ? halfBits(s.init) : s.init);
      }
    }
    return new State(this, batch, front);
  }

  /**
   * Check {name: {dtype, shape, data}} against the manifest (as Python's check_state_arrays): known
   * names, dtypes, shapes with one batch in [1, MAX_BATCH], data of the shape's length, optionally
   * no NaN. Returns the batch.
   */
  _checkArrays(arrays, where, { requireAll = true, batch = null, nan = false } = {}) {
    const pre = where ? `${where}: ` : "";
    if (!arrays || typeof arrays !== "object") throw new RuntimeUserError(`${pre}a state must be an object of arrays by name, not ${arrays === null ? "null" : typeof arrays}`);
    const specs = new Map(this.manifest.state.map((s) => [s.name, s]));
    for (const k of Object.keys(arrays)) {
      if (!specs.has(k)) throw new RuntimeUserError(`${pre}names ${JSON.stringify(k.slice(0, 60))}, which this model has no state tensor for`);
    }
    if (requireAll) {
      const missing = this.manifest.state.filter((s) => !(s.name in arrays));
      if (missing.length) throw new RuntimeUserError(`${pre}state is missing ${missing.length} tensor(s), e.g. ${missing[0].name}`);
    }
    for (const [k, a] of Object.entries(arrays)) {
      const s = specs.get(k);
      if (!a || typeof a !== "object") throw new RuntimeUserError(`${pre}state tensor ${k} must be {dtype, shape, data}`);
      if (a.dtype !== s.dtype && !(a.dtype === "float32" && s.dtype === "float16")) { // (float32 is converted, as Python's)
        throw new RuntimeUserError(`${pre}state tensor ${k} has dtype ${String(a.dtype).slice(0, 30)}, expected ${s.dtype}`);
      }
      const shape = Array.isArray(a.shape) ? a.shape : [];
      const b = shape[0];
      if (!(Number.isInteger(b) && b >= 1 && b <= MAX_BATCH) || (batch !== null && b !== batch)) {
        throw new RuntimeUserError(`${pre}state tensor ${k} has shape [${shape}], expected [${concreteShape(s, batch ?? "batch")}]` +
          (batch !== null ? ` (batch ${batch})` : ""));
      }
      batch = b;
      const want = concreteShape(s, b);
      if (shape.length !== want.length || shape.some((d, i) => d !== want[i])) {
        throw new RuntimeUserError(`${pre}state tensor ${k} has shape [${shape}], expected [${want}] (batch ${b})`);
      }
      if (!a.data || typeof a.data.length !== "number" || a.data.length !== size(want)) {
        throw new RuntimeUserError(`${pre}state tensor ${k} has ${a.data?.length ?? "no"} values, its shape [${want}] needs ${size(want)}`);
      }
      // float16 data is raw half bits: NaN is exponent all ones with a mantissa (was: only float32 checked)
      const nanAt = a.dtype === "float16" ? (h) => (h & 0x7c00) === 0x7c00 && (h & 0x3ff) !== 0 : Number.isNaN;
      if (nan && Array.prototype.some.call(a.data, nanAt)) {
        throw new RuntimeUserError(`${pre}state tensor ${k} holds NaN`);
      }
    }
    return batch;
  }

  /** An array's data as a typed array of the state's dtype: a copy, the state never aliases the caller's. */
  _asDtype(a, name) {
    const dtype = this.manifest.state.find((st) => st.name === name).dtype;
    if (dtype === "float16" && a.dtype === "float32") return Uint16Array.from(a.data, halfBits);
    return new ARRAY[dtype](a.data);
  }

  /** A state from plain arrays {name: {dtype, shape, data}} (checked against the manifest: names,
   *  dtypes, shapes, sizes; an export id member, as toArrays/loadNpz give, must be this model's). */
  stateFromArrays(arrays, where = "") {
    if (arrays && typeof arrays === "object" && EXPORT_ID_KEY in arrays) {
      const { [EXPORT_ID_KEY]: id, ...rest } = arrays;
      this._checkExportId(id?.data ?? id, where || "state");
      arrays = rest;
    }
    const batch = this._checkArrays(arrays, where);
    const front = {};
    for (const s of this.manifest.state) {
      front[s.name] = new this.ort.Tensor(s.dtype, this._asDtype(arrays[s.name], s.name), concreteShape(s, batch));
    }
    return new State(this, batch, front);
  }

  _checkExportId(saved, where) {
    if (typeof saved !== "string") throw new RuntimeUserError(`${where}: malformed export id`);
    const mine = this.manifest.export_id;
    if (saved && mine && saved !== mine) {
      throw new RuntimeUserError(`${where}: this state was saved from another export (id ${saved.slice(0, 16)}), not from ` +
        `this model (id ${mine.slice(0, 16)}); states only load into the model that made them`);
    }
  }

  /** The most bytes one .npz member of this model's states can hold: its largest tensor at MAX_BATCH
   *  rows, plus a .npy header (Python's reader bounds a member the same way, by its checked header). */
  _npzLimits() {
    const row = Math.max(...this.manifest.state.map((s) => size(s.shape.slice(1)) * 4));
    return { maxMemberBytes: row * MAX_BATCH + 65536 };
  }

  /** .npz bytes of a state (Python's Session.load_state reads them). */
  async saveState(state) { return state.save(); }

  /** A state from .npz bytes (e.g. written by Python's State.save), or a path/URL to them. */
  async loadState(input) {
    const where = typeof input === "string" ? input : "state";
    const bytes = typeof input === "string" ? await this.io.read(input) : input;
    if (!(bytes instanceof Uint8Array || bytes instanceof ArrayBuffer)) {
      throw new RuntimeUserError(`loadState needs .npz bytes (Uint8Array / ArrayBuffer) or a path/URL string, not ${bytes === null ? "null" : typeof bytes}`);
    }
    const arrays = await loadNpz(bytes, where, this._npzLimits());
    if (EXPORT_ID_KEY in arrays) {
      const id = arrays[EXPORT_ID_KEY];
      if (id.dtype !== "str") throw new RuntimeUserError(`${where}: malformed export id`);
      this._checkExportId(id.data, where);
      delete arrays[EXPORT_ID_KEY];
    }
    this._checkArrays(arrays, where, { nan: true });
    return this.stateFromArrays(arrays, where);
  }

  // -- running ----------------------------------------------------------------------------------
  /** Rows of token ids (checked: integers inside the vocabulary) -> flat BigInt64Array. */
  _tokens(rows) {
    const flat = [];
    for (const row of rows) for (const t of row) flat.push(tokenId(t, this.vocabSize));
    return BigInt64Array.from(flat);
  }

  /**
   * One run of a graph: reads the state tensors `values` (never writes them); the new state goes
   * into the tensor set `into` when given (Node: pre-allocated outputs), else into ORT's outputs.
   * @returns {Promise<{logits: any, values: Record<string, any>}>}
   */
  async _run(kind, tokenData, dims, values, into = null) {
    const m = this.manifest;
    const sess = this.sessions[kind];
    if (!sess) throw new RuntimeUserError("this session was released; create a new one");
    const tokens = this.tokenTypes?.[kind] === "int32" ? Int32Array.from(tokenData, Number) : tokenData;
    const feeds = { [m.tokens_input]: new this.ort.Tensor(this.tokenTypes?.[kind] ?? "int64", tokens, dims) };
    for (const s of m.state) feeds[s.name] = values[s.name];
    let fetches = null;
    if (into) {
      fetches = { [m.logits_output]: null };
      for (const s of m.state) fetches[s.output] = into[s.name];
    }
    let out;
    try {
      const run = () => (fetches ? sess.run(feeds, fetches) : sess.run(feeds));
      out = await (this.io.exclusive ? this.io.exclusive(run) : run());
    } catch (e) {
      // the inputs are intact (a run never writes them): the error names the graph, in one line
      throw new RuntimeUserError(`${this.labels?.[kind] ?? kind}: onnxruntime could not run the graph (${short(e)})`);
    }
    const next = {};
    for (const s of m.state) {
      const back = into?.[s.name], got = out[s.output];
      if (!back || got === back) { next[s.name] = got; continue; }
      // pre-allocated outputs: ORT writes into them (onnxruntime-node also hands back a copy); checked
      // once per graph, and copied in if a backend ever returned the values elsewhere instead
      this._writesFetches ??= {};
      this._writesFetches[kind] ??= got.data.every((v, i) => Object.is(v, back.data[i]));
      if (!this._writesFetches[kind]) back.data.set(got.data);
      next[s.name] = back;
    }
    return { logits: out[m.logits_output], values: next };
  }

  _rows(logits, batch) {
    // [batch, vocab], or [batch, T, vocab] from a graph exported with all_logits: the last position
    const v = this.vocabSize, data = logits.data, per = data.length / batch;
    return Array.from({ length: batch }, (_, b) => data.subarray(b * per + per - v, b * per + per));
  }

  /** One token per row on a chain: the step graph, else the sequence graph with T = 1. */
  _stepOn(chain, data, batch) {
    return this.sessions.step ? chain.run("step", data, [batch]) : chain.run("sequence", data, [batch, 1]);
  }

  /** Rows of one length on a chain: the sequence graph in chunks, else token by token. */
  async _prefillOn(chain, rows, chunk) {
    const T = rows[0].length;
    let logits;
    if (this.sessions.sequence) {
      for (let s = 0; s < T; s += chunk) {
        const part = rows.map((row) => row.slice(s, s + chunk));
        logits = await chain.run("sequence", this._tokens(part), [rows.length, part[0].length]);
      }
    } else {
      for (let j = 0; j < T; j++) logits = await this._stepOn(chain, this._tokens([rows.map((row) => row[j])]), rows.length);
    }
    return logits;
  }

  /**
   * One token per sequence.
   * @param {number[]} tokens one id per batch row
   * @param {State} [state] read, never written (default: a fresh state)
   * @returns {Promise<{logits: Float32Array[], state: State}>} logits: one row per sequence; a new state
   */
  async step(tokens, state) {
    tokens = Array.isArray(tokens) ? tokens : [tokens];
    const data = this._tokens([tokens]);
    state ??= this.newState(tokens.length);
    this._check(state, tokens.length);
    const chain = new Chain(this, state);
    const logits = await this._stepOn(chain, data, tokens.length);
    return { logits: this._rows(logits, tokens.length), state: chain.finish() };
  }

  /**
   * A prompt per sequence (all of one length), through the sequence graph in chunks; without one
   * it steps token by token. Returns the logits after the last token and a new state.
   * @param {number[]|number[][]} tokens @param {State} [state] read, never written
   * @param {number} [chunkSize]
   */
  async prefill(tokens, state, chunkSize) {
    const rows = this._promptRows(tokens);
    const chunk = this._chunk(chunkSize);
    this._tokens(rows);
    state ??= this.newState(rows.length);
    this._check(state, rows.length);
    const chain = new Chain(this, state);
    const logits = await this._prefillOn(chain, rows, chunk);
    return { logits: this._rows(logits, rows.length), state: chain.finish() };
  }

  _promptRows(tokens) {
    if (!Array.isArray(tokens)) throw new RuntimeUserError("prefill needs token ids: an array of ids, or of rows of ids");
    const rows = Array.isArray(tokens[0]) ? tokens : [tokens];
    if (!rows.every(Array.isArray)) throw new RuntimeUserError("prefill needs rows of token ids (arrays), all of one length");
    const T = rows[0].length;
    if (T === 0 || rows.some((r) => r.length !== T)) {
      throw new RuntimeUserError("prefill needs non-empty prompts of one length (prefillMany takes prompts of different lengths)");
    }
    return rows;
  }

  _chunk(chunkSize) {
    const chunk = chunkSize ?? this.prefillChunk;
    if (!(Number.isInteger(chunk) && chunk >= 1)) throw new RuntimeUserError(`chunkSize must be an integer >= 1, not ${String(chunk).slice(0, 40)}`);
    return chunk;
  }

  /**
   * Prompts of different lengths as one batch (as Python's prefill_many): RWKV has no attention mask,
   * so padding would corrupt the state; instead all rows advance together while they all have tokens,
   * then the rows with longer prompts go on as a smaller batch, and their states are put back.
   * @param {number[][]} prompts @param {State} [state] batch = prompts.length; read, never written
   * @returns {Promise<{logits: Float32Array[], state: State}>} each prompt's last logits; a new state
   */
  async prefillMany(prompts, state, chunkSize) {
    if (!Array.isArray(prompts) || !prompts.every(Array.isArray)) {
      throw new RuntimeUserError("prefillMany needs an array of prompts, each an array of token ids");
    }
    const n = prompts.length;
    if (n === 0) throw new RuntimeUserError("prefillMany needs at least one prompt");
    if (n > MAX_BATCH) throw new RuntimeUserError(`at most ${MAX_BATCH} prompts at once, not ${n}`);
    const lengths = prompts.map((p) => p.length);
    if (lengths.includes(0)) throw new RuntimeUserError("every prompt needs at least one token");
    this._chunk(chunkSize);
    for (const p of prompts) this._tokens([p]);
    state ??= this.newState(n);
    if (state instanceof State && state.batch !== n) {
      throw new RuntimeUserError(`state is for a batch of ${state.batch}, but ${n} prompts were given`);
    }
    this._check(state, n);
    const arrays = await state.toArrays(); // copies: rows are updated here, never in the caller's state
    const logits = Array.from({ length: n }, () => new Float32Array(this.vocabSize));
    let pos = 0;
    for (const end of [...new Set(lengths)].sort((a, b) => a - b)) {
      const rows = lengths.flatMap((len, i) => (len >= end ? [i] : [])); // still active up to `end`
      const sub = this.stateFromArrays(pickRows(arrays, rows, n));
      const r = await this.prefill(rows.map((i) => prompts[i].slice(pos, end)), sub, chunkSize);
      putRows(arrays, await r.state.toArrays(), rows, n);
      rows.forEach((i, j) => logits[i].set(r.logits[j]));
      sub.dispose();
      r.state.dispose();
      pos = end;
    }
    return { logits, state: this.stateFromArrays(arrays) };
  }

  _check(state, batch) {
    if (!(state instanceof State) || state.session !== this) {
      throw new RuntimeUserError("state must come from this session (newState, loadState, stateFromArrays or a call's result)");
    }
    state._check();
    if (state.batch !== batch) throw new RuntimeUserError(`state is for a batch of ${state.batch}, but ${batch} token row(s) were given`);
  }

  // -- generation: a batch of one (or several) on the generation core (generation.js) ----------------
  /** A chain of runs over `state` (read, never written): the batch's state in generation.js. */
  _chain(state) { return new Chain(this, state); }

  /** A chain's current state as plain arrays (copies). */
  _arraysOf(chain) { return new State(this, chain.batch, chain.cur).toArrays(); }

  /** generate's settings, checked: a Sampler, maxNewTokens, stop strings and logprobs (text: a
   *  tokenizer's text is made; without one, stopStrings and logprobs are refused). */
  _settings(params, text = true) {
    const sampling = {};
    for (const [k, v] of Object.entries(params ?? {})) if (!GEN_KEYS.has(k)) sampling[k] = v;
    const sampler = new Sampler(sampling, this.vocabSize);
    const max = params?.maxNewTokens ?? 100;
    if (!Number.isInteger(max) || max < 0) throw new RuntimeUserError(`maxNewTokens must be an integer >= 0, not ${max}`);
    let stops = params?.stopStrings ?? [];
    if (typeof stops === "string") stops = [stops];
    if (!Array.isArray(stops) || !stops.every((x) => typeof x === "string")) {
      throw new RuntimeUserError(`stopStrings must be a string or an array of strings, not ${String(params.stopStrings).slice(0, 40)}`);
    }
    const logprobs = params?.logprobs ?? null;
    if (logprobs !== null && !(Number.isInteger(logprobs) && logprobs >= 0)) {
      throw new RuntimeUserError(`logprobs must be an integer >= 0 (alternatives per token; null: off), not ${String(logprobs).slice(0, 40)}`);
    }
    if (!text && (stops.length || logprobs !== null)) {
      throw new RuntimeUserError("stopStrings and logprobs apply to text: use generate (generateTokens yields token ids)");
    }
    return { sampler, max, stops, logprobs };
  }

  /**
   * Prefill the prompt, then sample and step: yields token ids as they are produced. The iterator's
   * `state` is the state after the last token fed to the model, set once it ends (finished, broken
   * out of, or failed; null before). `params.state` (batch 1) is read, never written.
   * @param {number[]} promptTokens @param {object} [params] sampling + maxNewTokens + state
   */
  generateTokens(promptTokens, params = {}) {
    const self = this;
    const it = (async function* () {
      for await (const out of self._oneRow(promptTokens, params ?? {}, null, it)) if (out.appended) yield out.token;
    })();
    it.state = null;
    return it;
  }

  /**
   * One sequence as a batch of one on the generation core (Python's _one_row): yields each step's Out
   * (before the model runs the token, so a consumer sees it at once); once it ends, `holder.state` is
   * the state after the last token run (the prompt, then each generated token; not a stop token).
   */
  async *_oneRow(promptTokens, params, tokenizer, holder) {
    if (!Array.isArray(promptTokens)) throw new RuntimeUserError("the prompt must be text or an array of token ids");
    if (!promptTokens.length) throw new RuntimeUserError("the prompt is empty");
    const { sampler, max, stops, logprobs } = this._settings(params, tokenizer !== null);
    this._tokens([promptTokens]);
    const start = params.state ?? this.newState(1);
    this._check(start, 1);
    let prompted = null, batch = null, row = null;
    try {
      const r = await this.prefill([promptTokens], start);
      prompted = r.state;
      if (!max) return;
      const text = tokenizer ? new TextStream(tokenizer, stops, logprobs !== null) : null;
      row = new Row(sampler, { maxNewTokens: max, text, logprobs, feedLast: true, keepState: true });
      batch = new Batch(this);
      await batch.add(row, prompted, r.logits);
      while (batch.rows.length) {
        const [out] = await batch.sample();
        if (out.error) throw out.error;
        yield out;
        const failed = await batch.advance();
        if (failed.length) throw failed[0].error;
      }
    } finally {
      if (batch?.rows.length) await batch.close(); // broken out of: the state of the tokens run so far
      const st = row?.final ?? prompted;
      // the prompt's state is this call's own: once the steps moved past it, WebGPU frees its buffers
      if (prompted && st !== prompted) prompted.dispose();
      if (st) {
        this.lastState = st; // (deprecated: shared by the session; use the iterator's own .state)
        holder.state = st;
      }
    }
  }

  /**
   * Stream text: an async iterator of decoded pieces. `prompt` is text or token ids; params as
   * Python's SamplingParams (temperature, top_p, top_k, presence_penalty, frequency_penalty,
   * penalty_decay, seed, ban, stop, logit_bias) plus maxNewTokens, state, stopStrings (the text ends
   * before the first one, as the server's `stop`) and logprobs (alternatives per token). The iterator
   * carries this call's `stats`, `logprobs` (the entries of the text delivered so far, when asked for),
   * `finishReason` ("stop" / "length" once it ends) and, once it ends, its own `state`.
   * The prompt, the settings and the model's tokenizer are checked now, as Python's generate does.
   */
  generate(prompt, params = {}) {
    params ??= {};
    if (typeof prompt !== "string" && !Array.isArray(prompt)) throw new RuntimeUserError("the prompt must be text or an array of token ids");
    if (prompt.length === 0) throw new RuntimeUserError("the prompt is empty");
    if ((this.manifest.tokenizer?.kind ?? "none") === "none") throw new RuntimeUserError(NO_TOKENIZER);
    const { logprobs } = this._settings(params);
    if (Array.isArray(prompt)) this._tokens([prompt]);
    // each call has its own statistics (it.stats) and state (it.state), so concurrent calls never mix
    // them (as in Python: no session-wide statistics)
    const stats = { promptTokens: 0, newTokens: 0, prefillMs: 0, decodeMs: 0, tokensPerSecond: 0 };
    const it = this._generate(prompt, params, stats, () => it);
    it.stats = stats;
    it.state = null;
    it.finishReason = null;
    it.logprobs = logprobs === null ? null : [];
    return it;
  }

  async *_generate(prompt, params, stats, self) {
    const it = self();
    const tok = await this.tokenizer();
    const ids = typeof prompt === "string" ? this._encodeWith(tok, prompt) : [...prompt];
    stats.promptTokens = ids.length;
    let t0 = performance.now(), first = true;
    for await (const out of this._oneRow(ids, params, tok, it)) {
      const now = performance.now();
      if (first && out.appended) { stats.prefillMs = now - t0; t0 = now; first = false; }
      if (out.appended) stats.newTokens++;
      if (out.logprobs) it.logprobs.push(...out.logprobs);
      if (out.reason) it.finishReason = out.reason;
      if (out.text) yield out.text;
      stats.decodeMs = performance.now() - t0;
      stats.tokensPerSecond = stats.newTokens / (stats.decodeMs / 1000 || Infinity);
    }
    if (first) stats.prefillMs = performance.now() - t0; // no token came: the time was all prefill
  }

  /**
   * Several prompts generated as one batch (one model step per token for all of them; Python's
   * BatchGenerator on the same core): each row has its own sampler, limits, stop strings and state,
   * and gives the tokens it would give generated alone. `params`: one settings object for every prompt,
   * or an array of one per prompt (generate's settings; `state` a batch-1 State, read, never written).
   * A row that fails (e.g. its sampler) ends alone with `finishReason` "error" and its `error`; the
   * others go on. Resolves to one result per prompt, in order:
   * {text, tokens, finishReason, error, logprobs, state} (text null for a model without a tokenizer;
   * state: after the row's last token, as generate's).
   */
  async generateBatch(prompts, params = {}) {
    if (!Array.isArray(prompts) || !prompts.length) throw new RuntimeUserError("generateBatch needs a non-empty array of prompts (text or token ids)");
    if (prompts.length > MAX_BATCH) throw new RuntimeUserError(`at most ${MAX_BATCH} prompts at once, not ${prompts.length}`);
    params ??= {};
    const per = Array.isArray(params) ? params : prompts.map(() => params);
    if (per.length !== prompts.length) throw new RuntimeUserError(`generateBatch: ${per.length} settings for ${prompts.length} prompts`);
    const hasTok = (this.manifest.tokenizer?.kind ?? "none") !== "none";
    const tok = hasTok ? await this.tokenizer() : null;
    const ids = prompts.map((p) => {
      if (typeof p === "string") {
        if (!hasTok) throw new RuntimeUserError(NO_TOKENIZER);
        return this._encodeWith(tok, p);
      }
      if (!Array.isArray(p)) throw new RuntimeUserError("the prompt must be text or an array of token ids");
      this._tokens([p]);
      return [...p];
    });
    if (ids.some((p) => !p.length)) throw new RuntimeUserError("the prompt is empty");
    const rows = per.map((p, i) => {
      const { sampler, max, stops, logprobs } = this._settings(p ?? {}, hasTok);
      const text = tok ? new TextStream(tok, stops, logprobs !== null) : null;
      return new Row(sampler, { maxNewTokens: max, text, logprobs, feedLast: true, keepState: true, key: i });
    });
    const states = per.map((p) => p?.state ?? null);
    states.forEach((st) => st && this._check(st, 1));
    const start = states.every((st) => st === null) ? null
      : this.stateFromArrays(concatRows(await Promise.all(states.map((st) => (st ?? this.newState(1)).toArrays()))));
    const { logits, state } = await this.prefillMany(ids, start ?? undefined);
    const results = rows.map((r) => ({ text: tok ? "" : null, tokens: r.tokens, finishReason: null, error: null,
      logprobs: r.logprobs === null ? null : [], state: null }));
    const batch = new Batch(this);
    const none = rows.filter((r) => r.maxNewTokens === 0); // nothing to generate: the prompt's state
    if (none.length) {
      const arrays = await state.toArrays();
      for (const r of none) { r.reason = "length"; r.final = this.stateFromArrays(pickRows(arrays, [r.key], rows.length)); }
      const live = rows.filter((r) => r.maxNewTokens !== 0).map((r) => r.key);
      if (live.length) await batch.add(live.map((i) => rows[i]), this.stateFromArrays(pickRows(arrays, live, rows.length)), live.map((i) => logits[i]));
    } else {
      await batch.add(rows, state, logits);
    }
    try {
      while (batch.rows.length) {
        for (const out of await batch.step()) {
          const res = results[out.row.key];
          if (out.text) res.text += out.text;
          if (out.logprobs) res.logprobs.push(...out.logprobs);
        }
      }
    } finally {
      if (batch.rows.length) await batch.close();
    }
    rows.forEach((r, i) => Object.assign(results[i], { finishReason: r.reason, error: r.error, state: r.final }));
    return results;
  }

  /** Release the ONNX Runtime sessions. */
  async release() {
    for (const s of Object.values(this.sessions)) await s.release();
    this.sessions = {};
  }
}

/**
 * The manifest against the loaded graph (as Python's check_graph_io), before the first run: the token
 * input (rank 1 for a step graph, 2 for a sequence graph; an integer type), the logits output with the
 * manifest's vocabulary, every state input/output with the manifest's rank, dtype and fixed sizes, and
 * no input the manifest does not describe. A tampered manifest would otherwise run: a wrong vocab_size
 * silently slices the logits row, a wrong state shape fails deep inside onnxruntime at the first step.
 * Returns the token input's type ("int64" or "int32").
 */
function checkGraphIO(manifest, session, label) {
  const fail = (what) => { throw new RuntimeUserError(`${label}: the graph does not match its manifest (${what}); re-export the model`); };
  const ins = new Set(session.inputNames), outs = new Set(session.outputNames);
  for (const n of [manifest.tokens_input, ...manifest.state.map((s) => s.name)]) if (!ins.has(n)) fail(`no input ${n}`);
  for (const n of [manifest.logits_output, ...manifest.state.map((s) => s.output)]) if (!outs.has(n)) fail(`no output ${n}`);
  const extra = [...ins].filter((n) => n !== manifest.tokens_input && !manifest.state.some((s) => s.name === n));
  if (extra.length) fail(`inputs the manifest does not describe: ${extra.slice(0, 3).join(", ")}`);
  const meta = (list, name) => (Array.isArray(list) ? list.find((x) => x?.name === name) : undefined);
  // onnxruntime-common >= 1.21 describes inputs and outputs (type; shape: sizes or symbolic names, []
  // when the graph does not say, a negative size when unknown): only what is described is compared
  if (!Array.isArray(session.inputMetadata) || !Array.isArray(session.outputMetadata)) return "int64";
  const known = (d) => typeof d === "number" && d >= 0;
  const tok = meta(session.inputMetadata, manifest.tokens_input);
  const rank = manifest.graph === "step" ? 1 : 2;
  if (tok?.shape?.length && (tok.shape.length !== rank || !["int64", "int32"].includes(tok.type))) {
    fail(`input ${tok.name} is ${tok.type} of rank ${tok.shape.length}, a ${manifest.graph} graph takes integer tokens of rank ${rank}`);
  }
  const lg = meta(session.outputMetadata, manifest.logits_output);
  if (lg?.shape?.length) {
    const last = lg.shape[lg.shape.length - 1];
    if (![2, 3].includes(lg.shape.length) || (known(last) && last !== manifest.vocab_size)) {
      fail(`output ${lg.name} has shape [${lg.shape}], the manifest says vocabulary ${manifest.vocab_size}`);
    }
  }
  for (const s of manifest.state) {
    for (const [name, list] of [[s.name, session.inputMetadata], [s.output, session.outputMetadata]]) {
      const a = meta(list, name);
      if (!a?.shape?.length) continue;
      if (a.shape.length !== s.shape.length || a.type !== s.dtype) {
        fail(`${name} is ${a.type} of rank ${a.shape.length}, the manifest says ${s.dtype} [${s.shape}]`);
      }
      a.shape.slice(1).forEach((d, i) => {
        if (known(d) && d !== s.shape[i + 1]) fail(`${name} has shape [${a.shape}], the manifest says [${s.shape}]`);
      });
    }
  }
  return tok?.type === "int32" ? "int32" : "int64";
}
