// Reads what ONNX Runtime's JavaScript API does not expose: the model's metadata_props (where
// rwkv-export writes its manifest) and the external-data files its initializers name.
// A ModelProto is a protobuf message; we walk its fields and skip every payload we do not need,
// so even a model with gigabytes of weights is scanned without decoding them.

// fatal: a damaged entry is refused (as the Python reader does), not read with replacement characters
const utf8 = new TextDecoder("utf-8", { fatal: true });

// ModelProto: graph = 7, metadata_props = 14. StringStringEntryProto: key = 1, value = 2.
// GraphProto: initializer = 5. TensorProto: external_data = 13, data_location = 14 (EXTERNAL = 1).
const MODEL_GRAPH = 7, MODEL_METADATA = 14, GRAPH_INITIALIZER = 5, TENSOR_EXTERNAL_DATA = 13;

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
 *   distinct `location`s of initializers stored as external data
 */
export function scanModel(bytes) {
  const buf = bytes instanceof Uint8Array ? bytes : new Uint8Array(bytes);
  const metadata = {};
  const external = new Set();
  try {
    for (const f of fields(buf, 0, buf.length)) {
      if (f.wire !== 2) continue;
      if (f.field === MODEL_METADATA) {
        const [k, v] = stringPair(buf, f.start, f.end);
        metadata[k] = v;
      } else if (f.field === MODEL_GRAPH) {
        for (const g of fields(buf, f.start, f.end)) {
          if (g.field !== GRAPH_INITIALIZER || g.wire !== 2) continue;
          for (const t of fields(buf, g.start, g.end)) {
            if (t.field !== TENSOR_EXTERNAL_DATA || t.wire !== 2) continue;
            const [k, v] = stringPair(buf, t.start, t.end);
            if (k === "location") external.add(v);
          }
        }
      }
    }
  } catch (e) {
    throw new Error(`not an ONNX model (${e instanceof TypeError ? "a metadata entry is not UTF-8" : e.message})`);
  }
  return { metadata, externalData: [...external] };
}
