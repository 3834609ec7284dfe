#!/bin/sh
# What tests/edge needs, for .ci/run: Debian's chromium (driven headless by playwright-core; no browser
# download) and the js/ package's npm dependencies (onnxruntime-node without its CUDA download,
# onnxruntime-web, @huggingface/tokenizers, playwright-core), installed from the lock file.
set -eu
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
fi
command -v node >/dev/null 2>&1 || { echo "Error: node (>= 18) is required for tests/edge" >&2; exit 1; }
cd js
ONNXRUNTIME_NODE_INSTALL=skip npm ci --no-audit --no-fund
