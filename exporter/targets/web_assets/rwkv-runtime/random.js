// numpy's default random generator (np.random.default_rng(seed): SeedSequence -> PCG64), so a seeded
// sampler draws the same numbers in JavaScript as in the Python runtime. Only what sampling needs:
// uniform doubles in [0, 1) (Generator.random) and Generator.choice(n, p=probs).

const M32 = 0xffffffffn, M64 = (1n << 64n) - 1n, M128 = (1n << 128n) - 1n;
const PCG_MULT = 0x2360ed051fc65da44385df649fccf645n;

// SeedSequence constants (numpy/random/bit_generator.pyx)
const INIT_A = 0x43b0d7e5, MULT_A = 0x931e8875, INIT_B = 0x8b51f9dd, MULT_B = 0x58f38ded;
const MIX_MULT_L = 0xca01f9dd, MIX_MULT_R = 0x4973f715, POOL = 4;
const mul32 = (a, b) => Math.imul(a, b) >>> 0;

function seedWords(seed) {
  let s = BigInt(seed);
  if (s < 0n) throw new RangeError("seed must be non-negative");
  const words = [];
  do { words.push(Number(s & M32)); s >>= 32n; } while (s > 0n);
  return words;
}

function seedPool(entropy) {
  let hashConst = INIT_A;
  const hashmix = (value) => {
    value = (value ^ hashConst) >>> 0;
    hashConst = mul32(hashConst, MULT_A);
    value = mul32(value, hashConst);
    return (value ^ (value >>> 16)) >>> 0;
  };
  const mix = (x, y) => {
    const r = (mul32(MIX_MULT_L, x) - mul32(MIX_MULT_R, y)) >>> 0;
    return (r ^ (r >>> 16)) >>> 0;
  };
  const pool = new Array(POOL);
  for (let i = 0; i < POOL; i++) pool[i] = hashmix(i < entropy.length ? entropy[i] : 0);
  for (let s = 0; s < POOL; s++) for (let d = 0; d < POOL; d++) if (s !== d) pool[d] = mix(pool[d], hashmix(pool[s]));
  for (let s = POOL; s < entropy.length; s++) for (let d = 0; d < POOL; d++) pool[d] = mix(pool[d], hashmix(entropy[s]));
  return pool;
}

function generateState64(pool, n64) {
  let hashConst = INIT_B;
  const w = [];
  for (let i = 0; i < 2 * n64; i++) {
    let v = (pool[i % POOL] ^ hashConst) >>> 0;
    hashConst = mul32(hashConst, MULT_B);
    v = mul32(v, hashConst);
    w.push((v ^ (v >>> 16)) >>> 0);
  }
  const out = [];
  for (let i = 0; i < n64; i++) out.push(BigInt(w[2 * i]) | (BigInt(w[2 * i + 1]) << 32n));
  return out;
}

/** numpy.random.default_rng(seed), the parts sampling uses. */
export class NumpyRandom {
  /** @param {number|bigint|null|undefined} seed null: fresh entropy from crypto */
  constructor(seed) {
    let entropy;
    if (seed === null || seed === undefined) {
      entropy = Array.from(globalThis.crypto.getRandomValues(new Uint32Array(4)));
    } else {
      entropy = seedWords(seed);
    }
    const [s0, s1, i0, i1] = generateState64(seedPool(entropy), 4);
    const initstate = (s0 << 64n) | s1, initseq = (i0 << 64n) | i1;
    this.inc = ((initseq << 1n) | 1n) & M128;
    this.state = 0n;
    this._step();
    this.state = (this.state + initstate) & M128;
    this._step();
  }

  _step() { this.state = (this.state * PCG_MULT + this.inc) & M128; }

  /** Next 64-bit output (PCG XSL-RR 128/64). */
  nextUint64() {
    this._step();
    const x = ((this.state >> 64n) ^ this.state) & M64;
    const rot = Number(this.state >> 122n);
    return ((x >> BigInt(rot)) | (x << BigInt((64 - rot) & 63))) & M64;
  }

  /** A double in [0, 1), as Generator.random(). */
  random() {
    return Number(this.nextUint64() >> 11n) * (1.0 / 9007199254740992.0);
  }

  /** Generator.choice(probs.length, p=probs): cumulative sum, normalised, searchsorted right. */
  choice(probs) {
    const cdf = new Float64Array(probs.length);
    let acc = 0;
    for (let i = 0; i < probs.length; i++) { acc += probs[i]; cdf[i] = acc; }
    const total = cdf[cdf.length - 1];
    const u = this.random();
    let lo = 0, hi = cdf.length; // first index with cdf[i]/total > u
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (cdf[mid] / total <= u) lo = mid + 1; else hi = mid;
    }
    return lo;
  }
}
