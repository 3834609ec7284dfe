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
export interface GenerateParams extends Partial<SamplingParams> { maxNewTokens?: number; state?: State }

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

/** One generate call: text pieces as produced, with this call's own `stats` and (once it ends) `state`. */
export interface Generation extends AsyncGenerator<string, void, undefined> {
  stats: GenerationStats;
  /** the state after the last token fed to the model (continue a chat from it); null until the iteration ends */
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
  encode(text: string): Promise<number[]>;
  decode(ids: (number | bigint)[]): Promise<string>;
  release(): Promise<void>;
}

export declare class RuntimeUserError extends Error {}
export declare class Sampler { constructor(params?: Partial<SamplingParams>, vocabSize?: number | null); sample(logits: ArrayLike<number>): number }
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
