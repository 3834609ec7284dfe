#!/bin/sh
# A local Triton for CPU machines: the tritonserver binary (from the nvidia-pytriton wheel: Triton 2.51 with
# its Python backend) and the Python environment its backend stub runs rwkv_runtime/triton_python_model.py in.
# The stub embeds libpython of one minor version (3.8-3.13: build this env with such a python) and returns
# EMPTY output tensors with numpy 2, so this env pins numpy<2 and holds only what rwkv_runtime needs (no
# torch). pytriton goes in without its dependencies: only its server files are used (local_server.py).
#   usage: make_stub_env.sh [DIR]        (default build/triton-env; PYTHON=python3.11 to choose the python)
set -eu
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DIR=${1:-$ROOT/build/triton-env}
PY=${PYTHON:-python3}
"$PY" -m venv "$DIR"
"$DIR/bin/pip" install -q "numpy<2" "onnxruntime>=1.18" "tokenizers>=0.15" "pyrwkv-tokenizer>=0.9"
"$DIR/bin/pip" install -q --no-deps "nvidia-pytriton>=0.7,<0.8"
"$DIR/bin/pip" install -q --no-deps -e "$ROOT/runtime"
"$DIR/bin/python" -c "import rwkv_runtime, numpy; print('triton env ready:', '$DIR', 'numpy', numpy.__version__)"
