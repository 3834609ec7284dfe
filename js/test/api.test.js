// API parity with the Python runtime (runtime/session.py) on the answers tests/edge/conftest.py
// and tests/edge/test_node.py write (_api_case: api.json): a generation's own state, prefillMany, an initial state, a model without a
// tokenizer. Skips without RWKV_EDGE_FIXTURES.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { Session, RuntimeUserError } from "../src/node.js";

const dir = process.env.RWKV_EDGE_FIXTURES;
const api = dir ? JSON.parse(await readFile(join(dir, "api.json"), "utf8")) : null;
const opts = { skip: dir ? false : "RWKV_EDGE_FIXTURES is not set (run through pytest tests/edge)" };
const userError = (re) => (e) => e instanceof RuntimeUserError && re.test(e.message);

function maxDiff(a, b) {
  assert.equal(a.length, b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}
const textOf = async (gen) => { let t = ""; for await (const p of gen) t += p; return t; };
const prompt = () => new TextDecoder().decode(Uint8Array.from(api.many_prompts[1]));

test("generate: the iterator carries its own state once it ends; continuing from it gives Python's logits", opts, async () => {
  const s = await Session.create(api.model);
  const gen = s.generate(prompt(), { temperature: 0, maxNewTokens: 12 });
  assert.equal(gen.state, null); // not before it ends
  assert.equal(await textOf(gen), api.generated_text);
  const r = await s.step([api.continue_token], gen.state);
  assert.ok(maxDiff(r.logits[0], api.continue_logits) <= 1e-5, "continuation logits");
  // generateTokens too
  const ids = s.generateTokens(api.many_prompts[1], { temperature: 0, maxNewTokens: 12 });
  for await (const _ of ids) { /* drain */ }
  assert.ok(maxDiff((await s.step([api.continue_token], ids.state)).logits[0], api.continue_logits) <= 1e-5);
});

test("generate: two overlapping generations each keep their own state (was: session.lastState, the longer one's)", opts, async () => {
  const s = await Session.create(api.model);
  const short = s.generate(prompt(), { temperature: 0, maxNewTokens: 12 });
  const long = s.generate(prompt(), { temperature: 0, maxNewTokens: 30 });
  await Promise.all([textOf(long), textOf(short)]);
  assert.ok(maxDiff((await s.step([api.continue_token], short.state)).logits[0], api.continue_logits) <= 1e-5);
  const longer = await s.step([api.continue_token], long.state);
  assert.ok(maxDiff(longer.logits[0], api.continue_logits) > 1e-3, "the long run's state is another state");
});

test("generate: breaking out early still sets the state (the tokens fed so far); a state passed in is not written", opts, async () => {
  const s = await Session.create(api.model);
  const start = (await s.prefill([65, 66])).state;
  const before = await start.toArrays();
  const gen = s.generate(prompt(), { temperature: 0, maxNewTokens: 50, state: start });
  for await (const _ of gen) break;
  assert.ok(gen.state && gen.state !== start);
  assert.deepEqual(await start.toArrays(), before);
});

test("prefillMany: prompts of different lengths give Python's prefill_many logits and state", opts, async () => {
  const s = await Session.create(api.model);
  const r = await s.prefillMany(api.many_prompts);
  api.many_logits.forEach((want, i) => assert.ok(maxDiff(r.logits[i], want) <= 1e-5, `prompt ${i}`));
  const want = await (await s.loadState(api.many_state)).toArrays();
  const got = await r.state.toArrays();
  for (const k of Object.keys(want)) assert.ok(maxDiff(got[k].data, want[k].data) <= 1e-5, k);
  // each row equals that prompt prefilled alone
  for (const [i, p] of api.many_prompts.entries()) assert.ok(maxDiff((await s.prefill(p)).logits[0], r.logits[i]) <= 1e-5);
  await assert.rejects(s.prefillMany([[1], []]), userError(/at least one token/));
  await assert.rejects(s.prefillMany([]), userError(/at least one prompt/));
  await assert.rejects(s.prefillMany([[1], [2]], s.newState(3)), userError(/batch of 3, but 2 prompts/));
  await assert.rejects(s.prefillMany([[1], [999]]), userError(/outside \[0, 256\)/));
  // more prompts than a batch may hold: one clear error, not a RangeError from spreading 200,000 arguments
  const many = Array.from({ length: 200000 }, () => [1]);
  await assert.rejects(s.prefillMany(many), userError(/at most 65536 prompts/));
  await assert.rejects(s.generateBatch(many), userError(/at most 65536 prompts/));
});

test("initial state: the option and setInitialState start newState there, as Python's set_initial_state", opts, async () => {
  const s = await Session.create(api.model, { initialState: api.initial_state });
  assert.ok(maxDiff((await s.prefill(api.initial_prompt)).logits[0], api.initial_logits) <= 1e-5);
  const plain = await Session.create(api.model);
  const fresh = (await plain.prefill(api.initial_prompt)).logits[0];
  assert.ok(maxDiff(fresh, api.initial_logits) > 1e-3);
  await plain.setInitialState(await readFile(api.initial_state)); // bytes
  assert.ok(maxDiff((await plain.prefill(api.initial_prompt)).logits[0], api.initial_logits) <= 1e-5);
  await plain.setInitialState(null); // back to the export's own start
  assert.ok(maxDiff((await plain.prefill(api.initial_prompt)).logits[0], fresh) <= 1e-6);
  await plain.setInitialState(await plain.loadState(api.initial_state)); // a State
  assert.ok(maxDiff((await plain.prefill(api.initial_prompt)).logits[0], api.initial_logits) <= 1e-5);
  await assert.rejects(plain.setInitialState(plain.newState(2)), userError(/batch 1/));
  await assert.rejects(plain.setInitialState(42), userError(/an initial state must be/));
});

test("a model exported with --tokenizer none: generate refuses as Python does; token ids still run", opts, async () => {
  const s = await Session.create(api.no_tokenizer);
  for (const p of ["Hello", [65, 66]]) {
    assert.throws(() => s.generate(p, { maxNewTokens: 3 }), userError(/no tokenizer \(it was exported with --tokenizer none\)/)); // was: "65 66 " text
  }
  const ids = [];
  for await (const t of s.generateTokens([65, 66], { temperature: 0, maxNewTokens: 3 })) ids.push(t);
  assert.equal(ids.length, 3);
});
