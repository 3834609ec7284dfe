// A typed app using the package's own names (rwkv-runtime resolves to ../../ through package.json
// "exports", as it would from node_modules): checked by `tsc -p test/types` (tests/edge/test_js_package.py).
// Each @ts-expect-error line is a misuse the declarations must refuse: tsc fails if one is accepted.
import { Session, State, RuntimeUserError, type Generation, type GenerationStats, type BatchResult, type FinishReason,
  type TokenLogprob } from "rwkv-runtime";
import { Session as WebSession } from "rwkv-runtime/web";

export async function chat(modelPath: string, saved?: Uint8Array): Promise<string> {
  const s = await Session.create(modelPath, { threads: 2, initialState: saved });
  let state: State | null = null;
  let reply = "";
  for (const user of ["Hello", "And then?"]) {
    const gen: Generation = s.generate(`User: ${user}\n\nAssistant:`, {
      temperature: 0.8, top_p: 0.9, seed: 1, maxNewTokens: 50, stop: [261], ...(state ? { state } : {}),
    });
    for await (const piece of gen) reply += piece;
    const stats: GenerationStats = gen.stats;
    console.log(stats.tokensPerSecond.toFixed(1));
    state = gen.state; // State | null
  }
  if (state) {
    const bytes: Uint8Array = await state.save();
    const again: State = await s.loadState(bytes);
    const { logits, state: next } = await s.step([65], again);
    const first: Float32Array = logits[0];
    console.log(first.length, next.batch);
    const many = await s.prefillMany([[1, 2, 3], [4]]);
    many.state.dispose();
  }
  const cut = s.generate("User: hi\n\nAssistant:", { temperature: 0, stopStrings: ["\n\nUser:"], logprobs: 3 });
  for await (const piece of cut) reply += piece;
  const reason: FinishReason | null = cut.finishReason;
  const lps: TokenLogprob[] | null = cut.logprobs;
  if (lps) for (const e of lps) console.log(e.token, e.logprob, e.top[0][0], reply.slice(e.start ?? 0, e.end ?? 0));
  const results: BatchResult[] = await s.generateBatch(["Hello", [72, 105]], [{ seed: 1 }, { temperature: 0, maxNewTokens: 5 }]);
  for (const r of results) console.log(r.text, r.tokens.length, r.finishReason, r.error?.message, reason);
  // @ts-expect-error: stop strings are strings (token ids that stop go in `stop`)
  s.generate("x", { stopStrings: [261] });
  const ids = s.generateTokens([72, 105], { temperature: 0 });
  for await (const id of ids) { const n: number = id; void n; }
  const after: State | null = ids.state;
  void after;
  await s.setInitialState(null);
  try {
    // @ts-expect-error: a state is a State, not a string
    await s.step([1], "state");
  } catch (e) {
    if (e instanceof RuntimeUserError) console.log(e.message);
  }
  // @ts-expect-error: generate yields text pieces, not numbers
  for await (const n of s.generate("x")) { const k: number = n; void k; }
  // @ts-expect-error: the setting is maxNewTokens
  s.generate("x", { max_new_tokens: 3 });
  // @ts-expect-error: a generation's state may be null until it ends
  const st: State = s.generate("x").state;
  void st;
  const web = await WebSession.create("./model.onnx", { backend: "webgpu", wasmPaths: "/ort/" });
  // @ts-expect-error: the backend is "wasm" or "webgpu"
  await WebSession.create("./model.onnx", { backend: "webgl" });
  await web.release();
  return reply;
}
