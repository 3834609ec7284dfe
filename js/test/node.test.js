// The Node runtime against the Python runtime's answers on exports of the reference models
// (tests/edge/conftest.py writes them; RWKV_EDGE_FIXTURES names the folder). Skips without it.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFile, writeFile } from "node:fs/promises";
import { dirname, join } from "node:path";
import { Session, Sampler, NumpyRandom, WorldTokenizer, HFTokenizer, loadNpz, RuntimeUserError, scanModel } from "../src/node.js";

const dir = process.env.RWKV_EDGE_FIXTURES;
const cases = dir ? JSON.parse(await readFile(join(dir, "cases.json"), "utf8")) : null;
const opts = { skip: dir ? false : "RWKV_EDGE_FIXTURES is not set (run through pytest tests/edge)" };

function maxDiff(a, b) {
  assert.equal(a.length, b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

for (const c of cases?.models ?? [{ name: "model" }]) {
  test(`${c.name}: per-step logits equal the Python runtime's within 1e-5 (and BlinkDL's within 5e-5 where known)`, opts, async () => {
    const s = await Session.create(c.model);
    assert.deepEqual(s.graphs.sort(), ["sequence", "step"]);
    let state = s.newState(1), worst = 0, worstRef = 0;
    for (let i = 0; i < c.prompt.length; i++) {
      const r = await s.step([c.prompt[i]], state);
      worst = Math.max(worst, maxDiff(r.logits[0], c.step_logits[i]));
      if (c.blinkdl_logits) worstRef = Math.max(worstRef, maxDiff(r.logits[0], c.blinkdl_logits[i]));
      state = r.state;
    }
    assert.ok(worst <= 1e-5, `max |JS - Python| = ${worst}`);
    if (c.blinkdl_logits) assert.ok(worstRef <= 5e-5, `max |JS - BlinkDL| = ${worstRef}`);
    else assert.equal(s.manifest.initial_state, "embedded"); // the state-tuned export: its learned start state
  });

  test(`${c.name}: prefill (sequence graph, any chunking) equals stepping`, opts, async () => {
    const s = await Session.create(c.model);
    const last = c.step_logits[c.step_logits.length - 1];
    for (const chunk of [256, 7, 1]) {
      const r = await s.prefill(c.prompt, undefined, chunk);
      assert.ok(maxDiff(r.logits[0], last) <= 1e-5, `chunk ${chunk}`);
    }
    assert.ok(maxDiff((await s.prefill(c.prompt)).logits[0], c.prefill_logits) <= 1e-5);
    // batch of 2 identical prompts: both rows equal
    const r2 = await s.prefill([c.prompt, c.prompt]);
    assert.ok(maxDiff(r2.logits[1], last) <= 1e-5);
  });

  test(`${c.name}: greedy generation equals Python's token for token; seeded sampling too`, opts, async () => {
    const s = await Session.create(c.model);
    const got = [];
    for await (const t of s.generateTokens(c.prompt, { temperature: 0, maxNewTokens: 40 })) got.push(t);
    assert.deepEqual(got, c.greedy);
    for (const { params, tokens } of c.sampled) {
      const out = [];
      for await (const t of s.generateTokens(c.prompt, { ...params, maxNewTokens: 40 })) out.push(t);
      assert.deepEqual(out, tokens, JSON.stringify(params));
    }
    let text = "";
    const gen = s.generate(new TextDecoder().decode(Uint8Array.from(c.prompt)), { temperature: 0, maxNewTokens: 40 });
    for await (const piece of gen) text += piece;
    // Python's generate text (its StreamDecoder: a split UTF-8 character is held back up to 8 tokens)
    const texts = JSON.parse(await readFile(join(dir, "api.json"), "utf8")).greedy_texts;
    assert.equal(text, texts[c.name]);
    assert.equal(gen.stats.newTokens, 40);
  });

  test(`${c.name}: a state saved by Python loads in JS; JS's saved state is written for Python`, opts, async () => {
    const s = await Session.create(c.model);
    const st = await s.loadState(c.state_file);
    const r = await s.step([c.after_state_token], st);
    assert.ok(maxDiff(r.logits[0], c.after_state_logits) <= 1e-5);
    const mine = await s.prefill(c.prompt);
    const path = join(dir, `${c.name}.js-state.npz`);
    await s.saveStateFile(mine.state, path); // tests/edge checks it with numpy and the Python runtime
    const again = await s.loadState(path);
    assert.ok(maxDiff((await s.step([c.after_state_token], again)).logits[0], c.after_state_logits) <= 1e-5);
  });

  test(`${c.name}: state misuse and bad input are RuntimeUserErrors`, opts, async () => {
    const s = await Session.create(c.model);
    const st = s.newState(1);
    const r = await s.step([1], st);
    await assert.rejects(s.step([1, 2], r.state), /batch of 1/);
    await assert.rejects(s.step([s.vocabSize], s.newState(1)), RuntimeUserError);
    r.state.dispose();
    await assert.rejects(s.step([1], r.state), /disposed/);
    await assert.rejects(Session.create(join(dir, "nope.onnx")), /no such file/);
    await assert.rejects(Session.create(join(dir, "cases.json")), RuntimeUserError);
  });

  test(`${c.name}: a state passed in is never written (Python's rule): step, prefill and generate from one state agree`, opts, async () => {
    const s = await Session.create(c.model);
    const st = (await s.prefill(c.prompt)).state;
    const before = await st.toArrays();
    const a = await s.step([c.after_state_token], st);
    const b = await s.step([c.after_state_token], st); // was: "already advanced"
    assert.deepEqual(b.logits[0], a.logits[0]);
    assert.ok(maxDiff(a.logits[0], c.after_state_logits) <= 1e-5);
    await s.prefill([1, 2, 3], st, 2);
    const gen = [];
    for await (const t of s.generateTokens([c.after_state_token], { temperature: 0, maxNewTokens: 5, state: st })) gen.push(t);
    assert.deepEqual(await st.toArrays(), before); // every call read it, none wrote it
    assert.notEqual(a.state, st);
    // the new state of a step is its own: stepping it does not change `a`'s state either
    const aArrays = await a.state.toArrays();
    await s.step([5], a.state);
    assert.deepEqual(await a.state.toArrays(), aArrays);
  });

  test(`${c.name}: on Node a call's intermediate states are double-buffered (outputs written into the spare set)`, opts, async () => {
    const s = await Session.create(c.model);
    const name = s.manifest.state[0].name;
    const buffers = new Set();
    const run = s._run.bind(s);
    s._run = async (kind, data, dims, values, into) => {
      assert.ok(into, "a pre-allocated output set");
      const r = await run(kind, data, dims, values, into);
      assert.equal(r.values[name], into[name]); // ORT wrote into it
      buffers.add(into[name].data.buffer);
      return r;
    };
    const st = s.newState(1);
    const r = await s.prefill(c.prompt, st, 1); // one run per token
    assert.equal(buffers.size, 2); // two sets used in turn, not one per run
    assert.ok(!buffers.has(st.values[name].data.buffer)); // never the caller's state
    assert.ok(buffers.has(r.state.values[name].data.buffer));
  });
}

test("sampler: same tokens as Python's Sampler for the same logits and seed", opts, () => {
  const rows = cases.sampler.logits.map((r) => Float32Array.from(r));
  for (const { params, tokens } of cases.sampler.cases) {
    const smp = new Sampler(params);
    assert.deepEqual(rows.map((r) => smp.sample(r)), tokens, JSON.stringify(params));
  }
});

test("numpy default_rng: same doubles as Python for several seeds", opts, () => {
  for (const [seed, want] of Object.entries(cases.rng)) {
    const r = new NumpyRandom(BigInt(seed));
    assert.deepEqual(want.map(() => r.random()), want, `seed ${seed}`);
  }
});

test("World tokenizer: token for token equal to the Python one on a large mixed-script text", opts, async () => {
  const tok = new WorldTokenizer(await readFile(cases.world.vocab, "utf8"));
  assert.equal(tok.size, 65529);
  const text = await readFile(cases.world.text, "utf8");
  const ids = tok.encode(text);
  assert.equal(ids.length, cases.world.ids.length);
  assert.deepEqual(ids, cases.world.ids);
  assert.equal(tok.decode(ids), text);
  // the test vector of ../shared/reference/README.md
  assert.deepEqual(tok.encode("I'll 'd test блабла 以下は、]) -> <|endoftext|><|padding|> int"),
    [74, 5229, 274, 101, 32223, 5092, 27980, 2795, 27980, 33, 10399, 10258, 10139, 10079, 1682, 3463, 295, 125, 25258, 7588, 2318, 125, 790, 125, 49520, 125, 63, 21888]);
});

test("HF tokenizer.json (20B): ids and decoded text equal the Python `tokenizers` package's", { skip: !cases?.hf && (opts.skip || "no 20B_tokenizer.json") }, async () => {
  const tok = await HFTokenizer.fromJSON(await readFile(cases.hf.json, "utf8"));
  const text = await readFile(cases.hf.text, "utf8");
  assert.deepEqual(tok.encode(text), cases.hf.ids);
  assert.equal(tok.decode(cases.hf.ids), cases.hf.decoded);
});

test("fact: onnxruntime-web (WASM, in Node) returns pre-allocated CPU outputs unwritten — why web.js does not pass them", opts, async () => {
  // If this starts failing, ORT Web writes into `fetches` and the WASM path could reuse buffers too.
  const ortw = await import("onnxruntime-web");
  ortw.env.wasm.numThreads = 1;
  const c = cases.models[0];
  const bytes = await readFile(c.model);
  const externalData = await Promise.all(scanModel(bytes).externalData.map(async (path) => ({ path, data: await readFile(join(dirname(c.model), path)) })));
  const s = await ortw.InferenceSession.create(bytes, externalData.length ? { externalData } : {});
  const feeds = { tokens: new ortw.Tensor("int64", BigInt64Array.from([65n]), [1]) };
  const meta = (await Session.create(c.model)).manifest;
  const fetches = { logits: null };
  for (const st of meta.state) {
    const shape = st.shape.map((d) => (d === "batch" ? 1 : d)), n = shape.reduce((a, b) => a * b, 1);
    feeds[st.name] = new ortw.Tensor("float32", new Float32Array(n).fill(st.init), shape);
    fetches[st.output] = new ortw.Tensor("float32", new Float32Array(n), shape);
  }
  const out = await s.run(feeds, fetches);
  const fresh = await s.run(feeds);
  const o = meta.state[0].output;
  assert.ok(fresh[o].data.some((v) => v !== 0), "the state output is non-zero");
  assert.ok(out[o].data.every((v) => v === 0), "the pre-allocated output stayed unwritten");
});

test("a tokenizer.json embedded in the model is used through makeTokenizer (as Session does)", { skip: !cases?.hf && (opts.skip || "no 20B_tokenizer.json") }, async () => {
  const { makeTokenizer } = await import("../src/tokenizers.js");
  const tok = await makeTokenizer({ kind: "hf-json" }, { embeddedJSON: await readFile(cases.hf.json, "utf8") });
  assert.deepEqual(tok.encode(await readFile(cases.hf.text, "utf8")), cases.hf.ids);
  await assert.rejects(makeTokenizer({ kind: "hf-json" }, {}), /does not embed it/);
  await assert.rejects(makeTokenizer({ kind: "world" }, {}), /worldVocab/);
  await assert.rejects(makeTokenizer({ kind: "none" }, {}), /no tokenizer/);
});
