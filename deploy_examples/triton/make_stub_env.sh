#!/bin/sh
# The Python environment that Triton's Python backend stub runs deploy_examples/triton/model.py in.
# The stub bundled with nvidia-pytriton 0.7 (Triton 2.51) embeds libpython of one minor version (3.8-3.13:
# use that python here) and returns empty output tensors with numpy 2, so this env pins numpy<2 and
# holds only what rwkv_runtime needs (no torch).   usage: make_stub_env.sh [DIR]   (default build/triton-env)
set -eu
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DIR=${1:-$ROOT/build/triton-env}
PY=${PYTHON:-python3}
"$PY" -m venv "$DIR"
"$DIR/bin/pip" install -q "numpy<2" "onnxruntime>=1.18" "tokenizers>=0.15" "pyrwkv-tokenizer>=0.9"
"$DIR/bin/pip" install -q --no-deps -e "$ROOT/runtime"
"$DIR/bin/python" -c "import rwkv_runtime, numpy; print('triton stub env ready:', '$DIR', 'numpy', numpy.__version__)"
