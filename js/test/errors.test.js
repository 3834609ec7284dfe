// Regression tests of the JS runtime's error contract (docs/errors.md): damaged or tampered exports,
// wrong arguments and concurrent use give one RuntimeUserError (or the right answer), never a crash
// deep inside onnxruntime, a silently wrong result, or an input the Python runtime refuses.
// The model parts run through pytest (tests/edge/test_js_errors.py sets RWKV_AUDIT_DIR: exports of
// the default model and the Python runtime's generations on it); the rest needs no model.
import { after, test } from "node:test";
import assert from "node:assert/strict";
import { createServer } from "node:http";
import { copyFile, mkdir, mkdtemp, readFile, readdir, rm, truncate, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Session, RuntimeUserError, Sampler, saveNpz, loadNpz, scanModel, parseManifest, ByteTokenizer, WorldTokenizer, HFTokenizer }
  from "../src/node.js";
import { checkCompanion } from "../src/manifest.js";

const dir = process.env.RWKV_AUDIT_DIR;
const cases = dir ? JSON.parse(await readFile(join(dir, "audit.json"), "utf8")) : null;
const withModel = { skip: dir ? false : "RWKV_AUDIT_DIR is not set (run through pytest tests/edge/test_js_errors.py)" };
const userError = (re) => (e) => e instanceof RuntimeUserError && (!re || re.test(e.message));

// -- helpers --------------------------------------------------------------------------------------
function varint(n) {
  const out = [];
  do { const b = n % 128; n = Math.floor(n / 128); out.push(n > 0 ? b | 128 : b); } while (n > 0);
  return out;
}
function readVarint(buf, pos) {
  let v = 0, m = 1, b;
  do { b = buf[pos++]; v += (b & 127) * m; m *= 128; } while (b & 128);
  return [v, pos];
}
/** An ONNX file's bytes with metadata entries replaced (undefined: removed): what a tamperer would do. */
function setMetadata(bytes, entries) {
  const enc = new TextEncoder(), dec = new TextDecoder();
  const parts = [];
  for (let pos = 0; pos < bytes.length;) {
    const start = pos;
    let key, end;
    [key, pos] = readVarint(bytes, pos);
    const field = Math.floor(key / 8), wire = key & 7;
    if (wire === 0) [, end] = readVarint(bytes, pos);
    else if (wire === 2) { let n; [n, pos] = readVarint(bytes, pos); end = pos + n; }
    else end = pos + (wire === 1 ? 8 : 4);
    let drop = false;
    if (field === 14) {
      let p = readVarint(bytes, pos)[1], n;
      [n, p] = readVarint(bytes, p);
      drop = dec.decode(bytes.subarray(p, p + n)) in entries;
    }
    if (!drop) parts.push(bytes.subarray(start, end));
    pos = end;
  }
  for (const [k, v] of Object.entries(entries)) {
    if (v === undefined) continue;
    const kb = enc.encode(k), vb = enc.encode(v);
    const entry = [10, ...varint(kb.length), ...kb, 18, ...varint(vb.length), ...vb];
    parts.push(Uint8Array.from([114, ...varint(entry.length), ...entry]));
  }
  return Buffer.concat(parts);
}
const manifestOf = (bytes) => JSON.parse(scanModel(bytes).metadata["rwkv.manifest"]);
async function tokensOf(iter) { const out = []; for await (const t of iter) out.push(t); return out; }

let work;
after(() => work && rm(work, { recursive: true, force: true }));
async function folder(name) {
  work ??= await mkdtemp(join(tmpdir(), "rwkv-js-audit-"));
  const d = join(work, name);
  await rm(d, { recursive: true, force: true });
  await mkdir(d, { recursive: true });
  return d;
}
/** A copy of the export with the same edit applied to both graphs' manifests (a consistent tamper). */
async function tampered(name, edit, { seqEdit = edit } = {}) {
  const d = await folder(name);
  for (const [file, fn] of [["m.onnx", edit], ["m.seq.onnx", seqEdit]]) {
    const bytes = await readFile(join(cases.dir, file));
    const m = manifestOf(bytes);
    const r = fn ? fn(m) : undefined;
    await writeFile(join(d, file), setMetadata(bytes, { "rwkv.manifest": typeof r === "string" ? r : JSON.stringify(m) }));
  }
  return join(d, "m.onnx");
}

// -- no model needed -------------------------------------------------------------------------------
const good = () => ({ format_version: 1, architecture: "rwkv4", n_layer: 1, n_embd: 4, vocab_size: 8, export_id: "abc",
  state: [{ name: "s", output: "s_out", shape: ["batch", 4], dtype: "float32", init: 0 }] });

test("manifest: every field the runtime relies on is typed; names distinct; companions plain names (as Python)", () => {
  const bad = [
    (m) => { delete m.architecture; }, (m) => { m.architecture = ""; }, (m) => { m.vocab_size = 2 ** 25; },
    (m) => { m.tokenizer = "bytes"; }, (m) => { m.tokenizer = { kind: 5 }; }, (m) => { m.tokens_input = 5; },
    (m) => { m.export_id = 5; }, (m) => { m.initial_state = "yes"; }, (m) => { m.options = null; },
    (m) => { m.companions = "m.seq.onnx"; }, (m) => { m.companions = { sequence: "../m.seq.onnx" }; },
    (m) => { m.companions = { sequence: "/abs/m.seq.onnx" }; }, (m) => { m.companions = { sequence: "https://x.test/m.onnx" }; },
    (m) => { m.companions = { sequence: "sub\\m.onnx" }; }, (m) => { m.companions = { sequence: 5 }; },
    (m) => { m.companions = { other: "m.x.onnx" }; }, (m) => { m.state[0].name = ""; }, (m) => { m.state[0].shape = ["batch", 0]; },
    (m) => { m.state[0].output = "logits"; }, (m) => { m.tokens_input = "s"; }, (m) => { m.state[0].layer = "0"; },
    (m) => JSON.stringify(m).replace('"init":0', '"init":1e999'), // JSON.parse gives Infinity
  ];
  for (const edit of bad) {
    const m = good();
    const r = edit(m);
    assert.throws(() => parseManifest(typeof r === "string" ? r : JSON.stringify(m), "m.onnx"), userError(/^m\.onnx: /), String(edit));
  }
  const ok = good(); ok.companions = { step: "m.onnx", sequence: "m.seq.onnx" }; ok.future_key = [1];
  assert.equal(parseManifest(JSON.stringify(ok)).companions.sequence, "m.seq.onnx");
  const seq = parseManifest(JSON.stringify({ ...good(), graph: "step" }));
  assert.throws(() => checkCompanion(parseManifest(JSON.stringify(good())), seq, "m.seq.onnx", "sequence"), /is a step graph/);
});

test("npz: damage (truncation, bit flips, random bytes) is a RuntimeUserError naming the file; CRC-32 checked", async () => {
  const a = { dtype: "float32", shape: [2, 8], data: Float32Array.from({ length: 16 }, (_, i) => i / 3) };
  const good = saveNpz({ x: a, __rwkv_export_id__: { dtype: "str", shape: [], data: "id" } });
  assert.deepEqual(Array.from((await loadNpz(good)).x.data), Array.from(a.data));
  let seed = 1;
  const rnd = () => ((seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648);
  for (let i = 0; i < 400; i++) {
    const b = good.slice();
    b[Math.floor(rnd() * b.length)] ^= 1 + Math.floor(rnd() * 255);
    for (const bytes of [b, good.subarray(0, Math.floor(rnd() * good.length))]) {
      try {
        const got = await loadNpz(bytes, "s.npz");
        // a flip outside the checked parts (a timestamp) may load: then the values are the saved ones
        assert.deepEqual(Array.from(got.x?.data ?? []), Array.from(a.data));
      } catch (e) {
        assert.ok(e instanceof RuntimeUserError && e.message.startsWith("s.npz: "), `${e.name}: ${e.message}`);
      }
    }
  }
});

test("tokenizers: out-of-range byte ids, a wrong World vocabulary or tokenizer.json are RuntimeUserErrors", async () => {
  const t = new ByteTokenizer();
  assert.equal(t.decode([104, 105]), "hi");
  assert.throws(() => t.decode([300]), userError(/outside the byte vocabulary/)); // was byte 44 (",")
  assert.throws(() => t.decode([-1]), RuntimeUserError);
  assert.throws(() => new WorldTokenizer("hello world\n"), userError(/World vocabulary line 1/));
  assert.throws(() => new WorldTokenizer("1 '\\q' 1\n"), userError(/World vocabulary line 1/));
  await assert.rejects(HFTokenizer.fromJSON("{not json"), userError(/tokenizer.json does not load/));
  await assert.rejects(HFTokenizer.fromJSON("{}"), userError(/tokenizer.json does not load/));
});

test("sampler: unknown settings are refused (topP, max_new_tokens would silently use the defaults)", () => {
  assert.throws(() => new Sampler({ topP: 0.1 }, 8), userError(/unknown setting topP/));
  assert.throws(() => new Sampler({ max_new_tokens: 3 }, 8), userError(/unknown setting max_new_tokens/));
  assert.equal(new Sampler(null, 4).params.top_p, 0.85);
  for (const p of [{ temperature: NaN }, { top_p: 1.5 }, { top_k: -1 }, { top_k: 0.5 }, { seed: -1 }, { penalty_decay: 2 }]) {
    assert.throws(() => new Sampler(p, 8), RuntimeUserError, JSON.stringify(p));
  }
});

test("sampler: logit_bias is checked as Python checks it, and added to the logits", () => {
  for (const bias of [{ abc: 1 }, { "-1": 1 }, { 8: 1 }, { 2: NaN }, { 2: "1" }, [[2, 1]], new Map([[1.5, 1]])]) {
    assert.throws(() => new Sampler({ logit_bias: bias }, 8), userError(/logit_bias/), String(bias));
  }
  const logits = [5, 1, 0];
  assert.equal(new Sampler({ temperature: 0, logit_bias: { 1: 4.5 } }, 3).sample(logits), 1);
  assert.equal(new Sampler({ temperature: 0, logit_bias: new Map([[2, 6]]) }, 3).sample(logits), 2);
  assert.equal(new Sampler({ temperature: 0, logit_bias: { 1: 100 }, ban: [1] }, 3).sample(logits), 0);
});

// -- on the default model --------------------------------------------------------------------------
test("greedy and seeded generation equal the Python runtime's token for token (default model, 200 tokens)", withModel, async () => {
  for (const file of ["m.onnx", "ext/m.onnx"]) {
    const s = await Session.create(join(cases.dir, file));
    for (const { params, tokens } of cases.generations) {
      assert.deepEqual(await tokensOf(s.generateTokens(cases.prompt, { ...params, maxNewTokens: tokens.length })), tokens, `${file} ${JSON.stringify(params)}`);
    }
  }
});

test("a tampered manifest that passes the schema is checked against the graph before any run", withModel, async () => {
  const edits = {
    "vocab_size 300": [(m) => { m.vocab_size = 300; }, /logits has shape \[batch,256\], the manifest says vocabulary 300/], // was: 44-value logits rows
    "vocab_size 200": [(m) => { m.vocab_size = 200; }, /vocabulary 200/], // was: logits silently cut to 200
    "state shape": [(m) => { m.state[0].shape = ["batch", 64]; }, /the manifest says \[batch,64\]/],
    "state rank": [(m) => { m.state[0].shape = ["batch", 128, 1]; }, /rank 2/],
    "state dtype": [(m) => { m.state[0].dtype = "float16"; }, /the manifest says float16/],
    "a state dropped": [(m) => { m.state.pop(); }, /inputs the manifest does not describe/],
    "graph kind": [(m) => { m.graph = m.graph === "step" ? "sequence" : "step"; }, /tokens of rank/],
    "duplicate output": [(m) => { m.state[1].output = m.state[0].output; }, /distinct/],
    "logits = a state output": [(m) => { m.logits_output = m.state[0].output; }, /distinct/],
  };
  for (const [name, [edit, re]] of Object.entries(edits)) {
    const path = await tampered(name.replace(/\W+/g, "-"), edit);
    await assert.rejects(Session.create(path), userError(re), name);
  }
  // a companion outside the model's folder is never read (the web build would fetch any URL)
  const out = await tampered("companion-up", (m) => { m.companions.sequence = "../m.seq.onnx"; }, { seqEdit: null });
  await assert.rejects(Session.create(out), userError(/plain file name/));
  // the sequence graph named as the step graph's companion but is a step graph
  const self = await tampered("companion-self", (m) => { m.companions.sequence = "m.onnx"; }, { seqEdit: null });
  await assert.rejects(Session.create(self), userError(/named as the sequence graph of this export but is a step graph/));
});

test("a companion graph from another export is refused (export_id), even of the same checkpoint", withModel, async () => {
  const d = await folder("mixed");
  await copyFile(join(cases.dir, "m.onnx"), join(d, "m.onnx"));
  await copyFile(join(cases.other, "m.seq.onnx"), join(d, "m.seq.onnx"));
  await assert.rejects(Session.create(join(d, "m.onnx")), userError(/m\.seq\.onnx belongs to another export/));
});

test("a missing or truncated .onnx.data is named as such", withModel, async () => {
  for (const [name, damage, re] of [["nodata", (p) => rm(p), /its weights file m\.onnx\.data is missing/],
    ["halfdata", (p) => truncate(p, 1_000_000), /its weights file m\.onnx\.data is truncated or damaged/],
    ["emptydata", (p) => truncate(p, 0), /truncated or damaged/]]) {
    const d = await folder(name);
    for (const f of ["m.onnx", "m.seq.onnx", "m.onnx.data"]) await copyFile(join(cases.dir, "ext", f), join(d, f));
    await damage(join(d, "m.onnx.data"));
    await assert.rejects(Session.create(join(d, "m.onnx")), userError(re), name);
  }
});

test("an embedded initial state is checked (base64, names, dtype, shape [1, ...], NaN)", withModel, async () => {
  const s0 = await Session.create(join(cases.dir, "m.onnx"));
  const spec = s0.manifest.state[0];
  const arr = (shape, fill = 0.5, Arr = Float32Array, dtype = "float32") => ({ dtype, shape, data: new Arr(shape[0] * (shape[1] ?? 1)).fill(fill) });
  const b64 = (u8) => Buffer.from(u8).toString("base64");
  const variants = {
    good: [b64(saveNpz({ [spec.name]: arr([1, 128]) })), null],
    notBase64: ["!!not base64", /not valid base64/],
    none: ["", /says it embeds an initial state, but none is there/],
    short: [b64(saveNpz({ [spec.name]: arr([1, 64]) })), /has shape \[1,64\]/], // was: the rest of each row left 0
    batch2: [b64(saveNpz({ [spec.name]: arr([2, 128]) })), /expected \[1,128\]/],
    unknown: [b64(saveNpz({ bogus: arr([1, 128]) })), /names "bogus"/],
    float64: [b64(saveNpz({ [spec.name]: arr([1, 128], 0.5, Float64Array, "float64") })), /dtype float64/],
    nan: [b64(saveNpz({ [spec.name]: arr([1, 128], NaN) })), /holds NaN/],
  };
  for (const [name, [value, re]] of Object.entries(variants)) {
    const d = await folder(`init-${name}`);
    const bytes = await readFile(join(cases.dir, "m.onnx"));
    const m = manifestOf(bytes);
    m.initial_state = "embedded";
    delete m.companions.sequence;
    await writeFile(join(d, "m.onnx"), setMetadata(bytes, { "rwkv.manifest": JSON.stringify(m), "rwkv.initial_state": value }));
    if (!re) {
      const st = await (await Session.create(join(d, "m.onnx"))).newState(2).toArrays();
      assert.ok(st[spec.name].data.every((v) => v === 0.5));
    } else {
      await assert.rejects(Session.create(join(d, "m.onnx")), userError(re), name);
    }
  }
});

test("tokens: only integers inside the vocabulary; a refused token leaves the state usable", withModel, async () => {
  const s = await Session.create(join(cases.dir, "m.onnx"));
  for (const bad of [["5"], [true], [null], [undefined], [[]], [[1, 2]], [1.5], [NaN], [-1], [256], ["0x10"]]) {
    await assert.rejects(s.step(bad), RuntimeUserError, JSON.stringify(bad));
    await assert.rejects(s.prefill([bad, bad]), RuntimeUserError, JSON.stringify(bad));
  }
  await assert.rejects(s.prefill(5), userError(/prefill needs token ids/));
  await assert.rejects(s.prefill([1, 2], undefined, 2.5), userError(/chunkSize must be an integer/));
  const st = s.newState(1);
  await assert.rejects(s.step([999], st), userError(/outside \[0, 256\)/));
  const want = (await s.step([65])).logits[0];
  assert.deepEqual((await s.step([65], st)).logits[0], want); // was: "already advanced"
  assert.equal((await s.step([65n])).logits[0].length, 256); // bigint ids are integers
  assert.throws(() => s.newState(1e9), userError(/batch must be an integer in \[1, 65536\]/)); // was: RangeError
});

test("generate: bad prompts and settings are RuntimeUserErrors; max tokens 0 yields nothing", withModel, async () => {
  const s = await Session.create(join(cases.dir, "m.onnx"));
  const text = async (prompt, params) => { let t = ""; for await (const p of s.generate(prompt, params)) t += p; return t; };
  for (const prompt of [65, null, undefined, {}]) await assert.rejects(text(prompt, {}), userError(/the prompt must be text or an array/));
  await assert.rejects(text("", {}), userError(/the prompt is empty/));
  await assert.rejects(text("ab\ud800", { maxNewTokens: 2 }), userError(/lone UTF-16 surrogate/)); // was: encoded as U+FFFD
  await assert.rejects(text("ab", { max_new_tokens: 2 }), userError(/unknown setting max_new_tokens/)); // was: 100 tokens
  await assert.rejects(text("ab", { topP: 0.1 }), userError(/unknown setting topP/));
  for (const p of [{ maxNewTokens: -1 }, { maxNewTokens: 1.5 }, { temperature: NaN }, { top_p: 1.01 }, { top_k: -1 }]) {
    await assert.rejects(text("ab", p), RuntimeUserError, JSON.stringify(p));
  }
  assert.equal(await text("ab", { maxNewTokens: 0 }), "");
  assert.equal((await tokensOf(s.generateTokens([65], null))).length, 100); // null settings: the defaults
  await assert.rejects(s.decode([1, 300]), userError(/outside the byte vocabulary/));
  await assert.rejects(s.decode("abc"), userError(/decode needs an array/));
  await s.release();
  await assert.rejects(s.step([1]), userError(/released/)); // was: TypeError reading 'run'
});

test("states: plain arrays and .npz bytes are checked; another export's state is refused", withModel, async () => {
  const s = await Session.create(join(cases.dir, "m.onnx"));
  const other = await Session.create(join(cases.other, "m.onnx"));
  const arrays = await (await s.prefill([65, 66])).state.toArrays();
  const name = s.manifest.state[0].name;
  const edit = (f) => { const a = structuredClone(arrays); f(a); return a; };
  const bad = {
    null: null, shortData: edit((a) => { a[name].data = new Float32Array(3); }), noData: edit((a) => { delete a[name].data; }),
    noShape: edit((a) => { delete a[name].shape; }), extra: edit((a) => { a.bogus = a[name]; }),
    missing: edit((a) => { delete a[name]; }), batch0: Object.fromEntries(Object.entries(arrays).map(([k, v]) => [k, { ...v, shape: [0, 128], data: new Float32Array(0) }])),
    otherExport: edit((a) => { a.__rwkv_export_id__ = { dtype: "str", shape: [], data: other.manifest.export_id }; }),
  };
  for (const [k, v] of Object.entries(bad)) assert.throws(() => s.stateFromArrays(v), RuntimeUserError, k);
  await assert.rejects(s.loadState(await other.newState(1).save()), userError(/another export/));
  const saved = await s.stateFromArrays(arrays).save();
  const flipped = saved.slice();
  flipped[300] ^= 0x40; // inside the first tensor's data: the CRC-32 no longer matches
  await assert.rejects(s.loadState(flipped), userError(/CRC-32/));
  await assert.rejects(s.loadState(saved.subarray(0, saved.length - 30)), RuntimeUserError);
  await assert.rejects(s.loadState(42), userError(/loadState needs/));
  const d = await folder("save");
  await assert.rejects(s.saveStateFile(s.newState(1), join(d, "nodir", "x.npz")), userError(/no such folder/));
  await mkdir(join(d, "adir"));
  await assert.rejects(s.saveStateFile(s.newState(1), join(d, "adir")), userError(/is a directory/));
  assert.deepEqual((await readdir(d)).sort(), ["adir"]); // no temporary file left behind
});

test("two generations at once on one session: each gets its own tokens and its own stats", withModel, async () => {
  const s = await Session.create(join(cases.dir, "m.onnx"));
  const a = { temperature: 0, maxNewTokens: 30 }, b = { temperature: 1, seed: 3, maxNewTokens: 12 };
  const alone = [await tokensOf(s.generateTokens([65, 66, 67], a)), await tokensOf(s.generateTokens([72, 105], b))];
  assert.deepEqual(await Promise.all([tokensOf(s.generateTokens([65, 66, 67], a)), tokensOf(s.generateTokens([72, 105], b))]), alone);
  const g1 = s.generate("Hello there", { temperature: 0, maxNewTokens: 20 });
  const g2 = s.generate("Abc", { temperature: 0, maxNewTokens: 5 });
  await Promise.all([tokensOf(g1), tokensOf(g2)]);
  assert.deepEqual([g1.stats.newTokens, g1.stats.promptTokens, g2.stats.newTokens, g2.stats.promptTokens], [20, 11, 5, 3]); // was: 25, 3, ...
  assert.equal(s.stats, undefined); // no session-wide statistics: each call has its own
});

test("web build (onnxruntime-web WASM over HTTP): runs wait their turn, as the JSEP build needs on WebGPU", withModel, async (t) => {
  const ortw = await import("onnxruntime-web");
  ortw.env.wasm.numThreads = 1;
  // onnxruntime-web's JSEP build throws "Session already started" when a run starts while another is
  // suspended (WebGPU readbacks); WASM in Node does not suspend, so this wrapper makes every run
  // suspend and refuses overlap the same way
  let running = false;
  const InferenceSession = {
    async create(...args) {
      const sess = await ortw.InferenceSession.create(...args);
      return new Proxy(sess, {
        get(target, key) {
          if (key !== "run") { const v = target[key]; return typeof v === "function" ? v.bind(target) : v; }
          return async (...a) => {
            if (running) throw new Error("Session already started");
            running = true;
            try { await new Promise((r) => setTimeout(r, 1)); return await target.run(...a); } finally { running = false; }
          };
        },
      });
    },
  };
  const ort = { ...ortw, InferenceSession, Tensor: ortw.Tensor, env: ortw.env };
  const server = createServer(async (req, res) => {
    try {
      const body = await readFile(join(cases.dir, decodeURIComponent(new URL(req.url, "http://x").pathname)));
      res.writeHead(200);
      res.end(req.method === "HEAD" ? undefined : body);
    } catch { res.writeHead(404); res.end(); }
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  t.after(() => server.close());
  const { Session: WebSession } = await import("../src/web.js");
  const url = `http://127.0.0.1:${server.address().port}/m.onnx`;
  const s = await WebSession.create(url, { ort });
  assert.deepEqual(s.graphs.sort(), ["sequence", "step"]);
  const { params, tokens } = cases.generations[0];
  const want = tokens.slice(0, 40);
  const both = await Promise.all([0, 1].map(() => tokensOf(s.generateTokens(cases.prompt, { ...params, maxNewTokens: 40 }))));
  assert.deepEqual(both, [want, want]);
  await assert.rejects(WebSession.create(url.replace("m.onnx", "nope.onnx"), { ort }), userError(/HTTP 404/));
});

// -- audit of issue #24 part 5 (docs/errors.md "Audit of this round": JS runtime) -------------------
const pb = (field, payload) => { // one length-delimited protobuf field
  const b = typeof payload === "string" ? new TextEncoder().encode(payload) : payload;
  return Uint8Array.from([...varint(field * 8 + 2), ...varint(b.length), ...b]);
};
const cat = (...parts) => Uint8Array.from(parts.flatMap((p) => [...p]));
const externalTensor = (loc) => pb(13, cat(pb(1, "location"), pb(2, loc))); // TensorProto.external_data
/** A Constant NodeProto whose value attribute (AttributeProto.t) keeps its data in file `loc`. */
const constantNode = (loc) => cat(pb(3, "c_out"), pb(4, "Constant"), pb(5, cat(pb(1, "value"), pb(5, externalTensor(loc)))));

test("scanModel: external data named anywhere a tensor can be (attributes, subgraphs, sparse, functions), as Python", () => {
  const body = cat(pb(1, "up")); // a node with an If whose then_branch graph holds an initializer
  const sub = cat(pb(5, externalTensor("sub.bin")), pb(15, cat(pb(1, externalTensor("sparse.bin")))));
  const ifNode = cat(body, pb(4, "If"), pb(5, cat(pb(1, "then_branch"), pb(6, sub))));
  const graph = cat(pb(1, constantNode("../attr.bin")), pb(1, ifNode), pb(5, externalTensor("init.bin")));
  const fn = cat(pb(7, constantNode("fn.bin")));
  const bytes = cat(pb(7, graph), pb(25, fn), pb(14, cat(pb(1, "k"), pb(2, "v"))));
  const got = scanModel(bytes);
  // was: only the graph initializer's init.bin (an attribute's "../attr.bin" was never confined)
  assert.deepEqual(got.externalData.sort(), ["../attr.bin", "fn.bin", "init.bin", "sparse.bin", "sub.bin"]);
  assert.deepEqual(got.metadata, { k: "v" });
  let deep = externalTensor("deep.bin"); // subgraphs nested past any real model: damage, not a stack overflow
  for (let i = 0; i < 40; i++) deep = pb(1, pb(5, pb(6, deep))); // graph > node > attribute > graph ...
  assert.deepEqual(scanModel(pb(7, pb(1, pb(5, pb(6, pb(5, externalTensor("ok.bin"))))))).externalData, ["ok.bin"]);
  assert.throws(() => scanModel(pb(7, deep)), /nested too deep/);
});

test("a float16 state holding NaN is refused, as a float32 one (was: only float32 was checked)", async () => {
  const fake = Object.assign(Object.create(Session.prototype), {
    manifest: { export_id: "", state: [{ name: "s", output: "s_out", shape: ["batch", 4], dtype: "float16", init: 0 }] },
  });
  const half = (bits) => saveNpz({ s: { dtype: "float16", shape: [1, 4], data: Uint16Array.from(bits) } });
  await assert.rejects(fake.loadState(half([0x3c00, 0x7e00, 0, 0])), userError(/state tensor s holds NaN/)); // quiet NaN
  await assert.rejects(fake.loadState(half([0xfc01, 0, 0, 0])), userError(/holds NaN/)); // signalling, negative
  await assert.rejects(fake.setInitialState(half([0x7c01, 0, 0, 0])), userError(/holds NaN/));
  // infinity is not NaN (RWKV-4's -1e30 fill becomes -inf in float16): checked as far as the NaN test goes
  assert.doesNotThrow(() => fake._checkArrays({ s: { dtype: "float16", shape: [1, 4], data: Uint16Array.from([0xfc00, 0x7c00, 0, 0]) } }, "s", { nan: true }));
});

test("files an export names are confined to the model's folder: symlinks out of it, a node attribute's external data", withModel, async () => {
  const { symlink } = await import("node:fs/promises");
  // the sequence graph a link to the same export's graph elsewhere (was: loaded from outside the folder)
  const a = await folder("link-companion");
  await copyFile(join(cases.dir, "m.onnx"), join(a, "m.onnx"));
  await symlink(join(cases.dir, "m.seq.onnx"), join(a, "m.seq.onnx"));
  await assert.rejects(Session.create(join(a, "m.onnx")), userError(/m\.onnx: names a file "m\.seq\.onnx" outside the model's folder \(it resolves to .*, a link out of the folder\)/));
  // the weights file a link out (was: onnxruntime's refusal, reported as "truncated or damaged")
  const b = await folder("link-weights");
  for (const f of ["m.onnx", "m.seq.onnx"]) await copyFile(join(cases.dir, "ext", f), join(b, f));
  await symlink(join(cases.dir, "ext", "m.onnx.data"), join(b, "m.onnx.data"));
  await assert.rejects(Session.create(join(b, "m.onnx")), userError(/names a file "m\.onnx\.data" outside the model's folder/));
  // links that stay inside the folder are fine
  const c = await folder("link-inside");
  await mkdir(join(c, "store"));
  for (const f of ["m.onnx", "m.seq.onnx"]) await copyFile(join(cases.dir, "ext", f), join(c, f));
  await copyFile(join(cases.dir, "ext", "m.onnx.data"), join(c, "store", "m.onnx.data"));
  await symlink(join("store", "m.onnx.data"), join(c, "m.onnx.data"));
  const { params, tokens } = cases.generations[0];
  assert.deepEqual(await tokensOf((await Session.create(join(c, "m.onnx"))).generateTokens(cases.prompt, { ...params, maxNewTokens: 20 })), tokens.slice(0, 20));
  // a Constant node whose value lives in "../attr.bin" (was: not seen by the scan; onnxruntime's own refusal)
  const bytes = await readFile(join(cases.dir, "m.onnx"));
  const parts = [];
  for (let pos = 0; pos < bytes.length;) {
    const start = pos;
    let key, n;
    [key, pos] = readVarint(bytes, pos);
    if ((key & 7) === 0) { pos = readVarint(bytes, pos)[1]; parts.push(bytes.subarray(start, pos)); continue; } // ir_version
    [n, pos] = readVarint(bytes, pos);
    parts.push(key >> 3 === 7 ? pb(7, cat(bytes.subarray(pos, pos + n), pb(1, constantNode("../attr.bin")))) : bytes.subarray(start, pos + n));
    pos += n;
  }
  const d = await folder("attr-external");
  await writeFile(join(d, "m.onnx"), Buffer.concat(parts));
  await assert.rejects(Session.create(join(d, "m.onnx"), { graphs: ["step"] }), userError(/m\.onnx: names a weights file "\.\.\/attr\.bin" outside the model's folder/));
});

test("npz: a deflated member is never inflated past its declared size, nor past what a state can hold", async () => {
  const { deflateRawSync } = await import("node:zlib");
  /** A one-member .npz whose member is deflated from `inflated` bytes, declaring `declared` bytes. */
  const deflatedNpz = (inflated, declared) => {
    const good = saveNpz({ s: { dtype: "float32", shape: [1, 4], data: new Float32Array(4) } });
    const dv = new DataView(good.buffer), nlen = dv.getUint16(26, true), blen = dv.getUint32(18, true);
    const plain = new Uint8Array(inflated ?? blen);
    declared ??= blen;
    plain.set(good.subarray(30 + nlen, 30 + nlen + blen));
    const comp = deflateRawSync(plain);
    const local = good.slice(0, 30 + nlen), lv = new DataView(local.buffer);
    lv.setUint16(8, 8, true); lv.setUint32(18, comp.length, true); lv.setUint32(22, declared, true);
    const cen = good.slice(30 + nlen + blen), cv = new DataView(cen.buffer);
    cv.setUint16(10, 8, true); cv.setUint32(20, comp.length, true); cv.setUint32(24, declared, true);
    cv.setUint32(16 + 46 + nlen, local.length + comp.length, true); // the end record's directory offset
    return Buffer.concat([local, comp, cen]);
  };
  const bomb = deflatedNpz(200 << 20, 96);
  globalThis.gc?.();
  const before = process.memoryUsage().arrayBuffers;
  // 200 KB of file, 200 MB inflated, 96 bytes declared (was: all 200 MB inflated, then "truncated")
  await assert.rejects(loadNpz(bomb, "bomb.npz"), userError(/^bomb\.npz: s\.npy: inflates past its declared size of 96 bytes/));
  assert.ok(process.memoryUsage().arrayBuffers - before < 64 << 20);
  // honest but larger than any state of the model can be: refused before inflating (was: inflated, then refused)
  const fake = Object.assign(Object.create(Session.prototype), {
    manifest: { export_id: "", state: [{ name: "s", output: "s_out", shape: ["batch", 4], dtype: "float32", init: 0 }] },
  });
  await assert.rejects(fake.loadState(deflatedNpz(100 << 20, 100 << 20)), userError(/s\.npy: declares 104857600 bytes, more than a state tensor of this model can hold/));
  // a small deflated state (numpy.savez_compressed writes these) still loads
  const ok = await loadNpz(deflatedNpz(null, null), "ok.npz");
  assert.deepEqual(ok.s.shape, [1, 4]);
});
