// The conformance fixtures shared with the Python runtime (tests/conformance/*.json, generated from
// runtime/manifest.py's field table): every manifest case gets the same verdict from parseManifest as
// from Python's parse_manifest, naming the same field, and the cases marked `schema` the same verdict
// from js/src/manifest.schema.json alone; every state case the same verdict from the state check.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { RuntimeUserError, parseManifest } from "../src/node.js";
import { Session } from "../src/session.js";
import { validateSchema, MANIFEST_SCHEMA } from "../src/manifest.js";
import { StopMatcher } from "../src/generation.js";

const dir = new URL("../../tests/conformance/", import.meta.url);
const load = (name) => JSON.parse(readFileSync(new URL(name, dir), "utf8"));
const manifests = load("manifests.json"), states = load("states.json");

function manifestText(c) {
  if ("raw" in c) return c.raw;
  const m = structuredClone(manifests.base);
  for (const k of c.delete ?? []) delete m[k];
  Object.assign(m, structuredClone(c.set ?? {}));
  return JSON.stringify(m);
}

for (const c of manifests.cases) {
  test(`manifest: ${c.name}`, () => {
    const text = manifestText(c);
    if (c.valid) parseManifest(text, "m");
    else {
      assert.throws(() => parseManifest(text, "m"), (e) => e instanceof RuntimeUserError && e.message.includes(c.error),
        `should be refused naming ${JSON.stringify(c.error)}`);
    }
    if (c.schema && !("raw" in c)) {
      const errors = validateSchema(JSON.parse(text), MANIFEST_SCHEMA);
      assert.equal(errors.length === 0, c.valid, `schema verdict: ${errors.join("; ")}`);
    }
  });
}

const half = (x) => { const f = new Float32Array([x]), u = new Uint32Array(f.buffer)[0]; return Number.isNaN(x) ? 0x7e00 : (u >>> 16) & 0x8000 | ((((u >>> 23) & 0xff) - 112) << 10) | ((u & 0x7fffff) >>> 13); };
const holder = { manifest: parseManifest(JSON.stringify(states.manifest), "m") };
for (const c of states.cases) {
  test(`state: ${c.name}`, () => {
    const arrays = {};
    for (const [k, a] of Object.entries(c.arrays)) {
      const n = a.shape.reduce((x, y) => x * y, 1), fill = a.fill === "nan" ? NaN : a.fill;
      const data = a.dtype === "float16" ? new Uint16Array(n).fill(fill === 0 ? 0 : half(fill)) : new Float32Array(n).fill(fill);
      arrays[k] = { dtype: a.dtype, shape: a.shape, data };
    }
    const run = () => Session.prototype._checkArrays.call(holder, arrays, "state", { requireAll: false, batch: c.batch, nan: true });
    if (c.valid) run();
    else assert.throws(run, (e) => e instanceof RuntimeUserError && e.message.includes(c.error), `should be refused naming ${c.error}`);
  });
}

// Stop strings (tests/conformance/stops.json, also read by tests/runtime/test_stop_conformance.py, which
// checks its answers against the definition): generation.js's StopMatcher delivers exactly the table's
// text after every piece, as Python's StopMatcher does.
const stops = load("stops.json");
for (const c of stops.cases) {
  test(`stop strings: ${c.name}`, () => {
    const m = new StopMatcher(c.stops);
    assert.deepEqual(c.pieces.slice(0, c.pushes.length).map((p) => m.push(p)), c.pushes);
    if (c.release !== null) assert.equal(m.release(), c.release);
  });
}
