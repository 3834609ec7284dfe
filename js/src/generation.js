// The generation core, part for part the Python runtime's (runtime/generation.py), under the same names
// in JS casing: every JS front end (Session.generate / generateTokens as a batch of one,
// Session.generateBatch, BatchGenerator) runs its sequences through this one module, so a sampling
// feature is written once here, as it is once in Python.
//
// - Batch: the rows being decoded, one state row each (rows join after their prompt and leave when they
//   finish, between steps). sample() picks one token for every row and turns it into text; advance()
//   runs ONE model step for the rows still running. A failure in one row (its sampler, tokenizer, stop
//   matching, logprobs, or its part of the model step) ends that row alone with its error; the others
//   carry on.
// - Row: one sequence: its Sampler (sampling.js), limits, stop token ids, optional TextStream.
// - TextStream: token ids -> text pieces (tokenizers.js's StreamDecoder), stop strings (StopMatcher,
//   bounded work per token) and OpenAI-style log-probabilities delivered with the text they complete.
// The state rule is Python's: the state a row joins with is read, never written; the batch's own
// intermediate states are recycled as one call's are (session.js's Chain).
// Constrained decoding (Python's Row.constraint) is not in the JavaScript runtime (docs/edge.md).
import { RuntimeUserError } from "./errors.js";
import { pairwiseSum } from "./sampling.js";
import { StreamDecoder } from "./tokenizers.js";

// -- stop strings ---------------------------------------------------------------------------------
/**
 * Stop strings across text pieces (Python's StopMatcher): text is delivered except the tail that could
 * still begin a stop string; the first piece that completes one ends the text where the earliest-starting
 * stop string begins (the same result as indexOf on all the text so far, after each piece).
 * Bounded work: per stop string the length of the longest suffix of the text that is a prefix of it
 * (Knuth-Morris-Pratt, the failure table built lazily), so the held text is never searched again.
 * Positions are JS string indices (UTF-16 code units); pieces are whole characters, so the text is
 * cut where Python's is.
 */
export class StopMatcher {
  /** @param {Iterable<string>} stops ("" is ignored: it could never be held back) */
  constructor(stops = []) {
    this.stops = [...new Set(stops)].filter((s) => s);
    this._j = this.stops.map(() => 0); // matched prefix length per stop string
    this._fail = this.stops.map(() => []); // KMP failure table per stop string, built on demand
    this._held = []; // the held text, as pieces
    this._heldLen = 0;
  }

  get held() { return this._held.join(""); }

  /** The longest proper prefix of stops[i].slice(0, q + 1) that is also a suffix of it. */
  _failure(i, q) {
    const x = this.stops[i], f = this._fail[i];
    while (f.length <= q) {
      const m = f.length;
      let k = m ? f[m - 1] : 0;
      if (m) {
        while (k && x[m] !== x[k]) k = f[k - 1];
        if (x[m] === x[k]) k++;
      }
      f.push(k);
    }
    return f[q];
  }

  /** Advance stop string i over `piece`: the index in `piece` where it first completes, or -1. */
  _scan(i, piece) {
    const x = this.stops[i], n = x.length;
    let j = this._j[i], k0 = 0;
    if (j === 0) { // a native skip to the first character that can start it
      k0 = piece.indexOf(x[0]);
      if (k0 < 0) return -1;
    } else if (j + piece.length <= n && x.startsWith(piece, j)) { // the piece continues the match
      this._j[i] = j + piece.length;
      return j + piece.length === n ? piece.length - 1 : -1;
    }
    for (let k = k0; k < piece.length; k++) {
      const c = piece[k];
      while (j && c !== x[j]) j = this._failure(i, j - 1);
      if (c === x[j]) {
        j++;
        if (j === n) { this._j[i] = j; return k; }
      }
    }
    this._j[i] = j;
    return -1;
  }

  /** @returns {[string, boolean]} the text deliverable now, whether a stop string completed (the text ends before it) */
  push(piece) {
    if (!this.stops.length) return [piece, false];
    let first = null; // where the earliest-starting stop string starts, from the held text's start
    this.stops.forEach((x, i) => {
      const k = this._scan(i, piece);
      if (k >= 0) {
        const start = this._heldLen + k + 1 - x.length;
        first = first === null ? start : Math.min(first, start);
      }
    });
    if (first !== null) {
      const text = this._take(first, piece);
      this._held = [];
      this._heldLen = 0;
      return [text, true];
    }
    const hold = this._j.reduce((a, b) => Math.max(a, b), 0); // (no spread: any number of stop strings)
    return [this._take(this._heldLen + piece.length - hold, piece, true), false];
  }

  /** The first n characters of held text + piece; keep: the rest stays held. */
  _take(n, piece, keep = false) {
    if (piece) { this._held.push(piece); this._heldLen += piece.length; }
    const out = [];
    let used = 0;
    while (n > 0 && used < this._held.length) {
      const c = this._held[used];
      if (c.length <= n) { out.push(c); used++; n -= c.length; this._heldLen -= c.length; }
      else { out.push(c.slice(0, n)); this._held[used] = c.slice(n); this._heldLen -= n; n = 0; }
    }
    this._held = keep ? this._held.slice(used) : [];
    if (!keep) this._heldLen = 0;
    return out.join("");
  }

  /** At the end of the text (no more pieces): the held text, which can no longer begin a stop string. */
  release() {
    const text = this.held;
    this._held = [];
    this._heldLen = 0;
    this._j = this.stops.map(() => 0);
    return text;
  }
}

// -- log-probabilities ----------------------------------------------------------------------------
/** One generated token: its log-probability, the k most likely tokens of its position ([id, logprob],
 *  most likely first) and, once its text is decoded, the characters it produced: [start, end) in the
 *  generated text (JS string indices). */
export class TokenLogprob {
  constructor(token, logprob, top) {
    Object.assign(this, { token, logprob, top, start: null, end: null });
  }
}

/** Python's token_logprob: log_softmax of the model's logits for the position (float64, numpy's pairwise
 *  sum; before temperature, top-p/top-k, penalties and bias, as vLLM reports them), for `token` and the
 *  k most likely (ties: lower id first). */
export function tokenLogprob(logits, token, k) {
  const n = logits.length;
  let m = -Infinity;
  for (let i = 0; i < n; i++) if (logits[i] > m) m = logits[i];
  const e = new Float64Array(n);
  for (let i = 0; i < n; i++) e[i] = Math.exp(logits[i] - m);
  const z = m + Math.log(pairwiseSum(e));
  k = Math.min(k, n);
  const ids = [], lps = []; // the best k so far, most likely first (a later id never passes an equal one)
  if (k > 0) {
    for (let i = 0; i < n; i++) {
      const v = logits[i] - z;
      if (ids.length === k && !(v > lps[k - 1])) continue;
      let at = ids.length === k ? k - 1 : ids.length;
      while (at > 0 && v > lps[at - 1]) at--;
      ids.splice(at, 0, i);
      lps.splice(at, 0, v);
      if (ids.length > k) { ids.pop(); lps.pop(); }
    }
  }
  return new TokenLogprob(token, logits[token] - z, ids.map((t, j) => [t, lps[j]]));
}

// -- text -----------------------------------------------------------------------------------------
/** One row's text (Python's TextStream): tokens -> pieces (StreamDecoder), stop strings (StopMatcher),
 *  and the TokenLogprob entries delivered with the text that completes them (on a stop string: every
 *  token that produced some delivered text; the rest are never reported). */
export class TextStream {
  constructor(tokenizer, stops = [], logprobs = false) {
    this.decoder = new StreamDecoder(tokenizer);
    this.stops = new StopMatcher(stops);
    this.lpWait = logprobs ? [] : null; // entries not yet delivered
    this.decoded = 0; // characters decoded so far
    this.sent = 0; // characters delivered so far
  }

  /** @returns {[string, TokenLogprob[] | null, boolean]} text deliverable now, the entries it completes (null: not asked for), stopped */
  push(token, entry = null) {
    if (this.lpWait !== null) this.lpWait.push(entry);
    const piece = this.decoder.push(token);
    if (!this.decoder.pending) this._decoded(piece); // (else the piece is an incomplete character, held)
    const [text, stopped] = this.stops.push(piece);
    return [text, this._deliver(text, stopped), stopped];
  }

  /** At the end of the row (not on a stop string): what was held back; stopped if that completed a stop string after all. */
  finish() {
    const piece = this.decoder.flush();
    this._decoded(piece);
    let [text, stopped] = this.stops.push(piece);
    if (!stopped) text += this.stops.release();
    return [text, this._deliver(text, stopped), stopped];
  }

  _decoded(piece) {
    if (this.lpWait === null) return;
    for (let i = this.lpWait.length - 1; i >= 0; i--) { // the tokens waiting for their text produced `piece`
      const e = this.lpWait[i];
      if (e.end !== null) break;
      e.start = this.decoded;
      e.end = this.decoded + piece.length;
    }
    this.decoded += piece.length;
  }

  _deliver(text, stopped) {
    this.sent += text.length;
    if (this.lpWait === null) return null;
    const w = this.lpWait;
    let n = 0;
    while (n < w.length && w[n].end !== null && (stopped ? w[n].start < this.sent : w[n].end <= this.sent)) n++;
    const out = w.splice(0, n);
    if (stopped) w.length = 0;
    return out;
  }
}

// -- rows -----------------------------------------------------------------------------------------
/** What one row produced in a step (Python's Out). token: the token sampled (null on a failure);
 *  appended: it is part of the row's tokens (not a stop id); text/logprobs: what to deliver now;
 *  reason: set when the row ended here; error: the failure that ended it. */
export class Out {
  constructor(row, token = null) {
    this.row = row;
    this.token = token;
    this.appended = false;
    this.text = "";
    this.logprobs = null;
    this.reason = null;
    this.error = null;
  }
}

/**
 * One sequence in a Batch (Python's Row). maxNewTokens: null for no limit. stopIds: token ids that end
 * the row (not part of its tokens; default the sampler's `stop`). text: a TextStream (null: tokens only).
 * logprobs: report each token's log-probability with this many alternatives (null: off; needs text).
 * deadline: a performance.now() after which the row ends with "timeout". feedLast: the row's final token
 * is run through the model before it leaves (its state then includes the whole reply, as generate's);
 * keepState: keep the final state in `final` (a State of batch 1). key: anything the caller finds it by.
 */
export class Row {
  constructor(sampler, { maxNewTokens = null, stopIds = null, text = null, logprobs = null, deadline = null,
    feedLast = false, keepState = false, key = null } = {}) {
    this.sampler = sampler;
    this.maxNewTokens = maxNewTokens;
    this.stopIds = new Set(stopIds ?? sampler.stop);
    this.text = text;
    this.logprobs = logprobs;
    this.deadline = deadline;
    this.feedLast = feedLast;
    this.keepState = keepState;
    this.key = key;
    /** @type {number[]} the tokens produced (stop ids excluded) */
    this.tokens = [];
    this.logits = null; // the logits the next token is sampled from
    this.reason = null; // why it ended: stop, length, timeout, error
    this.error = null;
    this.final = null; // after it left, with keepState: its State
  }

  /** Greedy with nothing that changes the logits: the token is the argmax of the raw logits (Python's plain_greedy). */
  get plainGreedy() {
    const s = this.sampler, p = s.params;
    return p.temperature === 0 && !p.presence_penalty && !p.frequency_penalty && !s.ban.size && !s.bias.size;
  }

  /** The next token: the sampler, or for plain greedy the first maximum of the logits (no softmax). */
  pick() {
    if (!this.plainGreedy) return this.sampler.sample(this.logits);
    const x = this.logits;
    let best = 0;
    for (let i = 0; i < x.length; i++) {
      if (Number.isNaN(x[i])) { best = i; break; } // as numpy's argmax: a NaN is picked (and refused below)
      if (x[i] > x[best]) best = i;
    }
    if (!x.length || !Number.isFinite(x[best])) throw new RuntimeUserError("sampling: the logits contain NaN or inf (a damaged model or state?)");
    return best;
  }

  /** Take a sampled token: its text (stop strings, logprobs); sets `reason` (also on the Out) if the row
   *  ends here, and then delivers what was held back (TextStream.finish). */
  accept(token, now = performance.now()) {
    const out = new Out(this, token);
    if (this.stopIds.has(token)) { this.reason = "stop"; return this._end(out); }
    this.tokens.push(token);
    out.appended = true;
    let stopped = false;
    if (this.text !== null) {
      const entry = this.logprobs !== null ? tokenLogprob(this.logits, token, this.logprobs) : null;
      [out.text, out.logprobs, stopped] = this.text.push(token, entry);
    }
    if (stopped) { this.reason = out.reason = "stop"; return out; }
    if (this.maxNewTokens !== null && this.tokens.length >= this.maxNewTokens) this.reason = "length";
    else if (this.deadline !== null && now > this.deadline) this.reason = "timeout";
    return this.reason ? this._end(out) : out;
  }

  _end(out) {
    if (this.text !== null) {
      const [text, lps, stopped] = this.text.finish();
      out.text += text;
      if (lps !== null) out.logprobs = [...(out.logprobs ?? []), ...lps];
      if (stopped) this.reason = "stop"; // the held-back text completed a stop string after all
    }
    out.reason = this.reason;
    return out;
  }
}

function failed(row, e) {
  row.reason = "error";
  row.error = e;
  const out = new Out(row);
  out.reason = "error";
  out.error = e;
  return out;
}

// -- state rows -----------------------------------------------------------------------------------
/** Rows `rows` of every array (batch n) -> arrays of batch rows.length. */
export function pickRows(arrays, rows, n) {
  const out = {};
  for (const [k, a] of Object.entries(arrays)) {
    const per = a.data.length / n, data = new a.data.constructor(per * rows.length);
    rows.forEach((r, j) => data.set(a.data.subarray(r * per, (r + 1) * per), j * per));
    out[k] = { dtype: a.dtype, shape: [rows.length, ...a.shape.slice(1)], data };
  }
  return out;
}

/** Arrays of several batches, their rows one after another. */
export function concatRows(parts) {
  const out = {};
  for (const k of Object.keys(parts[0])) {
    const list = parts.map((p) => p[k]);
    const data = new list[0].data.constructor(list.reduce((s, a) => s + a.data.length, 0));
    let at = 0;
    for (const a of list) { data.set(a.data, at); at += a.data.length; }
    out[k] = { dtype: list[0].dtype, shape: [list.reduce((s, a) => s + a.shape[0], 0), ...list[0].shape.slice(1)], data };
  }
  return out;
}

// -- the batch ------------------------------------------------------------------------------------
/**
 * Rows decoded together (Python's Batch): one batched state whose rows are `rows`, in order.
 *
 *   const b = new Batch(session);
 *   await b.add(new Row(new Sampler(params, session.vocabSize), { maxNewTokens: 20 }), state, logits);
 *   while (b.rows.length) {
 *     const outs = await b.sample();   // one token per row -> text; finished/failed rows leave
 *     const failed = await b.advance(); // one model step for the rows still running
 *   }
 *
 * The calls are made one after another (await each); rows join and leave between steps.
 */
export class Batch {
  constructor(session) {
    this.session = session;
    /** @type {Row[]} */
    this.rows = [];
    this._chain = null; // the batch's state: a chain of runs over the state the rows joined with
    this._next = null; // the tokens sample() picked for the rows, in row order
    this._leaving = []; // rows that finished with feedLast: they leave after advance()
  }

  get length() { return this.rows.length; }

  /** Rows join (their prompt already in `state`, batch rows.length, read and never written; `logits`
   *  one Float32Array per row, or one row's) between steps. */
  async add(rows, state, logits) {
    rows = rows instanceof Row ? [rows] : [...rows];
    if (logits && typeof logits[0] === "number") logits = [logits];
    if (this._next !== null) throw new Error("rows join between steps: call advance() after sample() first");
    if (state?.batch !== rows.length || logits?.length !== rows.length) {
      throw new RuntimeUserError(`${rows.length} rows joining with a state of batch ${state?.batch} and ${logits?.length} logits rows`);
    }
    const s = this.session;
    s._check(state, rows.length);
    rows.forEach((r, i) => { r.logits = logits[i]; });
    if (this._chain === null) {
      this._chain = s._chain(state);
    } else {
      const joined = concatRows([await s._arraysOf(this._chain), await state.toArrays()]);
      this._chain.discard();
      this._chain = s._chain(s.stateFromArrays(joined));
    }
    this.rows.push(...rows);
  }

  /** A row leaves now (e.g. its consumer went away), between steps; nothing more is produced for it. */
  async remove(row) {
    if (this._next !== null) throw new Error("rows leave between steps: call advance() after sample() first");
    const i = this.rows.indexOf(row);
    if (i < 0) throw new RuntimeUserError("that row is not in this batch");
    await this._drop([i]);
  }

  /** Every row leaves now, even between sample() and advance() (the tokens sampled are not run); rows
   *  with keepState get the state after the last token run. */
  async close() {
    this._next = null;
    this._leaving = [];
    await this._drop(this.rows.map((_, i) => i));
  }

  /** Rows idx leave; those with keepState get their state (one download of the batch for them all). */
  async _drop(idx) {
    if (!idx.length) return;
    const s = this.session, chain = this._chain, n = this.rows.length;
    const gone = new Set(idx);
    const keep = this.rows.map((_, i) => i).filter((i) => !gone.has(i));
    const wanted = idx.filter((i) => this.rows[i].keepState);
    if (n === 1) {
      // the whole batch is this row's state: handed over as it is (no copy)
      if (wanted.length) this.rows[0].final = chain.finish() ?? chain.startState;
      else chain.discard();
      this._chain = null;
    } else if (!keep.length && !wanted.length) {
      chain.discard();
      this._chain = null;
    } else {
      const arrays = await s._arraysOf(chain);
      for (const i of wanted) this.rows[i].final = s.stateFromArrays(pickRows(arrays, [i], n));
      chain.discard();
      this._chain = keep.length ? s._chain(s.stateFromArrays(pickRows(arrays, keep, n))) : null;
    }
    this.rows = keep.map((i) => this.rows[i]);
  }

  /** One token for every row (each its own sampler), turned into text. Rows that end leave the batch
   *  (with feedLast, after advance); a row that fails ends alone (its Out has the error). */
  async sample(now = performance.now()) {
    if (this._next !== null) throw new Error("sample() twice without advance()");
    const outs = [], toks = [], leave = [];
    this.rows.forEach((row, i) => {
      let out;
      try {
        out = row.accept(row.pick(), now);
      } catch (e) { // this row alone ends; the batch carries on
        outs.push(failed(row, e));
        leave.push(i);
        return;
      }
      outs.push(out);
      if (row.reason !== null && !(row.feedLast && out.appended)) leave.push(i);
      else {
        if (row.reason !== null) this._leaving.push(row);
        toks.push(out.token);
      }
    });
    await this._drop(leave);
    this._next = toks;
    return outs;
  }

  /** ONE model step for the rows still in the batch (with the tokens sample() picked); the rows that
   *  finished with feedLast then leave. A step that fails is retried row by row: the rows whose own step
   *  fails end with their error (returned as Outs); the others carry on. */
  async advance() {
    const toks = this._next;
    this._next = null;
    if (toks === null) throw new Error("advance() without sample()");
    if (!this.rows.length) return [];
    const s = this.session, n = this.rows.length, bad = [];
    let logits;
    try {
      logits = s._rows(await s._stepOn(this._chain, s._tokens([toks]), n), n);
    } catch (e) {
      if (n === 1) {
        bad.push(failed(this.rows[0], e));
        this._leaving = [];
        await this._drop([0]);
        return bad;
      }
      const arrays = await s._arraysOf(this._chain);
      const results = [];
      for (let i = 0; i < n; i++) {
        try {
          results.push(await s.step([toks[i]], s.stateFromArrays(pickRows(arrays, [i], n))));
        } catch (err) {
          results.push({ error: err });
        }
      }
      const good = [];
      results.forEach((r, i) => { if (r.error !== undefined) bad.push(failed(this.rows[i], r.error)); else good.push(i); });
      this._chain.discard();
      this._chain = null;
      const states = await Promise.all(good.map((i) => results[i].state.toArrays()));
      this.rows = good.map((i) => this.rows[i]);
      this._leaving = this._leaving.filter((r) => this.rows.includes(r));
      if (!good.length) return bad;
      this._chain = s._chain(s.stateFromArrays(concatRows(states)));
      logits = good.map((i) => results[i].logits[0]);
    }
    this.rows.forEach((r, i) => { r.logits = logits[i]; });
    if (this._leaving.length) {
      const idx = this._leaving.map((r) => this.rows.indexOf(r));
      this._leaving = [];
      await this._drop(idx);
    }
    return bad;
  }

  /** sample() then advance(): every row's Out, then those of rows whose model step failed. */
  async step(now) {
    const outs = await this.sample(now);
    return [...outs, ...(await this.advance())];
  }
}
