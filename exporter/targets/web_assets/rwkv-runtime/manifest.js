// The manifest: rwkv-export's contract, written as JSON into the model's metadata (key
// "rwkv.manifest"); the runtime reads everything about a model from it. Mirrors runtime/manifest.py.
import { RuntimeUserError } from "./errors.js";
// manifest.schema.json (emitted from runtime/manifest.py's field table) as a module: a JSON import
// would need import attributes, which Node 20 still flags as experimental and not every bundler reads.
// scripts/sync_web_assets.py writes it from the .json; tests/edge checks the two are equal.
import MANIFEST_SCHEMA from "./manifest.schema.js";

export { MANIFEST_SCHEMA };

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
  // messages name the field as Python's parse_manifest does (state[i].field, companions): the shared
  // conformance fixtures (tests/conformance) hold both runtimes to it
  m.state.forEach((s, i) => {
    if (!isObject(s)) bad(`state[${i}] is not an object`);
    if (!isName(s.name)) bad(`state[${i}].name must be a non-empty string`);
    if (!isName(s.output)) bad(`state[${i}].output must be a non-empty string`);
    if (!Array.isArray(s.shape) || s.shape.length < 1 || s.shape[0] !== BATCH || !s.shape.slice(1).every((d) => isInt(d) && d >= 1 && d <= MAX_VOCAB)) {
      bad(`state[${i}].shape must be ["batch", sizes in [1, 2^24]...], not ${JSON.stringify(s.shape)?.slice(0, 60)}`);
    }
    s.dtype ??= "float32";
    if (!DTYPES.has(s.dtype)) bad(`state[${i}].dtype must be float32 or float16, not ${String(s.dtype).slice(0, 30)}`);
    s.init ??= 0;
    // JSON.parse reads 1e999 as Infinity: a fill value must be finite (Python refuses it too)
    if (typeof s.init !== "number" || !Number.isFinite(s.init)) bad(`state[${i}].init must be a finite number`);
    if ("layer" in s && !Number.isInteger(s.layer)) bad(`state[${i}].layer must be an integer`);
    if ("doc" in s && typeof s.doc !== "string") bad(`state[${i}].doc must be a string`);
  });
  // one name for two tensors would feed one tensor twice or read logits from a state output
  const names = [...m.state.flatMap((s) => [s.name, s.output]), m.tokens_input, m.logits_output];
  if (new Set(names).size !== names.length) bad("state, token and logits names must all be distinct");
  for (const [kind, name] of Object.entries(m.companions)) {
    if (!GRAPH_KINDS.includes(kind)) bad(`companions: unknown kind ${JSON.stringify(kind.slice(0, 30))}`);
    if (!plainFileName(name)) bad(`companions.${kind} must be a plain file name in the model's folder, not ${JSON.stringify(name)?.slice(0, 60)}`);
  }
  // the checks above name the field as Python does; the shared schema is the contract of record, so
  // anything it refuses that they let through is refused too
  const errors = validateSchema(m, MANIFEST_SCHEMA);
  if (errors.length) bad(errors[0].replace(/^manifest\.?/, "").trim().slice(0, 160));
  return m;
}

const TYPES = {
  object: (v) => !!v && typeof v === "object" && !Array.isArray(v), array: Array.isArray, string: (v) => typeof v === "string",
  integer: Number.isInteger, number: (v) => typeof v === "number", boolean: (v) => typeof v === "boolean", null: (v) => v === null,
};

/**
 * Check a value against the JSON Schema subset manifest.schema.json uses (type, const, enum, minimum,
 * maximum, minLength, maxLength, pattern, required, properties, additionalProperties, propertyNames,
 * items, prefixItems, minItems, $ref into #/$defs; "x-" keywords are notes for the hand-written checks).
 * Returns the errors as "path: what" strings (empty: valid).
 */
export function validateSchema(value, schema, root = schema, path = "manifest", errors = []) {
  if (schema.$ref) {
    const target = schema.$ref.replace(/^#\//, "").split("/").reduce((o, k) => o?.[k], root);
    if (!target) throw new Error(`schema: unresolved $ref ${schema.$ref}`);
    return validateSchema(value, target, root, path, errors);
  }
  const fail = (what) => { errors.push(`${path} ${what}`); return errors; };
  if (schema.type && !(Array.isArray(schema.type) ? schema.type : [schema.type]).some((t) => TYPES[t]?.(value))) {
    return fail(`must be of type ${[].concat(schema.type).join(" or ")}`);
  }
  if ("const" in schema && JSON.stringify(value) !== JSON.stringify(schema.const)) return fail(`must be ${JSON.stringify(schema.const)}`);
  if (schema.enum && !schema.enum.some((e) => JSON.stringify(e) === JSON.stringify(value))) return fail(`must be one of ${JSON.stringify(schema.enum)}`);
  if (typeof value === "number") {
    if (schema.minimum !== undefined && value < schema.minimum) fail(`must be >= ${schema.minimum}`);
    if (schema.maximum !== undefined && value > schema.maximum) fail(`must be <= ${schema.maximum}`);
  }
  if (typeof value === "string") {
    const n = [...value].length;
    if (schema.minLength !== undefined && n < schema.minLength) fail(`must have at least ${schema.minLength} characters`);
    if (schema.maxLength !== undefined && n > schema.maxLength) fail(`must have at most ${schema.maxLength} characters`);
    if (schema.pattern && !new RegExp(schema.pattern, "u").test(value)) fail(`must match ${schema.pattern}`);
  }
  if (TYPES.object(value)) {
    for (const k of schema.required ?? []) if (!(k in value)) fail(`is missing ${k}`);
    for (const [k, v] of Object.entries(value)) {
      if (schema.propertyNames) validateSchema(k, schema.propertyNames, root, `${path} key ${JSON.stringify(k)}`, errors);
      const sub = schema.properties?.[k] ?? (schema.additionalProperties === false ? null : schema.additionalProperties);
      if (sub === null) fail(`has unknown key ${k}`);
      else if (sub && typeof sub === "object") validateSchema(v, sub, root, `${path}.${k}`, errors);
    }
  }
  if (Array.isArray(value)) {
    if (schema.minItems !== undefined && value.length < schema.minItems) fail(`must have at least ${schema.minItems} items`);
    const pre = schema.prefixItems ?? [];
    value.forEach((v, i) => {
      const sub = i < pre.length ? pre[i] : schema.items;
      if (sub && typeof sub === "object") validateSchema(v, sub, root, `${path}[${i}]`, errors);
    });
  }
  return errors;
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
