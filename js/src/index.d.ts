// Types of rwkv-runtime (the same for "rwkv-runtime" on Node and "rwkv-runtime/web" in browsers).

export interface StateSpec { name: string; output: string; shape: ("batch" | number)[]; dtype: "float32" | "float16"; init: number; layer?: number; doc?: string }

/** rwkv-export's manifest (runtime/manifest.py), read from the model's metadata. */
export interface Manifest {
  format_version: 1; architecture: string; n_layer: number; n_embd: number; vocab_size: number;
  graph: "step" | "sequence"; precision: string; tokenizer: { kind: "bytes" | "world" | "hf-json" | "none"; name?: string };
  tokens_input: string; logits_output: string; state: StateSpec[]; companions: Record<string, string>;
  export_id: string; initial_state: string; options: Record<string, unknown>; dims: Record<string, unknown>;
}

/** Python's SamplingParams, plus generation settings. */
export interface SamplingParams {
  temperature: number; top_p: number; top_k: number; presence_penalty: number; frequency_penalty: number;
  penalty_decay: number; seed: number | bigint | null; ban: number[]; stop: number[];
  /** token id (JSON's string key or a number) -> value added to its logit before sampling */
  logit_bias: Record<string, number> | Map<number, number> | null;
}
export interface GenerateParams extends Partial<SamplingParams> {
  maxNewTokens?: number;
  /** batch 1; read, never written */
  state?: State;
  /** generate only: the text ends before the first of these (Python's TextStream stops, the server's `stop`) */
  stopStrings?: string | string[];
  /** generate only: report each token's log-probability with this many alternatives (null: off) */
  logprobs?: number | null;
}

export interface SessionOptions {
  /** browser only: "wasm" (default) or "webgpu" (state kept in GPU buffers) */
  backend?: "wasm" | "webgpu";
  /** WASM threads (browser: needs cross-origin isolation) / intra-op threads (Node) */
  threads?: number;
  /** prompt chunk for the sequence graph (default 256) */
  prefillChunk?: number;
  /** which graphs to load (default both) */
  graphs?: ("step" | "sequence")[];
  /** path (Node) or URL (browser) of rwkv_vocab_v20230424.txt, for World-tokenizer models */
  worldVocab?: string;
  /** passed to InferenceSession.create */
  sessionOptions?: Record<string, unknown>;
  /** an onnxruntime module to use instead of importing onnxruntime-node / onnxruntime-web */
  ort?: unknown;
  /** browser only: where ORT Web's .wasm/.mjs files are served (ort.env.wasm.wasmPaths), e.g. "/ort/" */
  wasmPaths?: string | Record<string, string>;
  /** the state newState starts from (as setInitialState): .npz bytes, a path/URL, arrays or a State (batch 1) */
  initialState?: InitialState;
}

/** An initial state: .npz bytes, a path (Node) / URL (browser) of one, arrays by name, or a State; batch 1. */
export type InitialState = Uint8Array | ArrayBuffer | string | Record<string, NamedArray> | State;

export interface NamedArray { dtype: string; shape: number[]; data: ArrayBufferView | string }

/** A recurrent state. Never changed by a call it is passed to; every call returns a new one. */
export declare class State {
  readonly batch: number;
  /** ort Tensors by state input name ("gpu-buffer" tensors on WebGPU) */
  readonly values: Record<string, unknown>;
  toArrays(): Promise<Record<string, NamedArray>>;
  clone(): Promise<State>;
  /** .npz bytes, as Python's State.save writes */
  save(): Promise<Uint8Array>;
  /** free its GPU buffers now (WebGPU: ORT does not free them on garbage collection); unusable afterwards */
  dispose(): void;
}

export interface GenerationStats { promptTokens: number; newTokens: number; prefillMs: number; decodeMs: number; tokensPerSecond: number }

export interface StepResult { logits: Float32Array[]; state: State }

/** One generateTokens call: token ids as produced; `state` once it ends (finished, broken out of, failed). */
export interface TokenGeneration extends AsyncGenerator<number, void, undefined> {
  /** the state after the last token fed to the model; null until the iteration ends */
  state: State | null;
}

/** Why a row ended: a stop token or stop string, the maxNewTokens limit, its deadline, or its error. */
export type FinishReason = "stop" | "length" | "timeout" | "error";

/** One generated token's log-probability (Python's TokenLogprob): log_softmax of the model's logits,
 *  before temperature, top-p/top-k, penalties and bias. */
export interface TokenLogprob {
  token: number;
  logprob: number;
  /** the k most likely tokens of the position: [id, logprob], most likely first (ties: lower id first) */
  top: [number, number][];
  /** the characters it produced in the generated text: text.slice(start, end) (JS string indices) */
  start: number | null;
  end: number | null;
}

/** One generate call: text pieces as produced, with this call's own `stats` and (once it ends) `state`. */
export interface Generation extends AsyncGenerator<string, void, undefined> {
  stats: GenerationStats;
  /** the state after the last token fed to the model (continue a chat from it); null until the iteration ends */
  state: State | null;
  /** "stop" (a stop token or stop string) or "length" once it ends; null before (or when broken out of) */
  finishReason: FinishReason | null;
  /** with params.logprobs: the entries of the text delivered so far, in order; else null */
  logprobs: TokenLogprob[] | null;
}

/** One prompt's result from Session.generateBatch. */
export interface BatchResult {
  /** the delivered text (cut before a stop string); null for a model without a tokenizer */
  text: string | null;
  /** the tokens produced (a stop token excluded) */
  tokens: number[];
  finishReason: FinishReason;
  /** the failure that ended this row alone (finishReason "error"); null otherwise */
  error: Error | null;
  logprobs: TokenLogprob[] | null;
  /** the row's state after its last token (batch 1) */
  state: State | null;
}

export declare class Session {
  static create(source: string | URL, options?: SessionOptions): Promise<Session>;
  readonly manifest: Manifest;
  readonly vocabSize: number;
  readonly graphs: string[];
  /** @deprecated shared by the session: the state of the last generation to end; use Generation.state */
  lastState?: State;
  /** "webgpu" when state stays in GPU buffers, else "cpu" */
  readonly device: "cpu" | "webgpu";
  /** browser only: the backend chosen at create */
  readonly backend?: "wasm" | "webgpu";
  newState(batch?: number): State;
  /** make newState start from `initial` (batch 1); null: back to the export's own start state */
  setInitialState(initial: InitialState | null): Promise<void>;
  stateFromArrays(arrays: Record<string, NamedArray>): State;
  saveState(state: State): Promise<Uint8Array>;
  /** Node only: write .npz atomically */
  saveStateFile(state: State, path: string): Promise<void>;
  /** .npz bytes (Python's State.save files too) or a path (Node) / URL (browser) of them */
  loadState(input: Uint8Array | ArrayBuffer | string): Promise<State>;
  /** the model's tokenizer (refused for a --tokenizer none export) */
  tokenizer(): Promise<Tokenizer>;
  /** one token per sequence; `state` is read, never written; returns a new state */
  step(tokens: (number | bigint)[] | number | bigint, state?: State): Promise<StepResult>;
  /** prompts of one length; `state` is read, never written; returns a new state */
  prefill(tokens: (number | bigint)[] | (number | bigint)[][], state?: State, chunkSize?: number): Promise<StepResult>;
  /** prompts of different lengths as one batch (Python's prefill_many); `state` is read, never written */
  prefillMany(prompts: (number | bigint)[][], state?: State, chunkSize?: number): Promise<StepResult>;
  generateTokens(promptTokens: number[], params?: GenerateParams | null): TokenGeneration;
  /** Each call has its own statistics (`.stats`) and state (`.state`). */
  generate(prompt: string | number[], params?: GenerateParams | null): Generation;
  /** several prompts as one batch (a model step per token for all): each row its own settings (one object
   *  for all, or one per prompt), the tokens it would give alone; a failing row ends alone */
  generateBatch(prompts: (string | number[])[], params?: GenerateParams | GenerateParams[] | null): Promise<BatchResult[]>;
  encode(text: string): Promise<number[]>;
  decode(ids: (number | bigint)[]): Promise<string>;
  release(): Promise<void>;
}

export declare class RuntimeUserError extends Error {}

// -- the generation core (generation.js; Python's runtime/generation.py, part for part) ---------------
/** Stop strings across text pieces: push(piece) -> [text deliverable now, stopped]; release() at the end. */
export declare class StopMatcher {
  constructor(stops?: Iterable<string>);
  readonly stops: string[];
  readonly held: string;
  push(piece: string): [string, boolean];
  release(): string;
}
export declare function tokenLogprob(logits: ArrayLike<number>, token: number, k: number): TokenLogprob;
/** One row's text: tokens -> pieces (StreamDecoder), stop strings, logprob entries with the text they complete. */
export declare class TextStream {
  constructor(tokenizer: Tokenizer, stops?: Iterable<string>, logprobs?: boolean);
  push(token: number, entry?: TokenLogprob | null): [string, TokenLogprob[] | null, boolean];
  finish(): [string, TokenLogprob[] | null, boolean];
}
export interface RowOptions {
  maxNewTokens?: number | null; stopIds?: Iterable<number> | null; text?: TextStream | null; logprobs?: number | null;
  /** a performance.now() after which the row ends with "timeout" */
  deadline?: number | null; feedLast?: boolean; keepState?: boolean; key?: unknown;
}
/** One sequence in a Batch: its Sampler, limits, stop ids, optional TextStream. */
export declare class Row {
  constructor(sampler: Sampler, options?: RowOptions);
  readonly sampler: Sampler;
  key: unknown;
  readonly tokens: number[];
  reason: FinishReason | null;
  error: unknown;
  /** with keepState, once it left: its state (batch 1) */
  final: State | null;
  pick(): number;
  accept(token: number, now?: number): Out;
}
/** What one row produced in a step. */
export declare class Out {
  readonly row: Row; token: number | null; appended: boolean; text: string; logprobs: TokenLogprob[] | null;
  reason: FinishReason | null; error: unknown;
}
/** Rows decoded together on one batched state; a row's failure ends that row alone. Await each call in turn. */
export declare class Batch {
  constructor(session: Session);
  readonly rows: Row[];
  readonly length: number;
  /** rows join between steps; `state` (batch rows.length) is read, never written */
  add(rows: Row | Row[], state: State, logits: Float32Array | Float32Array[]): Promise<void>;
  remove(row: Row): Promise<void>;
  /** every row leaves now (keepState rows get the state of the tokens run so far) */
  close(): Promise<void>;
  sample(now?: number): Promise<Out[]>;
  advance(): Promise<Out[]>;
  step(now?: number): Promise<Out[]>;
}
export declare class Sampler { constructor(params?: Partial<SamplingParams>, vocabSize?: number | null); readonly params: SamplingParams; sample(logits: ArrayLike<number>): number }
export declare class NumpyRandom { constructor(seed?: number | bigint | null); random(): number; choice(probs: ArrayLike<number>): number }
export declare class WorldTokenizer { constructor(vocabText: string); encode(text: string): number[]; decode(ids: number[]): string }
export declare class ByteTokenizer { encode(text: string): number[]; decode(ids: number[]): string }
export declare class HFTokenizer { static fromJSON(json: string): Promise<HFTokenizer>; encode(text: string): number[]; decode(ids: number[]): string }
export type Tokenizer = ByteTokenizer | WorldTokenizer | HFTokenizer;
/** token ids -> text pieces, holding back a split UTF-8 character (up to 8 tokens) */
export declare class StreamDecoder { constructor(tokenizer: Tokenizer); push(token: number | bigint): string; flush(): string }
export declare function makeTokenizer(spec: { kind?: string }, sources?: { embeddedJSON?: string | null; worldVocab?: (() => Promise<string>) | null }): Promise<Tokenizer>;
export declare const DEFAULT_SAMPLING: SamplingParams;
export declare function checkParams(params: Partial<SamplingParams>, vocabSize?: number | null): SamplingParams;
export declare const FORMAT_VERSION: 1;
export declare const MANIFEST_KEY: "rwkv.manifest";
export declare function parseManifest(text: string, where?: string): Manifest;
export declare function scanModel(bytes: Uint8Array): { metadata: Record<string, string>; externalData: string[] };
export declare function saveNpz(arrays: Record<string, NamedArray>): Uint8Array;
export declare function loadNpz(bytes: Uint8Array | ArrayBuffer): Promise<Record<string, NamedArray>>;
