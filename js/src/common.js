// What both entry points export besides Session.
export { RuntimeUserError } from "./errors.js";
export { State } from "./session.js";
export { parseManifest, FORMAT_VERSION, MANIFEST_KEY } from "./manifest.js";
export { scanModel } from "./onnx-meta.js";
export { loadNpz, saveNpz } from "./npz.js";
export { Sampler, DEFAULT_SAMPLING, checkParams } from "./sampling.js";
export { NumpyRandom } from "./random.js";
export { ByteTokenizer, WorldTokenizer, HFTokenizer, StreamDecoder, makeTokenizer } from "./tokenizers.js";
export { Batch, Row, Out, TextStream, StopMatcher, TokenLogprob, tokenLogprob } from "./generation.js";
