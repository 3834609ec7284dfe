/** A mistake the user can fix (bad file, wrong state, bad argument): one clear message, no stack needed. */
export class RuntimeUserError extends Error {
  constructor(message) {
    super(message);
    this.name = "RuntimeUserError";
  }
}

/**
 * Import a peer dependency (onnxruntime-node / onnxruntime-web), turning "not installed" into one
 * RuntimeUserError naming the package to install. `load` is `() => import("name")` written out, so
 * bundlers still see the specifier.
 */
export async function importPeer(name, load) {
  try {
    return await load();
  } catch (e) {
    const msg = String(e?.message ?? e);
    // Node: ERR_MODULE_NOT_FOUND "Cannot find package 'x'"; browsers: "Failed to resolve module specifier"
    if (msg.includes(name) && (e?.code === "ERR_MODULE_NOT_FOUND" || /Cannot find (package|module)|Failed to resolve module specifier/.test(msg))) {
      throw new RuntimeUserError(`${name} is not installed: rwkv-runtime runs models on it (a peer dependency); ` +
        `install it beside rwkv-runtime (npm install ${name}), or pass it as options.ort`);
    }
    throw e;
  }
}
