// .npz files (a zip of .npy arrays), the state format both runtimes read: Python's State.save
// writes one with numpy.savez, this module reads it, and writes files numpy.load reads.
import { RuntimeUserError } from "./errors.js";

const DESCR = { float32: "<f4", float16: "<f2", float64: "<f8", int64: "<i8", int32: "<i4", uint8: "|u1" };
const ARRAYS = { "<f4": Float32Array, "<f2": Uint16Array, "<f8": Float64Array, "<i8": BigInt64Array, "<i4": Int32Array, "|u1": Uint8Array, "<u1": Uint8Array };
const DTYPE_OF = { "<f4": "float32", "<f2": "float16", "<f8": "float64", "<i8": "int64", "<i4": "int32", "|u1": "uint8", "<u1": "uint8" };

let crcTable;
function crc32(bytes) {
  if (!crcTable) {
    crcTable = new Uint32Array(256);
    for (let n = 0; n < 256; n++) {
      let c = n;
      for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
      crcTable[n] = c >>> 0;
    }
  }
  let c = 0xffffffff;
  for (let i = 0; i < bytes.length; i++) c = crcTable[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

/** One array as .npy bytes (format 1.0, C order, little endian). */
export function toNpy({ dtype, shape, data }) {
  if (dtype === "str") { // a 0-d numpy unicode scalar ('<U n': UTF-32 little endian), e.g. the export id
    const cps = Array.from(String(data), (c) => c.codePointAt(0));
    return toNpy({ dtype: `<U${Math.max(1, cps.length)}`, shape: [], data: Uint32Array.from(cps.length ? cps : [0]) });
  }
  const descr = dtype.startsWith("<U") ? dtype : DESCR[dtype];
  if (!descr) throw new RuntimeUserError(`cannot save dtype ${dtype}`);
  const shp = shape.length === 1 ? `(${shape[0]},)` : `(${shape.join(", ")})`;
  let header = `{'descr': '${descr}', 'fortran_order': False, 'shape': ${shp}, }`;
  const total = 10 + header.length + 1;
  header += " ".repeat((64 - (total % 64)) % 64) + "\n"; // numpy pads so the data is 64-byte aligned
  const head = new TextEncoder().encode(header);
  const body = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  const out = new Uint8Array(10 + head.length + body.length);
  out.set([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 1, 0, head.length & 0xff, head.length >> 8]);
  out.set(head, 10);
  out.set(body, 10 + head.length);
  return out;
}

/** Parse .npy bytes -> {dtype, shape, data} (a typed array; float16 as raw Uint16Array). */
export function fromNpy(bytes, name = "array") {
  if (bytes[0] !== 0x93 || String.fromCharCode(...bytes.subarray(1, 6)) !== "NUMPY") {
    throw new RuntimeUserError(`${name}: not a .npy array`);
  }
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const major = bytes[6];
  const hlen = major === 1 ? dv.getUint16(8, true) : dv.getUint32(8, true);
  const start = major === 1 ? 10 : 12;
  const header = new TextDecoder().decode(bytes.subarray(start, start + hlen));
  const descr = /'descr':\s*'([^']+)'/.exec(header)?.[1];
  const fortran = /'fortran_order':\s*True/.test(header);
  const shapeText = /'shape':\s*\(([^)]*)\)/.exec(header)?.[1];
  const shape = (shapeText ?? "").split(",").map((s) => s.trim()).filter(Boolean).map(Number);
  if (!shape.every((d) => Number.isSafeInteger(d) && d >= 0)) throw new RuntimeUserError(`${name}: malformed .npy header`);
  const off = start + hlen;
  const unicode = /^<U(\d+)$/.exec(descr ?? "");
  if (unicode && shape.length === 0) { // a numpy unicode scalar: UTF-32 code points, NUL-padded
    const n = Number(unicode[1]);
    if (bytes.length - off !== 4 * n || n > 256) throw new RuntimeUserError(`${name}: malformed string (truncated or oversized)`);
    const cps = [];
    for (let i = 0; i < n; i++) {
      const c = dv.getUint32(off + 4 * i, true);
      if (c > 0x10ffff) throw new RuntimeUserError(`${name}: malformed string`);
      if (c) cps.push(c);
    }
    return { dtype: "str", shape: [], data: String.fromCodePoint(...cps) };
  }
  const Arr = ARRAYS[descr];
  if (!Arr || fortran || shapeText === undefined) {
    throw new RuntimeUserError(`${name}: unsupported array (${descr}${fortran ? ", Fortran order" : ""})`);
  }
  const count = shape.reduce((a, b) => a * b, 1);
  // exactly the header's size, as Python's reader: a truncated or oversized member is damage
  if (bytes.length - off !== count * Arr.BYTES_PER_ELEMENT) throw new RuntimeUserError(`${name}: truncated or oversized array`);
  const data = new Arr(count); // a copy: aligned, independent of the file's buffer
  new Uint8Array(data.buffer).set(bytes.subarray(off, off + count * Arr.BYTES_PER_ELEMENT));
  return { dtype: DTYPE_OF[descr], shape, data };
}

/**
 * Write arrays as an .npz (stored zip, like numpy.savez).
 * @param {Record<string, {dtype: string, shape: number[], data: ArrayBufferView}>} arrays
 * @returns {Uint8Array}
 */
export function saveNpz(arrays) {
  const enc = new TextEncoder();
  const locals = [], centrals = [];
  let offset = 0;
  for (const [key, arr] of Object.entries(arrays)) {
    const name = enc.encode(`${key}.npy`);
    const body = toNpy(arr);
    const crc = crc32(body);
    const local = new Uint8Array(30 + name.length);
    const lv = new DataView(local.buffer);
    lv.setUint32(0, 0x04034b50, true); lv.setUint16(4, 20, true); lv.setUint16(8, 0, true);
    lv.setUint32(14, crc, true); lv.setUint32(18, body.length, true); lv.setUint32(22, body.length, true);
    lv.setUint16(26, name.length, true); local.set(name, 30);
    const central = new Uint8Array(46 + name.length);
    const cv = new DataView(central.buffer);
    cv.setUint32(0, 0x02014b50, true); cv.setUint16(4, 20, true); cv.setUint16(6, 20, true);
    cv.setUint32(16, crc, true); cv.setUint32(20, body.length, true); cv.setUint32(24, body.length, true);
    cv.setUint16(28, name.length, true); cv.setUint32(42, offset, true); central.set(name, 46);
    locals.push(local, body); centrals.push(central);
    offset += local.length + body.length;
  }
  const cdSize = centrals.reduce((a, c) => a + c.length, 0);
  const end = new Uint8Array(22);
  const ev = new DataView(end.buffer);
  ev.setUint32(0, 0x06054b50, true); ev.setUint16(8, centrals.length, true); ev.setUint16(10, centrals.length, true);
  ev.setUint32(12, cdSize, true); ev.setUint32(16, offset, true);
  const out = new Uint8Array(offset + cdSize + 22);
  let p = 0;
  for (const part of [...locals, ...centrals, end]) { out.set(part, p); p += part.length; }
  return out;
}

/** Inflate a deflated member, never past `limit` bytes: its declared size. (Was: inflated whole, then
 *  compared; a 200 KB member of zeros declaring 16 bytes took 400 MB before it was refused.) */
async function inflateRaw(bytes, limit, name) {
  const reader = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate-raw")).getReader();
  const chunks = [];
  let n = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    n += value.length;
    if (n > limit) {
      await reader.cancel().catch(() => {});
      throw new RuntimeUserError(`${name}: inflates past its declared size of ${limit} bytes (damaged, or a zip bomb)`);
    }
    chunks.push(value);
  }
  const out = new Uint8Array(n);
  let p = 0;
  for (const c of chunks) { out.set(c, p); p += c.length; }
  return out;
}

/**
 * Read an .npz (stored or deflated, zip64 as numpy writes it). Damage (truncation, bit flips: each
 * member's CRC-32 is checked, as Python's zipfile does) is a RuntimeUserError naming `where`.
 * @param {Uint8Array|ArrayBuffer} input
 * @param {string} [where] the file, for messages
 * @param {{maxMemberBytes?: number}} [limits] a member declaring more bytes is refused before it is read
 * @returns {Promise<Record<string, {dtype: string, shape: number[], data: ArrayBufferView}>>}
 */
export async function loadNpz(input, where = "state", { maxMemberBytes = Infinity } = {}) {
  try {
    return await readZip(input instanceof Uint8Array ? input : new Uint8Array(input ?? 0), maxMemberBytes);
  } catch (e) {
    if (e instanceof RuntimeUserError) throw new RuntimeUserError(`${where}: ${e.message}`);
    // offsets or sizes of a damaged directory past the end (RangeError), a corrupt deflate stream, ...
    throw new RuntimeUserError(`${where}: not a saved state (.npz) (${String(e?.message ?? e).split("\n")[0].slice(0, 80)})`);
  }
}

async function readZip(bytes, maxMemberBytes) {
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let eocd = -1;
  for (let i = bytes.length - 22; i >= Math.max(0, bytes.length - 22 - 65535); i--) {
    if (dv.getUint32(i, true) === 0x06054b50) { eocd = i; break; }
  }
  if (eocd < 0) throw new RuntimeUserError("not a saved state (.npz): no zip directory found");
  const count = dv.getUint16(eocd + 10, true);
  let p = dv.getUint32(eocd + 16, true);
  const out = {};
  for (let n = 0; n < count; n++) {
    if (dv.getUint32(p, true) !== 0x02014b50) throw new RuntimeUserError("not a saved state (.npz): bad zip directory");
    const method = dv.getUint16(p + 10, true), crc = dv.getUint32(p + 16, true);
    let csize = dv.getUint32(p + 20, true), usize = dv.getUint32(p + 24, true), loff = dv.getUint32(p + 42, true);
    const nlen = dv.getUint16(p + 28, true), xlen = dv.getUint16(p + 30, true), clen = dv.getUint16(p + 32, true);
    const name = new TextDecoder().decode(bytes.subarray(p + 46, p + 46 + nlen));
    // zip64: sizes/offset of 0xFFFFFFFF live in the extra field 0x0001, in this order
    for (let x = p + 46 + nlen; x < p + 46 + nlen + xlen;) {
      const id = dv.getUint16(x, true), sz = dv.getUint16(x + 2, true);
      if (id === 1) {
        let q = x + 4;
        const big = () => { const v = Number(dv.getBigUint64(q, true)); q += 8; return v; };
        if (usize === 0xffffffff) usize = big();
        if (csize === 0xffffffff) csize = big();
        if (loff === 0xffffffff) loff = big();
      }
      x += 4 + sz;
    }
    if (dv.getUint32(loff, true) !== 0x04034b50) throw new RuntimeUserError(`${name}: bad zip entry`);
    const lname = dv.getUint16(loff + 26, true);
    const local = new TextDecoder().decode(bytes.subarray(loff + 30, loff + 30 + lname));
    if (local !== name) throw new RuntimeUserError(`${name}: its name in the zip directory and in its header differ`); // as Python's zipfile
    const data = loff + 30 + lname + dv.getUint16(loff + 28, true);
    if (data + csize > bytes.length) throw new RuntimeUserError(`${name}: truncated in the .npz`);
    // a declared size no state of this model can have is refused before anything is inflated
    if (usize > maxMemberBytes) throw new RuntimeUserError(`${name}: declares ${usize} bytes, more than a state tensor of this model can hold (${maxMemberBytes})`);
    let body = bytes.subarray(data, data + csize);
    if (method === 8) body = await inflateRaw(body, usize, name);
    else if (method !== 0) throw new RuntimeUserError(`${name}: unsupported zip compression ${method}`);
    if (body.length !== usize) throw new RuntimeUserError(`${name}: truncated in the .npz`);
    if (crc32(body) !== crc) throw new RuntimeUserError(`${name}: damaged (CRC-32 mismatch)`);
    out[name.replace(/\.npy$/, "")] = fromNpy(body, name);
    p += 46 + nlen + xlen + clen;
  }
  return out;
}
