// Unit tests that need no model: .npz round trips, the protobuf metadata scan, manifest checks,
// numpy's random generator, the World vocabulary parser. Run: node --test test/
import { test } from "node:test";
import assert from "node:assert/strict";
import { loadNpz, saveNpz } from "../src/npz.js";
import { scanModel } from "../src/onnx-meta.js";
import { parseManifest, checkCompanion } from "../src/manifest.js";
import { NumpyRandom } from "../src/random.js";
import { parsePyLiteral, ByteTokenizer, StreamDecoder } from "../src/tokenizers.js";
import { Sampler, sampleLogprobs, pairwiseSum } from "../src/sampling.js";
import { RuntimeUserError } from "../src/errors.js";

test("npz: saveNpz -> loadNpz round trip keeps names, dtypes, shapes and values", async () => {
  const a = { dtype: "float32", shape: [2, 3], data: Float32Array.from([1, -2, 3.5, -1e30, 0, 7]) };
  const b = { dtype: "int64", shape: [4], data: BigInt64Array.from([1n, 2n, -3n, 4n]) };
  const back = await loadNpz(saveNpz({ "state.0.x": a, ids: b }));
  assert.deepEqual(Object.keys(back).sort(), ["ids", "state.0.x"]);
  assert.deepEqual(back["state.0.x"].shape, [2, 3]);
  assert.deepEqual(Array.from(back["state.0.x"].data), Array.from(a.data));
  assert.deepEqual(Array.from(back.ids.data), [1n, 2n, -3n, 4n]);
});

test("npz: garbage is a RuntimeUserError, not a crash", async () => {
  await assert.rejects(loadNpz(new Uint8Array(100)), RuntimeUserError);
});

function protoModel(entries) {
  // a hand-built ModelProto: ir_version = 1 (varint), then metadata_props entries (field 14)
  const enc = new TextEncoder();
  const ld = (field, bytes) => [field * 8 + 2, bytes.length, ...bytes];
  const out = [8, 9];
  for (const [k, v] of entries) out.push(...ld(14, [...ld(1, enc.encode(k)), ...ld(2, enc.encode(v))]));
  return Uint8Array.from(out);
}

test("onnx-meta: metadata_props are read from the bytes; truncation is an error", () => {
  const bytes = protoModel([["a", "1"], ["rwkv.manifest", "{}"]]);
  assert.deepEqual(scanModel(bytes).metadata, { a: "1", "rwkv.manifest": "{}" });
  assert.throws(() => scanModel(bytes.subarray(0, bytes.length - 2)), /not an ONNX model/);
});

const good = () => ({ format_version: 1, architecture: "rwkv4", n_layer: 1, n_embd: 4, vocab_size: 8, export_id: "abc",
  state: [{ name: "s", output: "s_out", shape: ["batch", 4], dtype: "float32", init: 0 }] });

test("manifest: format version, shapes and dtypes are checked", () => {
  assert.equal(parseManifest(JSON.stringify(good())).architecture, "rwkv4");
  assert.throws(() => parseManifest(JSON.stringify({ ...good(), format_version: 2 })), /format version 2/);
  assert.throws(() => parseManifest("{"), /not valid JSON/);
  const bad = good(); bad.state[0].shape = [4, "batch"];
  assert.throws(() => parseManifest(JSON.stringify(bad)), /shape must be/);
  const bad2 = good(); bad2.state[0].dtype = "int8";
  assert.throws(() => parseManifest(JSON.stringify(bad2)), /state\[0\]\.dtype must be float32 or float16, not int8/);
});

test("manifest: a companion of another export is refused", () => {
  const a = parseManifest(JSON.stringify(good()));
  const b = parseManifest(JSON.stringify({ ...good(), export_id: "other" }));
  assert.throws(() => checkCompanion(a, b, "m.seq.onnx"), /another export/);
  const c = parseManifest(JSON.stringify(good())); c.state[0].shape = ["batch", 5];
  assert.throws(() => checkCompanion(a, c, "m.seq.onnx"), /state tensors differ/);
  checkCompanion(a, parseManifest(JSON.stringify(good())), "m.seq.onnx");
});

test("python literals of the World vocabulary", () => {
  assert.deepEqual(Array.from(parsePyLiteral("'\\x00'")), [0]);
  assert.deepEqual(Array.from(parsePyLiteral("b'\\x80'")), [0x80]);
  assert.deepEqual(Array.from(parsePyLiteral("'é'")), [0xc3, 0xa9]);
  assert.deepEqual(Array.from(parsePyLiteral("\"'\"")), [39]);
  assert.deepEqual(Array.from(parsePyLiteral("'\\u00e9\\n'")), [0xc3, 0xa9, 10]);
});

test("numpy PCG64: a known first draw of default_rng(42)", () => {
  // numpy: np.random.default_rng(42).random() == 0.7739560485559633 (its documented doctest value)
  assert.equal(new NumpyRandom(42).random(), 0.7739560485559633);
});

test("StreamDecoder: the pieces joined equal one decode, invalid UTF-8 included (as Python's)", () => {
  const tok = new ByteTokenizer();
  const run = (ids) => { const d = new StreamDecoder(tok); let s = ""; for (const t of ids) s += d.push(t); return s + d.flush(); };
  const whole = (ids) => new TextDecoder().decode(Uint8Array.from(ids));
  // seven invalid bytes, then a two-byte character split across tokens: it was lost to U+FFFD at the 8-token cap
  const ids = [255, 255, 255, 255, 255, 255, 255, 0xde, 0x93, 0xc3, 0xc4];
  assert.equal(run(ids), whole(ids));
  assert.ok(run(ids).includes("\u0793"));
  let x = 7;
  for (let n = 0; n < 50; n++) {
    const r = [];
    for (let i = 0; i < 200; i++) { x = (x * 1103515245 + 12345) % 2147483648; r.push(x % 2 ? 0x80 + (x >> 8) % 128 : 0x20 + (x >> 8) % 95); }
    assert.equal(run(r), whole(r));
  }
  const d = new StreamDecoder(tok);
  assert.equal(d.push(0xe2), ""); assert.ok(d.pending);
  assert.equal(d.push(0x82), "");
  assert.equal(d.push(0xac), "\u20ac"); assert.ok(!d.pending);
});

test("constrained decoding options are one clear error naming what is missing (not an unknown setting)", () => {
  for (const k of ["constraint", "responseFormat", "regex", "grammar"]) {
    assert.throws(() => new Sampler({ [k]: {} }), (e) => e instanceof RuntimeUserError && e.message.includes("constrained decoding is not available") && e.message.includes(k));
  }
});

// the draw as ChatRWKV's order defines it, sorting the whole vocabulary (what sampleLogprobs did before
// it sorted only the nucleus's head): the independent statement of the semantics
function fullSortSample(logp, temperature, topP, topK, rng) {
  const probs = logp.map(Math.exp);
  const order = Array.from(logp.keys()).sort((a, b) => (logp[b] > logp[a]) - (logp[b] < logp[a]));
  let acc = 0;
  const cum = order.map((i) => (acc += probs[i]));
  const limit = Math.min(topP, cum[cum.length - 1]);
  let at = cum.findIndex((c) => c >= limit);
  if (at < 0) at = 0;
  const keep = topP >= 1 ? logp.map((v) => v > -Infinity) : logp.map((v) => v >= logp[order[at]]);
  if (topK > 0 && topK < logp.length) for (let j = topK; j < order.length; j++) keep[order[j]] = false;
  const scaled = logp.map((v, i) => (keep[i] ? v / temperature : -Infinity));
  const m = Math.max(...scaled.filter((v) => v > -Infinity));
  const q = scaled.map((v) => Math.exp(v - m));
  const s = pairwiseSum(q);
  return rng.choice(q.map((v) => v / s));
}

test("sampling: sorting only the nucleus's head draws what the full sort draws (as Python's test)", () => {
  const g = new NumpyRandom(7);
  for (let c = 0; c < 120; c++) {
    const V = [7, 1000, 65536][c % 3];
    const scale = [0.3, 3, 12][Math.floor(c / 3) % 3];
    const x = Array.from({ length: V }, () => g.random() * 2 - 1).map((u, i) => u * scale * (1 + (i % 7 === 0 ? 4 : 0)));
    if (c % 5 === 0) for (let i = 0; i < V; i++) x[i] = Math.round(x[i]); // ties at the cut
    if (c % 7 === 0) { for (let i = 1; i < V; i += 2) x[i] = -Infinity; x[0] = 1; } // masked tokens
    const m = Math.max(...x.filter((v) => v > -Infinity));
    const z = m + Math.log(pairwiseSum(x.map((v) => Math.exp(v - m))));
    const logp = x.map((v) => v - z);
    const T = [0.05, 1, 2][c % 3], P = [0, 0.3, 0.85, 0.999, 1][c % 5], K = [0, 1, 5, 300][c % 4];
    const got = sampleLogprobs(logp, T, P, K, new NumpyRandom(c));
    assert.equal(got, fullSortSample(logp, T, P, K, new NumpyRandom(c)), `case ${c}: V ${V} T ${T} top_p ${P} top_k ${K}`);
  }
});
