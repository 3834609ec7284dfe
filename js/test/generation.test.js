// The generation core (src/generation.js, the mirror of runtime/generation.py): text streams, stop
// strings and logprobs on their own, then on the default model against the Python core's answers
// (tests/edge/test_js_generation.py writes them and sets RWKV_GEN_DIR): logprobs and stop strings as
// Python's, a batch of prompts giving each row its tokens generated alone, one failing row ending alone.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { Session, RuntimeUserError, Sampler, ByteTokenizer, Batch, Row, TextStream, tokenLogprob } from "../src/node.js";

const dir = process.env.RWKV_GEN_DIR;
const gen = dir ? JSON.parse(await readFile(`${dir}/gen.json`, "utf8")) : null;
const withModel = { skip: dir ? false : "RWKV_GEN_DIR is not set (run through pytest tests/edge/test_js_generation.py)" };
const userError = (re) => (e) => e instanceof RuntimeUserError && re.test(e.message);
const utf8 = (s) => Array.from(new TextEncoder().encode(s));

// -- no model -------------------------------------------------------------------------------------
test("TextStream: a split character is held, a stop string split over tokens ends the text before it", () => {
  const ts = new TextStream(new ByteTokenizer(), ["\nUser:"]);
  const got = utf8("hé\nUs").map((t) => ts.push(t)[0]);
  assert.equal(got.join(""), "hé");
  assert.equal(got[1], ""); // the first byte of é
  assert.equal(ts.push(101)[0], "");
  assert.equal(ts.push(114)[0], "");
  assert.deepEqual(ts.push(58), ["", null, true]);
});

test("TextStream: logprob entries come with the text they complete, offsets into the delivered text", () => {
  const ts = new TextStream(new ByteTokenizer(), ["!!"], true);
  const e = (t) => ({ token: t, logprob: -1, top: [], start: null, end: null });
  const out = [];
  let text = "";
  for (const t of utf8("aé!b!!c")) {
    const [piece, lps, stopped] = ts.push(t, e(t));
    text += piece;
    out.push(...lps);
    if (stopped) break;
  }
  assert.equal(text, "aé!b");
  // é's two bytes share its one character; the held "!" (a possible stop start) is delivered with "b"
  assert.deepEqual(out.map((x) => [x.token, text.slice(x.start, x.end)]), [[97, "a"], [0xc3, "é"], [0xa9, "é"], [33, "!"], [98, "b"]]);
});

test("tokenLogprob: log-softmax in float64, the top k most likely first, ties by lower id", () => {
  const logits = Float32Array.from([1, 3, 3, -2, 0.5, 3]);
  const z = Math.log(logits.reduce((s, v) => s + Math.exp(v), 0));
  const e = tokenLogprob(logits, 4, 4);
  assert.ok(Math.abs(e.logprob - (0.5 - z)) < 1e-12);
  assert.deepEqual(e.top.map(([t]) => t), [1, 2, 5, 0]);
  for (const [t, lp] of e.top) assert.ok(Math.abs(lp - (logits[t] - z)) < 1e-12);
  assert.equal(tokenLogprob(logits, 0, 0).top.length, 0);
  assert.equal(tokenLogprob(logits, 0, 100).top.length, 6);
});

test("Row.accept: a stop id ends the row with \"stop\" (not one of its tokens); the limit with \"length\"", () => {
  const r = new Row(new Sampler({ temperature: 0, stop: [7] }, 10), { maxNewTokens: 2 });
  r.logits = Float32Array.from([0, 0, 5, 0, 0, 0, 0, 0, 0, 0]);
  assert.equal(r.pick(), 2);
  assert.equal(r.accept(2).reason, null);
  const stop = r.accept(7);
  assert.deepEqual([stop.reason, stop.appended, r.tokens], ["stop", false, [2]]);
  const r2 = new Row(new Sampler({}, 10), { maxNewTokens: 2 });
  r2.accept(1);
  assert.equal(r2.accept(3).reason, "length");
  r.logits = Float32Array.from([0, NaN, 5, 0, 0, 0, 0, 0, 0, 0]); // a damaged row: refused, as numpy's argmax picks the NaN
  assert.throws(() => r.pick(), userError(/NaN or inf/));
});

// -- the default model, against the Python core -----------------------------------------------------
const maxDiff = (a, b) => a.reduce((m, v, i) => Math.max(m, Math.abs(v - b[i])), 0);
async function collect(it) { let t = ""; for await (const p of it) t += p; return t; }

test("generate: stop strings and logprobs equal the Python core's (text, reason, tokens, top alternatives)", withModel, async () => {
  const s = await Session.create(gen.model);
  for (const c of gen.cases) {
    const it = s.generate(gen.prompt, { ...c.params, maxNewTokens: c.max, stopStrings: c.stops, logprobs: c.k });
    const text = await collect(it);
    const what = JSON.stringify(c.params) + JSON.stringify(c.stops);
    assert.equal(text, c.text, what);
    assert.equal(it.finishReason, c.reason, what);
    assert.equal(it.logprobs.length, c.logprobs.length, what);
    it.logprobs.forEach((e, i) => {
      const want = c.logprobs[i];
      assert.equal(e.token, want.token);
      assert.ok(Math.abs(e.logprob - want.logprob) <= 1e-4, `${what} token ${i}: ${e.logprob} vs ${want.logprob}`);
      assert.deepEqual(e.top.map(([t]) => t), want.top.map(([t]) => t), `${what} token ${i} alternatives`);
      assert.ok(maxDiff(e.top.map(([, v]) => v), want.top.map(([, v]) => v)) <= 1e-4);
      assert.equal(text.slice(e.start, e.end), want.text, `${what} token ${i}'s text`);
    });
  }
  // the state after a stop string is the one of the tokens run (the whole reply's), as without one
  const c = gen.cases[0];
  const plain = s.generateTokens(gen.prompt, { ...c.params, maxNewTokens: c.tokens.length });
  for await (const _ of plain) { /* drain */ }
  const cut = s.generate(gen.prompt, { ...c.params, maxNewTokens: c.max, stopStrings: c.stops });
  await collect(cut);
  assert.ok(maxDiff((await s.step([65], cut.state)).logits[0], (await s.step([65], plain.state)).logits[0]) <= 1e-6);
  assert.throws(() => s.generate("x", { stopStrings: [3] }), userError(/stopStrings must be a string or an array of strings/));
  assert.throws(() => s.generate("x", { logprobs: -1 }), userError(/logprobs must be an integer >= 0/));
  await assert.rejects(collect(s.generateTokens([65], { stopStrings: ["a"] })), userError(/use generate/));
});

test("generateBatch: every row gives the tokens Python's generate_tokens gives it alone (same seed per row)", withModel, async () => {
  const s = await Session.create(gen.model);
  const b = gen.batch;
  const res = await s.generateBatch(b.prompts, b.params.map((p) => ({ ...p, maxNewTokens: b.max })));
  res.forEach((r, i) => {
    assert.deepEqual(r.tokens, b.tokens[i], `row ${i}`);
    assert.equal(r.finishReason, "length");
    assert.equal(r.text, new TextDecoder().decode(Uint8Array.from(b.tokens[i])));
  });
  // each row's state is its own: continuing from it = continuing that prompt generated alone
  for (const i of [0, 3]) {
    const alone = s.generateTokens(b.prompts[i], { ...b.params[i], maxNewTokens: b.max });
    for await (const _ of alone) { /* drain */ }
    assert.ok(maxDiff((await s.step([65], res[i].state)).logits[0], (await s.step([65], alone.state)).logits[0]) <= 1e-5);
  }
  // one settings object for all prompts (greedy), a per-row stop string, a row with nothing to generate
  const shared = await s.generateBatch(b.prompts.slice(0, 2), { temperature: 0, maxNewTokens: 10 });
  assert.deepEqual(shared[0].tokens, b.tokens[0].slice(0, 10));
  const text0 = new TextDecoder().decode(Uint8Array.from(b.tokens[0]));
  const mixed = await s.generateBatch([b.prompts[0], b.prompts[1]], [
    { ...b.params[0], maxNewTokens: b.max, stopStrings: [text0.slice(5, 8)] }, { ...b.params[1], maxNewTokens: 0 }]);
  assert.deepEqual([mixed[0].text, mixed[0].finishReason], [text0.slice(0, text0.indexOf(text0.slice(5, 8))), "stop"]);
  assert.deepEqual([mixed[1].tokens, mixed[1].finishReason, mixed[1].state.batch], [[], "length", 1]);
  await assert.rejects(s.generateBatch([]), userError(/non-empty array of prompts/));
  await assert.rejects(s.generateBatch([[1], [2]], [{}]), userError(/1 settings for 2 prompts/));
  await assert.rejects(s.generateBatch([[1], [999]]), userError(/outside \[0, 256\)/));
});

test("generateBatch: a row whose sampler fails ends alone with its error; the others give their tokens", withModel, async () => {
  const s = await Session.create(gen.model);
  const b = gen.batch;
  // penalties of -1.7e308 overflow the repeated token's logit at the row's second token
  const boom = { temperature: 0, presence_penalty: -1.7e308, frequency_penalty: -1.7e308, maxNewTokens: b.max };
  const params = b.params.map((p) => ({ ...p, maxNewTokens: b.max }));
  const res = await s.generateBatch(b.prompts, [params[0], boom, params[2], params[3]]);
  assert.equal(res[1].finishReason, "error");
  assert.ok(userError(/overflowed the logits/)(res[1].error), String(res[1].error));
  assert.equal(res[1].tokens.length, 1);
  for (const i of [0, 2, 3]) assert.deepEqual(res[i].tokens, b.tokens[i], `row ${i}`);
  // generate (a batch of one) throws the row's error, as Python's does
  await assert.rejects(collect(s.generate(b.prompts[1], boom)), userError(/overflowed the logits/));
});

test("Batch: a model step failing for one row is retried row by row; only that row ends", withModel, async () => {
  const real = await Session.create(gen.model);
  const POISON = 255;
  // the same session, except that a run fed token 255 fails (as a damaged row's part of a step would)
  const s = Object.create(real);
  s._run = async function (kind, data, ...rest) {
    if (Array.from(data).some((t) => Number(t) === POISON)) throw new RuntimeUserError("injected model failure");
    return real._run.call(this, kind, data, ...rest);
  };
  const b = gen.batch;
  const rows = b.params.map((p, i) => new Row(new Sampler(i === 2 ? { temperature: 0, logit_bias: { [POISON]: 1000 } } : p, 256),
    { maxNewTokens: b.max, key: i }));
  const { logits, state } = await s.prefillMany(b.prompts);
  const batch = new Batch(s);
  await batch.add(rows, state, logits);
  const errors = [];
  while (batch.length) for (const o of await batch.step()) if (o.error) errors.push(o);
  assert.deepEqual(errors.map((o) => o.row.key), [2]);
  assert.ok(userError(/injected model failure/)(rows[2].error));
  assert.deepEqual(rows[2].tokens, [POISON]);
  for (const i of [0, 1, 3]) assert.deepEqual(rows[i].tokens, b.tokens[i], `row ${i}`);
  const before = await state.toArrays(); // the state the rows joined with was only read
  assert.deepEqual(await (await real.prefillMany(b.prompts)).state.toArrays(), before);
});
