// Session: an exported RWKV model run with ONNX Runtime for JavaScript (onnxruntime-node, or
// onnxruntime-web on WASM / WebGPU). The same API shape as the Python runtime (runtime/session.py):
// create, newState, step, prefill, generate, saveState/loadState. Everything about the model comes
// from the manifest read out of the model bytes (onnx-meta.js); nothing is hard-coded.
//
// State lives where the backend computes: on WebGPU the state outputs stay GPU buffers that are fed
// back as the next inputs (the previous ones are disposed). On Node each State owns two pre-allocated
// buffer sets and a step has ORT write the outputs into the spare set. onnxruntime-web's WASM backend
// (1.30) ignores pre-allocated CPU outputs (it returns them unwritten: checked in js/test), and copies
// every output out of the WASM heap anyway, so there the outputs it returns become the next state.
// Either way a step *consumes* the state passed in: using it again is an error (clone() it to branch).
import { RuntimeUserError } from "./errors.js";
import { INITIAL_STATE_KEY, MANIFEST_KEY, TOKENIZER_KEY, checkCompanion, concreteShape, parseManifest, plainFileName } from "./manifest.js";
import { loadNpz, saveNpz } from "./npz.js";
import { scanModel } from "./onnx-meta.js";
import { Sampler } from "./sampling.js";
import { StreamDecoder, makeTokenizer } from "./tokenizers.js";

export const EXPORT_ID_KEY = "__rwkv_export_id__"; // the export a saved state belongs to (as Python's)
export const MAX_BATCH = 1 << 16; // as Python's MAX_STATE_BATCH: more rows than this is a mistake (or damage)
const size = (shape) => shape.reduce((a, b) => a * b, 1);
const ARRAY = { float32: Float32Array, float16: Uint16Array };
const GEN_KEYS = new Set(["maxNewTokens", "state"]); // generate's own settings besides the sampler's
const short = (e) => String(e?.message ?? e).split("\n")[0].slice(0, 200);

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

/** The recurrent state of a batch. Created by Session.newState / loadState; consumed by step. */
export class State {
  constructor(session, batch, front, back) {
    this.session = session;
    this.batch = batch;
    /** @type {Record<string, any>} ort Tensors by state input name */
    this.values = front;
    this._back = back; // CPU backends: the spare buffer set the next step writes into
    this._live = true;
  }

  _take() {
    if (!this._live) {
      throw new RuntimeUserError("this state was already advanced by a step (or disposed); clone() it before stepping to keep it");
    }
    this._live = false;
  }

  /** The state as plain arrays {name: {dtype, shape, data}} (downloads GPU buffers). */
  async toArrays() {
    if (!this._live) throw new RuntimeUserError("this state was already advanced by a step (or disposed)");
    const out = {};
    for (const s of this.session.manifest.state) {
      const t = this.values[s.name];
      const data = t.location === "gpu-buffer" ? await t.getData() : t.data;
      out[s.name] = { dtype: s.dtype, shape: [...t.dims], data: new ARRAY[s.dtype](data) };
    }
    return out;
  }

  /** An independent copy (to branch a conversation). */
  async clone() { return this.session.stateFromArrays(await this.toArrays()); }

  /** .npz bytes: the same format as Python's State.save (the state tensors and the export id). */
  async save() {
    return saveNpz({ ...(await this.toArrays()), [EXPORT_ID_KEY]: { dtype: "str", shape: [], data: this.session.manifest.export_id } });
  }

  /** Free GPU buffers now (CPU buffers are garbage-collected). */
  dispose() {
    if (!this._live) return;
    this._live = false;
    for (const t of Object.values(this.values)) if (t.location === "gpu-buffer") t.dispose();
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
      if (!(await io.exists(src))) continue; // a missing sequence graph: prefill steps instead
      const g = await s._loadGraph(src, name, kind);
      checkCompanion(s.manifest, g.manifest, name, kind);
      s.sessions[kind] = g.session;
      s.labels[kind] = name;
      s.tokenTypes[kind] = g.tokenType;
    }
    s.initial = {};
    if (s.manifest.initial_state === "embedded") s.initial = await s._initialState(main.label);
    return s;
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
    const arrays = await loadNpz(raw, where);
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
    return new State(this, batch, front, this.io.preallocate ? this._cpuSet(batch) : null);
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
      if (a.dtype !== s.dtype) {
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
      if (nan && a.dtype === "float32" && Array.prototype.some.call(a.data, Number.isNaN)) {
        throw new RuntimeUserError(`${pre}state tensor ${k} holds NaN`);
      }
    }
    return batch;
  }

  /** An array's data as a typed array of the state's dtype: a copy, the state never aliases the caller's. */
  _asDtype(a, name) {
    return new ARRAY[this.manifest.state.find((st) => st.name === name).dtype](a.data);
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
    return new State(this, batch, front, this.io.preallocate ? this._cpuSet(batch) : null);
  }

  _checkExportId(saved, where) {
    if (typeof saved !== "string") throw new RuntimeUserError(`${where}: malformed export id`);
    const mine = this.manifest.export_id;
    if (saved && mine && saved !== mine) {
      throw new RuntimeUserError(`${where}: this state was saved from another export (id ${saved.slice(0, 16)}), not from ` +
        `this model (id ${mine.slice(0, 16)}); states only load into the model that made them`);
    }
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
    const arrays = await loadNpz(bytes, where);
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

  async _run(kind, tokenData, dims, state) {
    const m = this.manifest;
    const sess = this.sessions[kind];
    if (!sess) {
      state._live = true; // not run: the state passed in stays usable
      throw new RuntimeUserError("this session was released; create a new one");
    }
    const tokens = this.tokenTypes?.[kind] === "int32" ? Int32Array.from(tokenData, Number) : tokenData;
    const feeds = { [m.tokens_input]: new this.ort.Tensor(this.tokenTypes?.[kind] ?? "int64", tokens, dims) };
    for (const s of m.state) feeds[s.name] = state.values[s.name];
    let fetches;
    if (state._back) {
      fetches = { [m.logits_output]: null };
      for (const s of m.state) fetches[s.output] = state._back[s.name];
    }
    let out;
    try {
      const run = () => (fetches ? sess.run(feeds, fetches) : sess.run(feeds));
      out = await (this.io.exclusive ? this.io.exclusive(run) : run());
    } catch (e) {
      // the inputs are intact (outputs go to the spare set; GPU inputs are freed only after a run), so
      // the state passed in stays usable; the error names the graph, in one line
      state._live = true;
      throw new RuntimeUserError(`${this.labels?.[kind] ?? kind}: onnxruntime could not run the graph (${short(e)})`);
    }
    const next = {};
    for (const s of m.state) {
      const back = state._back?.[s.name], got = out[s.output];
      if (!back || got === back) { next[s.name] = got; continue; }
      // pre-allocated outputs: ORT writes into them (onnxruntime-node also hands back a copy); checked
      // once per graph, and copied in if a backend ever returned the values elsewhere instead
      this._writesFetches ??= {};
      this._writesFetches[kind] ??= got.data.every((v, i) => Object.is(v, back.data[i]));
      if (!this._writesFetches[kind]) back.data.set(got.data);
      next[s.name] = back;
    }
    if (!state._back) {
      // WebGPU: the new state is the outputs' GPU buffers; free the ones just consumed
      for (const s of m.state) if (state.values[s.name].location === "gpu-buffer") state.values[s.name].dispose();
    }
    const logits = out[m.logits_output];
    return { logits, state: new State(this, state.batch, next, state._back ? state.values : null) };
  }

  _rows(logits, batch) {
    // [batch, vocab], or [batch, T, vocab] from a graph exported with all_logits: the last position
    const v = this.vocabSize, data = logits.data, per = data.length / batch;
    return Array.from({ length: batch }, (_, b) => data.subarray(b * per + per - v, b * per + per));
  }

  /**
   * One token per sequence.
   * @param {number[]} tokens one id per batch row
   * @param {State} [state] consumed; default a fresh state
   * @returns {Promise<{logits: Float32Array[], state: State}>} logits: one row per sequence
   */
  async step(tokens, state) {
    tokens = Array.isArray(tokens) ? tokens : [tokens];
    const data = this._tokens([tokens]); // checked before the state is consumed: a bad id keeps it usable
    state ??= this.newState(tokens.length);
    this._check(state, tokens.length);
    state._take();
    const r = this.sessions.step
      ? await this._run("step", data, [tokens.length], state)
      : await this._run("sequence", data, [tokens.length, 1], state);
    return { logits: this._rows(r.logits, tokens.length), state: r.state };
  }

  /**
   * A prompt per sequence (all of one length), through the sequence graph in chunks; without one
   * it steps token by token. Returns the logits after the last token.
   * @param {number[]|number[][]} tokens @param {State} [state] consumed
   * @param {number} [chunkSize]
   */
  async prefill(tokens, state, chunkSize) {
    if (!Array.isArray(tokens)) throw new RuntimeUserError("prefill needs token ids: an array of ids, or of rows of ids");
    const rows = Array.isArray(tokens[0]) ? tokens : [tokens];
    if (!rows.every(Array.isArray)) throw new RuntimeUserError("prefill needs rows of token ids (arrays), all of one length");
    const T = rows[0].length;
    if (T === 0 || rows.some((r) => r.length !== T)) throw new RuntimeUserError("prefill needs non-empty prompts of one length");
    const chunk = chunkSize ?? this.prefillChunk;
    if (!(Number.isInteger(chunk) && chunk >= 1)) throw new RuntimeUserError(`chunkSize must be an integer >= 1, not ${String(chunk).slice(0, 40)}`);
    this._tokens(rows);
    state ??= this.newState(rows.length);
    this._check(state, rows.length);
    let r = { state };
    if (this.sessions.sequence) {
      for (let s = 0; s < T; s += chunk) {
        const part = rows.map((row) => row.slice(s, s + chunk));
        r.state._take();
        r = await this._run("sequence", this._tokens(part), [rows.length, part[0].length], r.state);
      }
      return { logits: this._rows(r.logits, rows.length), state: r.state };
    }
    let out;
    for (let j = 0; j < T; j++) out = await this.step(rows.map((row) => row[j]), (out ?? r).state);
    return out;
  }

  _check(state, batch) {
    if (!(state instanceof State) || state.session !== this) {
      throw new RuntimeUserError("state must come from this session (newState, loadState or stateFromArrays)");
    }
    if (state.batch !== batch) throw new RuntimeUserError(`state is for a batch of ${state.batch}, but ${batch} token row(s) were given`);
  }

  /**
   * Prefill the prompt, then sample and step: yields token ids as they are produced.
   * @param {number[]} promptTokens @param {object} [params] sampling + maxNewTokens + state
   */
  async *generateTokens(promptTokens, params = {}) {
    if (!Array.isArray(promptTokens)) throw new RuntimeUserError("the prompt must be text or an array of token ids");
    if (!promptTokens.length) throw new RuntimeUserError("the prompt is empty");
    params ??= {};
    const sampling = {};
    for (const [k, v] of Object.entries(params)) if (!GEN_KEYS.has(k)) sampling[k] = v;
    const sampler = new Sampler(sampling, this.vocabSize);
    const max = params.maxNewTokens ?? 100;
    if (!Number.isInteger(max) || max < 0) throw new RuntimeUserError(`maxNewTokens must be an integer >= 0, not ${max}`);
    let { logits, state } = await this.prefill(promptTokens, params.state);
    this.lastState = state;
    for (let i = 0; i < max; i++) {
      const tok = sampler.sample(logits[0]);
      if (sampler.stop.has(tok)) return;
      yield tok;
      ({ logits, state } = await this.step([tok], state));
      this.lastState = state;
    }
  }

  /**
   * Stream text: an async iterator of decoded pieces. `prompt` is text or token ids; params as
   * Python's SamplingParams (temperature, top_p, top_k, presence_penalty, frequency_penalty,
   * penalty_decay, seed, ban, stop) plus maxNewTokens and state. Figures in session.stats.
   */
  generate(prompt, params = {}) {
    // each call has its own statistics (it.stats), so concurrent calls never mix them; session.stats
    // is the last started call's, as Python's Session.stats
    const stats = { promptTokens: 0, newTokens: 0, prefillMs: 0, decodeMs: 0, tokensPerSecond: 0 };
    const it = this._generate(prompt, params, stats);
    it.stats = stats;
    this.stats = stats;
    return it;
  }

  async *_generate(prompt, params, stats) {
    if (typeof prompt !== "string" && !Array.isArray(prompt)) throw new RuntimeUserError("the prompt must be text or an array of token ids");
    const tok = await this.tokenizer().catch((e) => { if (typeof prompt === "string") throw e; return null; });
    const ids = typeof prompt === "string" ? this._encodeWith(tok, prompt) : [...prompt];
    const dec = tok ? new StreamDecoder(tok) : null;
    stats.promptTokens = ids.length;
    let t0 = performance.now(), first = true;
    for await (const t of this.generateTokens(ids, params)) {
      const now = performance.now();
      if (first) { stats.prefillMs = now - t0; t0 = now; first = false; }
      stats.newTokens++;
      const piece = dec ? dec.push(t) : `${t} `;
      if (piece) yield piece;
      stats.decodeMs = performance.now() - t0;
      stats.tokensPerSecond = stats.newTokens / (stats.decodeMs / 1000 || Infinity);
    }
    if (first) stats.prefillMs = performance.now() - t0; // no token came: the time was all prefill
    const tail = dec ? dec.flush() : "";
    if (tail) yield tail;
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
