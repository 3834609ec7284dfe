// The manifest: rwkv-export's contract, written as JSON into the model's metadata (key
// "rwkv.manifest"); the runtime reads everything about a model from it. Mirrors runtime/manifest.py.
import { RuntimeUserError } from "./errors.js";

export const MANIFEST_KEY = "rwkv.manifest";
export const TOKENIZER_KEY = "rwkv.tokenizer_json";
export const INITIAL_STATE_KEY = "rwkv.initial_state";
export const FORMAT_VERSION = 1;
export const BATCH = "batch";
const DTYPES = new Set(["float32", "float16"]);

const isInt = (x) => Number.isInteger(x) && x >= 0;

/**
 * Parse and check a manifest (JSON text from the model's metadata).
 * @param {string} text
 * @param {string} where model name, for messages
 * @returns {import("./index.d.ts").Manifest}
 */
export function parseManifest(text, where = "model") {
  let m;
  try {
    m = JSON.parse(text);
  } catch (e) {
    throw new RuntimeUserError(`${where}: the rwkv manifest is not valid JSON (${e.message})`);
  }
  if (!m || typeof m !== "object" || m.format_version !== FORMAT_VERSION) {
    throw new RuntimeUserError(`${where}: unsupported manifest format version ${m && m.format_version} ` +
      `(this runtime reads version ${FORMAT_VERSION}); re-export the model`);
  }
  const bad = (what) => { throw new RuntimeUserError(`${where}: invalid manifest: ${what}`); };
  for (const k of ["n_layer", "n_embd", "vocab_size"]) if (!isInt(m[k]) || m[k] < 1) bad(`${k} must be a positive integer`);
  if (typeof m.architecture !== "string") bad("architecture must be a string");
  m.graph ??= "step";
  if (m.graph !== "step" && m.graph !== "sequence") bad(`graph must be "step" or "sequence", not ${JSON.stringify(m.graph)}`);
  m.tokens_input ??= "tokens";
  m.logits_output ??= "logits";
  m.tokenizer ??= { kind: "bytes" };
  m.companions ??= {};
  m.options ??= {};
  m.export_id ??= "";
  if (!Array.isArray(m.state) || m.state.length === 0) bad("state must be a non-empty list");
  const names = new Set();
  for (const s of m.state) {
    if (!s || typeof s.name !== "string" || typeof s.output !== "string") bad("each state entry needs name and output");
    if (names.has(s.name)) bad(`state ${s.name} listed twice`);
    names.add(s.name);
    if (!Array.isArray(s.shape) || s.shape[0] !== BATCH || !s.shape.slice(1).every(isInt)) {
      bad(`state ${s.name}: shape must be ["batch", sizes...], not ${JSON.stringify(s.shape)}`);
    }
    s.dtype ??= "float32";
    if (!DTYPES.has(s.dtype)) bad(`state ${s.name}: dtype ${s.dtype} is not supported (float32, float16)`);
    s.init ??= 0;
    if (typeof s.init !== "number") bad(`state ${s.name}: init must be a number`);
  }
  return m;
}

/** Concrete shape of a state tensor for a batch size. */
export function concreteShape(spec, batch) {
  return spec.shape.map((d) => (d === BATCH ? batch : d));
}

/**
 * Check that a companion graph (e.g. the sequence graph) belongs to the same export as the main one.
 * @param {object} main @param {object} other @param {string} where
 */
export function checkCompanion(main, other, where) {
  if ((main.export_id || other.export_id) && main.export_id !== other.export_id) {
    throw new RuntimeUserError(`${where} belongs to another export (export_id ${other.export_id || "none"}, ` +
      `expected ${main.export_id || "none"}); export the graphs together`);
  }
  for (const k of ["architecture", "n_layer", "n_embd", "vocab_size", "tokens_input", "logits_output"]) {
    if (main[k] !== other[k]) throw new RuntimeUserError(`${where}: ${k} ${other[k]} differs from the main graph's ${main[k]}`);
  }
  const key = (s) => JSON.stringify([s.name, s.output, s.shape, s.dtype]);
  if (main.state.map(key).join() !== other.state.map(key).join()) {
    throw new RuntimeUserError(`${where}: its state tensors differ from the main graph's`);
  }
}
