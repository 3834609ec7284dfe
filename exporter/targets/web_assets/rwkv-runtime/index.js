// Default entry: the browser build (bundlers); Node resolves "rwkv-runtime" to node.js (package.json exports).
export * from "./web.js";
