// Tokenizers named by the manifest (as runtime/tokenizers.py): bytes, the RWKV World vocabulary
// (greedy longest match; no maintained npm package exists, so it is here), and Hugging Face
// tokenizer.json files embedded in the model (through @huggingface/tokenizers).
import { RuntimeUserError } from "./errors.js";

const utf8 = new TextEncoder();
const decoder = () => new TextDecoder("utf-8"); // replacement characters for bad bytes, like Python's errors="replace"

export class ByteTokenizer {
  kind = "bytes";
  bytesDecode = true; // decode is the tokens' bytes as UTF-8 (StreamDecoder streams it)
  tokenBytes(id) {
    const n = Number(id);
    if (!Number.isInteger(n) || n < 0 || n > 255) throw new RuntimeUserError(`token id ${id} is outside the byte vocabulary (0..255)`);
    return Uint8Array.of(n);
  }
  encode(text) { return Array.from(utf8.encode(text)); }
  decode(ids) {
    // Uint8Array.from would wrap 300 to 44 silently: an id outside 0..255 is an error (as in Python)
    const bytes = Uint8Array.from(ids, (t) => {
      const n = Number(t);
      if (!Number.isInteger(n) || n < 0 || n > 255) throw new RuntimeUserError(`token id ${t} is outside the byte vocabulary (0..255)`);
      return n;
    });
    return decoder().decode(bytes);
  }
}

/** Parse one Python literal as the World vocabulary writes it: '...', "...", b'...' -> bytes. */
export function parsePyLiteral(src) {
  let i = 0, isBytes = false;
  if (src[i] === "b") { isBytes = true; i++; }
  const q = src[i++];
  if (q !== "'" && q !== '"') throw new Error(`not a string literal: ${src}`);
  const out = [];
  const pushCode = (cp) => {
    if (isBytes) out.push(cp);
    else out.push(...utf8.encode(String.fromCodePoint(cp)));
  };
  while (i < src.length && src[i] !== q) {
    const c = src[i];
    if (c !== "\\") {
      const cp = src.codePointAt(i);
      pushCode(cp);
      i += cp > 0xffff ? 2 : 1;
      continue;
    }
    const e = src[i + 1];
    i += 2;
    const simple = { n: 10, t: 9, r: 13, "\\": 92, "'": 39, '"': 34, a: 7, b: 8, f: 12, v: 11, 0: 0 };
    if (e === "x") { pushCode(parseInt(src.slice(i, i + 2), 16)); i += 2; }
    else if (e === "u") { pushCode(parseInt(src.slice(i, i + 4), 16)); i += 4; }
    else if (e === "U") { pushCode(parseInt(src.slice(i, i + 8), 16)); i += 8; }
    else if (e in simple) pushCode(simple[e]);
    else throw new Error(`unknown escape \\${e} in ${src}`);
  }
  if (src[i] !== q) throw new Error(`unterminated literal: ${src}`);
  return Uint8Array.from(out);
}

/**
 * The RWKV World tokenizer (65536 tokens): greedy longest match over a byte trie.
 * Build it from the text of rwkv_vocab_v20230424.txt (lines `id literal length`).
 */
export class WorldTokenizer {
  kind = "world";

  /** @param {string} vocabText */
  constructor(vocabText) {
    this.idToBytes = [];
    this.root = { next: new Map(), id: -1 };
    let n = 0;
    for (const line of vocabText.split("\n")) {
      if (!line.trim()) continue;
      const a = line.indexOf(" "), b = line.lastIndexOf(" ");
      const id = Number(line.slice(0, a));
      let bytes;
      try {
        if (a < 1 || b <= a || !Number.isInteger(id) || id < 0) throw new Error("expected: id literal length");
        bytes = parsePyLiteral(line.slice(a + 1, b));
      } catch (e) { // a wrong file given as worldVocab: one line naming the line, not a parser exception
        throw new RuntimeUserError(`World vocabulary line ${n + 1}: ${e.message.slice(0, 80)} (is worldVocab rwkv_vocab_v20230424.txt?)`);
      }
      if (bytes.length !== Number(line.slice(b + 1))) {
        throw new RuntimeUserError(`World vocabulary line ${n + 1}: length ${bytes.length} != ${line.slice(b + 1, b + 20)}`);
      }
      this.idToBytes[id] = bytes;
      let node = this.root;
      for (const byte of bytes) {
        let nx = node.next.get(byte);
        if (!nx) { nx = { next: new Map(), id: -1 }; node.next.set(byte, nx); }
        node = nx;
      }
      node.id = id;
      n++;
    }
    this.size = n;
  }

  /** @param {string} text @returns {number[]} */
  encode(text) { return this.encodeBytes(utf8.encode(text)); }

  encodeBytes(src) {
    const out = [];
    let i = 0;
    while (i < src.length) {
      let node = this.root, best = -1, bestEnd = i;
      for (let j = i; j < src.length; j++) {
        node = node.next.get(src[j]);
        if (!node) break;
        if (node.id >= 0) { best = node.id; bestEnd = j + 1; }
      }
      if (best < 0) throw new RuntimeUserError(`byte ${src[i]} has no World token`); // cannot happen: all 256 bytes are tokens
      out.push(best);
      i = bestEnd;
    }
    return out;
  }

  decodeBytes(ids) {
    const parts = ids.map((t) => {
      const b = this.idToBytes[Number(t)];
      if (!b) throw new RuntimeUserError(`token id ${t} is not in the World vocabulary`);
      return b;
    });
    const out = new Uint8Array(parts.reduce((a, b) => a + b.length, 0));
    let p = 0;
    for (const b of parts) { out.set(b, p); p += b.length; }
    return out;
  }

  decode(ids) { return decoder().decode(this.decodeBytes(ids)); }

  bytesDecode = true; // decode is the vocabulary's bytes as UTF-8 (StreamDecoder streams it)
  tokenBytes(id) { return this.decodeBytes([id]); }
}

/** A Hugging Face tokenizer.json (e.g. the 20B tokenizer of the RWKV-4 Pile models). */
export class HFTokenizer {
  kind = "hf-json";
  constructor(tok) { this.tok = tok; }

  /** @param {string} jsonText */
  static async fromJSON(jsonText) {
    const { Tokenizer } = await import("@huggingface/tokenizers");
    try {
      return new HFTokenizer(new Tokenizer(JSON.parse(jsonText), {}));
    } catch (e) { // as Python: an embedded tokenizer.json that does not load is refused, in one line
      throw new RuntimeUserError(`the tokenizer.json does not load (${String(e?.message ?? e).split("\n")[0].slice(0, 120)}); re-export with a valid --tokenizer`);
    }
  }

  encode(text) { return this.tok.encode(text, { add_special_tokens: true }).ids.map(Number); }
  decode(ids) { return this.tok.decode(ids.map(Number), { skip_special_tokens: true, clean_up_tokenization_spaces: false }); }
}

/**
 * The tokenizer a manifest names.
 * @param {{kind: string}} spec manifest.tokenizer
 * @param {{embeddedJSON?: string|null, worldVocab?: () => Promise<string>}} sources
 */
export async function makeTokenizer(spec, { embeddedJSON = null, worldVocab = null } = {}) {
  const kind = spec?.kind ?? "none";
  if (kind === "bytes") return new ByteTokenizer();
  if (kind === "world") {
    if (!worldVocab) throw new RuntimeUserError("the World tokenizer needs its vocabulary: pass options.worldVocab");
    return new WorldTokenizer(await worldVocab());
  }
  if (kind === "hf-json") {
    if (!embeddedJSON) throw new RuntimeUserError("the model names a tokenizer.json but does not embed it; re-export with --tokenizer");
    return HFTokenizer.fromJSON(embeddedJSON);
  }
  if (kind !== "none") throw new RuntimeUserError(`tokenizer kind ${JSON.stringify(kind).slice(0, 40)} is not supported here (bytes, world, hf-json)`);
  throw new RuntimeUserError("the model has no tokenizer (it was exported with --tokenizer none): give token ids to " +
    "generateTokens/step/prefill, or re-export with --tokenizer");
}

/** Bytes at the end of `b` that start a UTF-8 character not complete yet (0 when none). */
function incompleteTail(b) {
  for (let k = 1; k <= Math.min(3, b.length); k++) {
    const c = b[b.length - k];
    if (c >= 0x80 && c <= 0xbf) continue; // a continuation byte: look further back
    const need = c >= 0xf0 && c <= 0xf4 ? 4 : c >= 0xe0 && c <= 0xef ? 3 : c >= 0xc2 && c <= 0xdf ? 2 : 1;
    return need > k ? k : 0;
  }
  return 0;
}

/** Token ids -> text pieces, holding back incomplete UTF-8 sequences (as Python's StreamDecoder): the pieces
 * joined equal one decode of all the tokens. Byte-based vocabularies (bytes, World: `bytesDecode`) go through
 * TextDecoder's streaming mode (invalid bytes become U+FFFD as in one decode); a piece is held whole while a
 * character is incomplete. Other tokenizers are decoded from the held tokens while the text ends in U+FFFD. */
export class StreamDecoder {
  constructor(tokenizer) {
    this.tok = tokenizer;
    this.held = [];
    this.stream = tokenizer.bytesDecode ? new TextDecoder("utf-8") : null;
    this.text = "";
    this.tail = new Uint8Array(0); // the last bytes seen (to tell whether a character is incomplete)
  }
  get pending() { return this.stream ? this.text.length > 0 || incompleteTail(this.tail) > 0 : this.held.length > 0; }
  push(token) {
    if (this.stream) {
      const data = this.tok.tokenBytes(Number(token)); // throws the tokenizer's one-line error outside it
      const joined = new Uint8Array(this.tail.length + data.length);
      joined.set(this.tail); joined.set(data, this.tail.length);
      this.tail = joined.slice(-4);
      const text = this.text + this.stream.decode(data, { stream: true });
      if (incompleteTail(this.tail) > 0) { this.text = text; return ""; }
      this.text = "";
      return text;
    }
    this.held.push(Number(token));
    const text = this.tok.decode(this.held);
    if (text.endsWith("\ufffd") && this.held.length < 8) return "";
    this.held = [];
    return text;
  }
  flush() {
    if (this.stream) {
      const text = this.text + this.stream.decode();
      this.text = ""; this.tail = new Uint8Array(0);
      return text;
    }
    const text = this.held.length ? this.tok.decode(this.held) : "";
    this.held = [];
    return text;
  }
}
