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
import { INITIAL_STATE_KEY, MANIFEST_KEY, TOKENIZER_KEY, checkCompanion, concreteShape, parseManifest } from "./manifest.js";
import { loadNpz, saveNpz } from "./npz.js";
import { scanModel } from "./onnx-meta.js";
import { Sampler } from "./sampling.js";
import { StreamDecoder, makeTokenizer } from "./tokenizers.js";

export const EXPORT_ID_KEY = "__rwkv_export_id__"; // the export a saved state belongs to (as Python's)
const size = (shape) => shape.reduce((a, b) => a * b, 1);
const ARRAY = { float32: Float32Array, float16: Uint16Array };

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
    const s = new this(); // the subclass (node.js / web.js) it was called on
    s.ort = ort;
    s.io = io;
    s.source = source;
    s.options = options;
    s.prefillChunk = options.prefillChunk ?? 256;
    s.device = io.gpuState ? "webgpu" : "cpu";
    const main = await s._loadGraph(source, null);
    s.manifest = main.manifest;
    s.metadata = main.metadata;
    s.sessions = { [s.manifest.graph]: main.session };
    const wanted = options.graphs ?? ["step", "sequence"];
    for (const [kind, name] of Object.entries(s.manifest.companions)) {
      if (kind === s.manifest.graph || !wanted.includes(kind)) continue;
      const src = io.resolve(source, name);
      if (!(await io.exists(src))) continue; // a missing sequence graph: prefill steps instead
      const g = await s._loadGraph(src, name);
      checkCompanion(s.manifest, g.manifest, name);
      s.sessions[kind] = g.session;
    }
    s.initial = {};
    if (s.manifest.initial_state === "embedded") {
      const b64 = s.metadata[INITIAL_STATE_KEY] ?? "";
      s.initial = await loadNpz(Uint8Array.from(atob(b64), (c) => c.charCodeAt(0)));
    }
    return s;
  }

  async _loadGraph(src, name) {
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
      throw new RuntimeUserError(`${label}: onnxruntime could not load the model (${String(e.message ?? e).split("\n")[0].slice(0, 200)})`);
    }
    const missing = [manifest.tokens_input, ...manifest.state.map((st) => st.name)].filter((n) => !session.inputNames.includes(n));
    if (missing.length) throw new RuntimeUserError(`${label}: the graph has no input ${missing[0]} named by its manifest; re-export the model`);
    const absent = [manifest.logits_output, ...manifest.state.map((st) => st.output)].filter((n) => !session.outputNames.includes(n));
    if (absent.length) throw new RuntimeUserError(`${label}: the graph has no output ${absent[0]} named by its manifest; re-export the model`);
    return { manifest, metadata: info.metadata, session };
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
  async encode(text) { return (await this.tokenizer()).encode(text); }
  async decode(ids) { return (await this.tokenizer()).decode(ids); }

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
    if (!Number.isInteger(batch) || batch < 1) throw new RuntimeUserError(`batch must be a positive integer, not ${batch}`);
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

  /** A state from plain arrays (checked against the manifest: names, dtypes, shapes). */
  stateFromArrays(arrays) {
    let batch = null;
    const front = {};
    for (const s of this.manifest.state) {
      const a = arrays[s.name];
      if (!a) throw new RuntimeUserError(`state is missing tensor ${s.name}`);
      if (a.dtype !== s.dtype) throw new RuntimeUserError(`state tensor ${s.name} has dtype ${a.dtype}, expected ${s.dtype}`);
      batch ??= a.shape[0];
      const want = concreteShape(s, batch);
      if (a.shape.length !== want.length || a.shape.some((d, i) => d !== want[i])) {
        throw new RuntimeUserError(`state tensor ${s.name} has shape [${a.shape}], expected [${want}] (batch ${batch})`);
      }
      front[s.name] = new this.ort.Tensor(s.dtype, new ARRAY[s.dtype](a.data), want);
    }
    return new State(this, batch, front, this.io.preallocate ? this._cpuSet(batch) : null);
  }

  /** .npz bytes of a state (Python's Session.load_state reads them). */
  async saveState(state) { return state.save(); }

  /** A state from .npz bytes (e.g. written by Python's State.save), or a path/URL to them. */
  async loadState(input) {
    const where = typeof input === "string" ? input : "state";
    const bytes = typeof input === "string" ? await this.io.read(input) : input;
    const arrays = await loadNpz(bytes);
    const saved = arrays[EXPORT_ID_KEY]?.data ?? "";
    delete arrays[EXPORT_ID_KEY];
    const mine = this.manifest.export_id;
    if (saved && mine && saved !== mine) {
      throw new RuntimeUserError(`${where}: this state was saved from another export (id ${saved.slice(0, 16)}), not from ` +
        `this model (id ${mine.slice(0, 16)}); states only load into the model that made them`);
    }
    const known = new Set(this.manifest.state.map((st) => st.name));
    for (const k of Object.keys(arrays)) {
      if (!known.has(k)) throw new RuntimeUserError(`${where}: names ${k.slice(0, 60)}, which this model has no state tensor for`);
      if (arrays[k].dtype === "float32" && arrays[k].data.some(Number.isNaN)) throw new RuntimeUserError(`${where}: state tensor ${k} holds NaN`);
    }
    return this.stateFromArrays(arrays);
  }

  // -- running ----------------------------------------------------------------------------------
  _tokens(rows) {
    const flat = rows.flat();
    for (const t of flat) {
      if (!Number.isInteger(Number(t)) || t < 0 || t >= this.vocabSize) {
        throw new RuntimeUserError(`token id ${t} is outside [0, ${this.vocabSize})`);
      }
    }
    return BigInt64Array.from(flat, (t) => BigInt(t));
  }

  async _run(kind, tokenData, dims, state) {
    const m = this.manifest;
    const sess = this.sessions[kind];
    const feeds = { [m.tokens_input]: new this.ort.Tensor("int64", tokenData, dims) };
    for (const s of m.state) feeds[s.name] = state.values[s.name];
    let fetches;
    if (state._back) {
      fetches = { [m.logits_output]: null };
      for (const s of m.state) fetches[s.output] = state._back[s.name];
    }
    const out = await (fetches ? sess.run(feeds, fetches) : sess.run(feeds));
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
    state ??= this.newState(tokens.length);
    this._check(state, tokens.length);
    state._take();
    const data = this._tokens(tokens);
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
    const rows = Array.isArray(tokens[0]) ? tokens : [tokens];
    const T = rows[0].length;
    if (T === 0 || rows.some((r) => r.length !== T)) throw new RuntimeUserError("prefill needs non-empty prompts of one length");
    state ??= this.newState(rows.length);
    this._check(state, rows.length);
    const chunk = chunkSize ?? this.prefillChunk;
    if (!(chunk >= 1)) throw new RuntimeUserError(`chunkSize must be >= 1, not ${chunk}`);
    this._tokens(rows);
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
    if (!promptTokens.length) throw new RuntimeUserError("the prompt is empty");
    const sampler = new Sampler(params, this.vocabSize);
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
  async *generate(prompt, params = {}) {
    const tok = await this.tokenizer().catch((e) => { if (typeof prompt === "string") throw e; return null; });
    const ids = typeof prompt === "string" ? tok.encode(prompt) : [...prompt];
    const dec = tok ? new StreamDecoder(tok) : null;
    this.stats = { promptTokens: ids.length, newTokens: 0, prefillMs: 0, decodeMs: 0, tokensPerSecond: 0 };
    let t0 = performance.now(), first = true;
    for await (const t of this.generateTokens(ids, params)) {
      const now = performance.now();
      if (first) { this.stats.prefillMs = now - t0; t0 = now; first = false; }
      this.stats.newTokens++;
      const piece = dec ? dec.push(t) : `${t} `;
      if (piece) yield piece;
      this.stats.decodeMs = performance.now() - t0;
      this.stats.tokensPerSecond = this.stats.newTokens / (this.stats.decodeMs / 1000 || Infinity);
    }
    const tail = dec ? dec.flush() : "";
    if (tail) yield tail;
  }

  /** Release the ONNX Runtime sessions. */
  async release() {
    for (const s of Object.values(this.sessions)) await s.release();
    this.sessions = {};
  }
}
