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
}

export interface NamedArray { dtype: string; shape: number[]; data: ArrayBufferView | string }

export declare class State {
  readonly batch: number;
  /** ort Tensors by state input name ("gpu-buffer" tensors on WebGPU) */
  readonly values: Record<string, unknown>;
  toArrays(): Promise<Record<string, NamedArray>>;
  clone(): Promise<State>;
  /** .npz bytes, as Python's State.save writes */
  save(): Promise<Uint8Array>;
  dispose(): void;
}

export interface GenerationStats { promptTokens: number; newTokens: number; prefillMs: number; decodeMs: number; tokensPerSecond: number }

export interface StepResult { logits: Float32Array[]; state: State }

export declare class Session {
  static create(source: string, options?: SessionOptions): Promise<Session>;
  readonly manifest: Manifest;
  readonly vocabSize: number;
  readonly graphs: string[];
  stats: GenerationStats;
  newState(batch?: number): State;
  stateFromArrays(arrays: Record<string, NamedArray>): State;
  saveState(state: State): Promise<Uint8Array>;
  /** Node only: write .npz atomically */
  saveStateFile(state: State, path: string): Promise<void>;
  loadState(input: Uint8Array | string): Promise<State>;
  /** one token per sequence; consumes `state` */
  step(tokens: (number | bigint)[] | number | bigint, state?: State): Promise<StepResult>;
  /** prompts of one length; consumes `state` */
  prefill(tokens: number[] | number[][], state?: State, chunkSize?: number): Promise<StepResult>;
  generateTokens(promptTokens: number[], params?: GenerateParams): AsyncGenerator<number>;
  /** Each call has its own statistics (`.stats`); `session.stats` is the last started call's. */
  generate(prompt: string | number[], params?: GenerateParams): AsyncGenerator<string> & { stats: GenerationStats };
  encode(text: string): Promise<number[]>;
  decode(ids: number[]): Promise<string>;
  release(): Promise<void>;
}

export declare class RuntimeUserError extends Error {}
export declare class Sampler { constructor(params?: Partial<SamplingParams>, vocabSize?: number | null); sample(logits: ArrayLike<number>): number }
export declare class NumpyRandom { constructor(seed?: number | bigint | null); random(): number; choice(probs: ArrayLike<number>): number }
export declare class WorldTokenizer { constructor(vocabText: string); encode(text: string): number[]; decode(ids: number[]): string }
export declare class ByteTokenizer { encode(text: string): number[]; decode(ids: number[]): string }
export declare class HFTokenizer { static fromJSON(json: string): Promise<HFTokenizer>; encode(text: string): number[]; decode(ids: number[]): string }
export declare function parseManifest(text: string, where?: string): Manifest;
export declare function scanModel(bytes: Uint8Array): { metadata: Record<string, string>; externalData: string[] };
export declare function saveNpz(arrays: Record<string, NamedArray>): Uint8Array;
export declare function loadNpz(bytes: Uint8Array | ArrayBuffer): Promise<Record<string, NamedArray>>;
