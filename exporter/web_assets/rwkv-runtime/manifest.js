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
const isObject = (x) => !!x && typeof x === "object" && !Array.isArray(x);
const isName = (x) => typeof x === "string" && x !== "";
export const MAX_VOCAB = 1 << 24;
export const GRAPH_KINDS = ["step", "sequence"];

/** A file name in the model's own folder (as runtime/artifact.py plain_file_name): a companion or
 *  weights file named "../x", "/abs", "sub/x" or "https://..." would be read from somewhere else. */
export function plainFileName(name) {
  return typeof name === "string" && name !== "" && name !== "." && name !== ".." && !/[/\\:\0]/.test(name) &&
    name.length < 256;
}

// field -> [check, description], as runtime/artifact.py _FIELDS: a field that is present has this type
const FIELDS = {
  architecture: [isName, "a non-empty string"],
  n_layer: [(v) => isInt(v) && v >= 1, "an integer >= 1"],
  n_embd: [(v) => isInt(v) && v >= 1, "an integer >= 1"],
  vocab_size: [(v) => isInt(v) && v >= 1 && v <= MAX_VOCAB, "an integer in [1, 2^24]"],
  graph: [(v) => GRAPH_KINDS.includes(v), '"step" or "sequence"'],
  precision: [(v) => typeof v === "string", "a string"],
  opset: [Number.isInteger, "an integer"],
  wkv: [(v) => typeof v === "string", "a string"],
  tokenizer: [(v) => isObject(v) && typeof (v.kind ?? "none") === "string", 'an object with a string "kind"'],
  tokens_input: [isName, "a non-empty string"],
  logits_output: [isName, "a non-empty string"],
  state: [Array.isArray, "a list"],
  dims: [isObject, "an object"],
  options: [isObject, "an object"],
  companions: [isObject, "an object"],
  source: [isObject, "an object"],
  initial_state: [(v) => v === "" || v === "embedded", '"" or "embedded"'],
  export_id: [(v) => typeof v === "string" && v.length <= 256, "a string"],
  exporter_version: [(v) => typeof v === "string", "a string"],
};
const REQUIRED = ["architecture", "n_layer", "n_embd", "vocab_size", "state"];

/**
 * Parse and check a manifest (JSON text from the model's metadata), as runtime/artifact.py
 * parse_manifest: required fields, every field's type and range, state specs, distinct tensor names,
 * companions as plain file names. Unknown keys are ignored (newer exporters may add some).
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
    throw new RuntimeUserError(`${where}: unsupported manifest format version ${JSON.stringify(m?.format_version)?.slice(0, 20)} ` +
      `(this runtime reads version ${FORMAT_VERSION}); re-export the model`);
  }
  const bad = (what) => { throw new RuntimeUserError(`${where}: invalid manifest: ${what}; re-export the model`); };
  for (const k of REQUIRED) if (!(k in m)) bad(`missing field ${k}`);
  for (const [k, [ok, what]] of Object.entries(FIELDS)) {
    if (k in m && !ok(m[k])) bad(k === "state" ? "state must be a non-empty list" : `${k} must be ${what}`);
  }
  m.graph ??= "step";
  m.tokens_input ??= "tokens";
  m.logits_output ??= "logits";
  m.tokenizer ??= { kind: "bytes" };
  m.companions ??= {};
  m.options ??= {};
  m.export_id ??= "";
  m.initial_state ??= "";
  if (m.state.length === 0) bad("state must be a non-empty list");
  m.state.forEach((s, i) => {
    if (!isObject(s) || !isName(s.name) || !isName(s.output)) bad(`state[${i}] needs a name and an output (non-empty strings)`);
    if (!Array.isArray(s.shape) || s.shape[0] !== BATCH || !s.shape.slice(1).every((d) => isInt(d) && d >= 1 && d <= MAX_VOCAB)) {
      bad(`state ${s.name}: shape must be ["batch", positive sizes...], not ${JSON.stringify(s.shape)?.slice(0, 60)}`);
    }
    s.dtype ??= "float32";
    if (!DTYPES.has(s.dtype)) bad(`state ${s.name}: dtype ${String(s.dtype).slice(0, 30)} is not supported (float32, float16)`);
    s.init ??= 0;
    // JSON.parse reads 1e999 as Infinity: a fill value must be finite (Python refuses it too)
    if (typeof s.init !== "number" || !Number.isFinite(s.init)) bad(`state ${s.name}: init must be a finite number`);
    if (("layer" in s && !Number.isInteger(s.layer)) || ("doc" in s && typeof s.doc !== "string")) {
      bad(`state ${s.name}: layer must be an integer and doc a string`);
    }
  });
  // one name for two tensors would feed one tensor twice or read logits from a state output
  const names = [...m.state.flatMap((s) => [s.name, s.output]), m.tokens_input, m.logits_output];
  if (new Set(names).size !== names.length) bad("state, token and logits names must all be distinct");
  for (const [kind, name] of Object.entries(m.companions)) {
    if (!GRAPH_KINDS.includes(kind)) bad(`unknown companion kind ${JSON.stringify(kind.slice(0, 30))}`);
    if (!plainFileName(name)) bad(`companion ${kind} must be a plain file name in the model's folder, not ${JSON.stringify(name)?.slice(0, 60)}`);
  }
  return m;
}

/** Concrete shape of a state tensor for a batch size. */
export function concreteShape(spec, batch) {
  return spec.shape.map((d) => (d === BATCH ? batch : d));
}

/**
 * Check that a companion graph (e.g. the sequence graph) belongs to the same export as the main one.
 * @param {object} main @param {object} other @param {string} where @param {string} [kind] the kind it is named as
 */
export function checkCompanion(main, other, where, kind = null) {
  if (kind && other.graph !== kind) {
    throw new RuntimeUserError(`${where}: named as the ${kind} graph of this export but is a ${other.graph} graph; re-export the model`);
  }
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
