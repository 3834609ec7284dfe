// Reads what ONNX Runtime's JavaScript API does not expose: the model's metadata_props (where
// rwkv-export writes its manifest) and the external-data files its initializers name.
// A ModelProto is a protobuf message; we walk its fields and skip every payload we do not need,
// so even a model with gigabytes of weights is scanned without decoding them.

// fatal: a damaged entry is refused (as the Python reader does), not read with replacement characters
const utf8 = new TextDecoder("utf-8", { fatal: true });

// ModelProto: metadata_props = 14. StringStringEntryProto: key = 1, value = 2. TensorProto: external_data = 13.
const MODEL_METADATA = 14, TENSOR_EXTERNAL_DATA = 13;
// message -> {field number: message it holds}: every path to a TensorProto, as runtime/onnx_metadata.py's
// _SCHEMA (initializers, sparse initializers, Constant-style attributes, subgraphs, functions, training
// graphs). Initializers alone missed an attribute's external data: never confined, and never handed to
// onnxruntime-web (which then could not load a valid export whose subgraph constant was stored outside).
const SCHEMA = {
  model: { 7: "graph", 20: "training", 25: "function" },
  training: { 1: "graph", 3: "graph" },
  function: { 7: "node", 11: "attribute" },
  graph: { 1: "node", 5: "tensor", 15: "sparse" },
  node: { 5: "attribute" },
  attribute: { 5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse" },
  sparse: { 1: "tensor", 2: "tensor" },
};
const MAX_DEPTH = 64; // nested subgraphs deeper than this are damage (as Python's reader)

function readVarint(buf, pos) {
  let value = 0, mul = 1, byte;
  do {
    if (pos >= buf.length) throw new Error("truncated varint");
    byte = buf[pos++];
    value += (byte & 0x7f) * mul; // plain arithmetic: lengths may exceed 2^31
    mul *= 128;
  } while (byte & 0x80);
  return [value, pos];
}

/** Iterate over the fields of one message in buf[start, end): yields {field, wire, start, end} (payload span). */
function* fields(buf, start, end) {
  let pos = start;
  while (pos < end) {
    let key;
    [key, pos] = readVarint(buf, pos);
    const field = Math.floor(key / 8), wire = key & 7;
    let s = pos, e;
    if (wire === 0) { [, e] = readVarint(buf, pos); }
    else if (wire === 1) e = pos + 8;
    else if (wire === 5) e = pos + 4;
    else if (wire === 2) { let n; [n, s] = readVarint(buf, pos); e = s + n; }
    else throw new Error(`unsupported protobuf wire type ${wire}`);
    if (e > end) throw new Error("truncated protobuf message");
    yield { field, wire, start: s, end: e };
    pos = e;
  }
}

function stringPair(buf, start, end) {
  let key = "", value = "";
  for (const f of fields(buf, start, end)) {
    if (f.wire !== 2) continue;
    if (f.field === 1) key = utf8.decode(buf.subarray(f.start, f.end));
    else if (f.field === 2) value = utf8.decode(buf.subarray(f.start, f.end));
  }
  return [key, value];
}

/**
 * Scan an ONNX model's bytes.
 * @param {Uint8Array} bytes the whole .onnx file
 * @returns {{metadata: Record<string,string>, externalData: string[]}} metadata_props, and the
 *   distinct external-data `location`s of every tensor (initializers, node attributes, subgraphs, ...)
 */
export function scanModel(bytes) {
  const buf = bytes instanceof Uint8Array ? bytes : new Uint8Array(bytes);
  const metadata = {};
  const external = new Set();
  const walk = (kind, start, end, depth) => {
    if (depth > MAX_DEPTH) throw new Error("subgraphs nested too deep");
    const children = SCHEMA[kind] ?? {};
    for (const f of fields(buf, start, end)) {
      if (f.wire !== 2) continue;
      if (kind === "model" && f.field === MODEL_METADATA) {
        const [k, v] = stringPair(buf, f.start, f.end);
        metadata[k] = v;
      } else if (kind === "tensor" && f.field === TENSOR_EXTERNAL_DATA) {
        const [k, v] = stringPair(buf, f.start, f.end);
        if (k === "location") external.add(v);
      } else if (f.field in children) {
        walk(children[f.field], f.start, f.end, depth + 1);
      }
    }
  };
  try {
    walk("model", 0, buf.length, 0);
  } catch (e) {
    throw new Error(`not an ONNX model (${e instanceof TypeError ? "a metadata entry is not UTF-8" : e.message})`);
  }
  return { metadata, externalData: [...external] };
}
