# Two commands on a fresh machine:  `make demo` (the main job) and `make test` (the tests).
# Each creates the virtual environment it needs in .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEFAULT_MODEL := exporter/default_model/tiny-rwkv4-pystdlib.pth

$(BIN)/.installed: pyproject.toml runtime/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch pinned: this version installs from a local CPU build here (others download several GB)
	$(BIN)/python -m pip install -q torch==2.13.0
	# two distributions from this repository: rwkv-runtime (runtime/, no torch) and rwkv-export (the rest)
	$(BIN)/python -m pip install -q -e './runtime[cpu,serve,ray]' -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

## demo: export the embedded model, validate it against the PyTorch reference, generate text
demo: $(BIN)/.installed
	mkdir -p build
	$(BIN)/rwkv-export export $(DEFAULT_MODEL) -o build/default.onnx
	$(BIN)/rwkv-export validate build/default.onnx --reference $(DEFAULT_MODEL) --steps 48 --prompt 'import os'
	$(BIN)/rwkv-export generate build/default.onnx --prompt 'def main(' -n 200 --temperature 0.8 --top-p 0.9 --seed 0

## test: every CI lane (lint, fast, slow, edge, kernels, shared), each run even when an earlier one failed;
##       the README's test command, and what .ci/run calls. The real-tritonserver and Node/browser tests need a
##       few things beside .venv; each is set up here when the registries allow, and its tests skip with a
##       one-line reason when it could not be.
CI_LANES := lint test-fast test-slow test-edge test-kernels test-shared
test: $(BIN)/.installed build/triton-env/.ready js/node_modules/.package-lock.json
	@mkdir -p build; failed=; for lane in $(CI_LANES); do \
	    echo "=== make $$lane"; start=$$(date +%s); \
	    $(MAKE) --no-print-directory $$lane || failed="$$failed $$lane"; \
	    echo "=== make $$lane: $$(( $$(date +%s) - start )) s"; \
	done; \
	if [ -n "$$failed" ]; then echo "CI failed:$$failed"; exit 1; fi; echo "CI passed: $(CI_LANES)"

## ci: the same as test
ci: test

## test-fast: the fast lane for local work (no subprocess-, server- or compile-heavy tests); needs nothing
##            outside the checkout (tests/golden holds the models; `shared` tests are their own lane)
test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -q -rs -m "not slow and not shared"

## test-slow: the slow tests (not `shared`) except the edge (browser/Node) and kernel lanes below
test-slow: $(BIN)/.installed build/triton-env/.ready
	$(BIN)/python -m pytest -q -rs -m "slow and not shared" --ignore=tests/edge --ignore=tests/tensorrt/test_plugins.py

## test-edge: the JavaScript runtime on Node.js and in a browser (tests/edge's slow tests; fast ones are in test-fast)
test-edge: $(BIN)/.installed js/node_modules/.package-lock.json
	$(BIN)/python -m pytest -q -rs -m slow tests/edge

## test-kernels: plugins/ built by its own CMake with RWKV_KERNELS_ONLY (kernels + CPU twins, no TensorRT;
##               needs nvcc), then the compiling plugin tests (CPU build, emulator, ASan, nvcc)
KERNEL_ARCHS ?= 80
test-kernels: $(BIN)/.installed
	@mkdir -p build; if command -v $${CUDACXX:-nvcc} >/dev/null 2>&1 && command -v cmake >/dev/null 2>&1; then \
	    cmake -S plugins -B build/kernels -DRWKV_KERNELS_ONLY=ON -DCMAKE_CUDA_ARCHITECTURES=$(KERNEL_ARCHS) \
	        -DCMAKE_BUILD_TYPE=Release >build/kernels.log 2>&1 \
	    && cmake --build build/kernels -j2 >>build/kernels.log 2>&1 \
	    && echo "plugins/ kernels built with CMake (RWKV_KERNELS_ONLY) in build/kernels" \
	    || { tail -30 build/kernels.log; exit 1; }; \
	else echo "warning: nvcc or cmake not found: the CMake kernel build is skipped"; fi
	$(BIN)/python -m pytest -q -rs -m slow tests/tensorrt/test_plugins.py

## test-shared: the optional lane of tests that need ../shared/reference (RWKV_SHARED_DIR=... elsewhere)
test-shared: $(BIN)/.installed
	$(BIN)/python -m pytest -q -rs -m shared

## lint: ruff (pyproject.toml [tool.ruff]) and clang-format for plugins/ (.clang-format); checks only
lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/clang-format --dry-run -Werror $$(git ls-files 'plugins/*.cpp' 'plugins/*.h' 'plugins/*.cu' 'plugins/*.cuh')

# Triton's Python-backend stub environment (numpy<2, rwkv-runtime, the tritonserver binary from nvidia-pytriton)
build/triton-env/.ready: runtime/pyproject.toml deploy_examples/triton/make_stub_env.sh
	@mkdir -p build
	PYTHON=$(PYTHON) sh deploy_examples/triton/make_stub_env.sh build/triton-env && touch $@ \
	    || echo "warning: no Triton stub environment (tests/triton server tests will skip)"

# the JS runtime's npm dependencies (onnxruntime-node without its CUDA download)
js/node_modules/.package-lock.json: js/package-lock.json
	cd js && ONNXRUNTIME_NODE_INSTALL=skip npm ci --no-audit --no-fund --loglevel=error \
	    || echo "warning: npm ci failed in js/ (tests/edge will skip)"

## web-assets: write js/src/manifest.schema.js from the schema (exporter/targets/web_assets links to js/src and the demo)
web-assets:
	python3 scripts/sync_web_assets.py

## bench: decode/prefill speed as a fraction of the same-run ceiling, next to BlinkDL's rwkv (and rwkv.cpp: RWKVCPP=path),
##        and session memory; RWKV-4-169M-shaped model
bench: $(BIN)/.installed
	mkdir -p build
	$(BIN)/python scripts/make_169m.py -o build/rwkv4-169m-random.pth
	$(BIN)/rwkv-export export build/rwkv4-169m-random.pth -o build/rwkv4-169m.onnx --tokenizer none --external-data -q
	$(BIN)/rwkv-export export build/rwkv4-169m-random.pth -o build/rwkv4-169m-int8.onnx --tokenizer none --external-data -q --quantize int8
	$(BIN)/rwkv-export export build/rwkv4-169m-random.pth -o build/rwkv4-169m-int4.onnx --tokenizer none --external-data -q --quantize int4
	$(BIN)/rwkv-export export build/rwkv4-169m-random.pth -o build/rwkv4-169m-int4-b128.onnx --tokenizer none --external-data -q --quantize int4 --quant-block 128
	$(BIN)/rwkv-export export build/rwkv4-169m-random.pth -o build/rwkv4-169m-int8d.onnx --tokenizer none --external-data -q --quantize int8-dynamic
	$(BIN)/python scripts/bench_vs_blinkdl.py build/rwkv4-169m-random.pth build/rwkv4-169m.onnx \
	    build/rwkv4-169m-int8.onnx build/rwkv4-169m-int4.onnx build/rwkv4-169m-int4-b128.onnx build/rwkv4-169m-int8d.onnx --threads 2 --rounds 3 --batches 1,4,16,32 --step-graph --chunk 128 \
	    $(if $(RWKVCPP),--rwkvcpp $(RWKVCPP)) --json build/bench.json
	$(BIN)/python scripts/bench_memory.py build/rwkv4-169m.onnx build/rwkv4-169m-int8.onnx build/rwkv4-169m-int4.onnx \
	    build/rwkv4-169m-int8d.onnx
	# constrained decoding: a JSON schema on every row vs none, batch 1 and 32 (World vocabulary: RWKV-7 0.1B shape)
	$(BIN)/python scripts/make_169m.py --version 7 -o build/rwkv7-169m-random.pth
	$(BIN)/rwkv-export export build/rwkv7-169m-random.pth -o build/rwkv7-169m-world.onnx --tokenizer world --external-data -q
	$(BIN)/python scripts/bench_constraints.py build/rwkv7-169m-world.onnx --batches 1,32 --threads 2 --rounds 3 \
	    --json build/bench-constraints.json
	# the sampler's draw over 65,536 logits: as shipped, sorting everything (peer), one pass (ceiling)
	$(BIN)/python scripts/bench_sampling.py --rounds 5 --json build/bench-sampling.json
	cd js && node bench/sampling-bench.mjs 5

## bench-quant: weight formats for CPU side by side (speed at batch 1 and 32, cross-entropy cost); not in CI
bench-quant: $(BIN)/.installed
	mkdir -p build
	$(BIN)/python scripts/make_169m.py -o build/rwkv4-169m-random.pth
	$(BIN)/rwkv-export export build/rwkv4-169m-random.pth -o build/rwkv4-169m.onnx --tokenizer none --external-data -q
	$(BIN)/python scripts/bench_quant_variants.py --speed build/rwkv4-169m.onnx --rounds 3 --work build/quant-variants \
	    --json build/bench-quant.json

## llamacpp: llama.cpp (CPU-only, -march=native) built from the llama-cpp-python source package on PyPI
##           (it vendors llama.cpp) into build/llamacpp/{src,build}; never committed
LLAMACPP := build/llamacpp
$(LLAMACPP)/build/bin/llama-bench: | $(BIN)/.installed
	mkdir -p $(LLAMACPP)/sdist
	$(BIN)/python -m pip download -q --no-deps --no-binary :all: llama-cpp-python -d $(LLAMACPP)/sdist
	rm -rf $(LLAMACPP)/src $(LLAMACPP)/unpack && mkdir -p $(LLAMACPP)/unpack
	tar xzf $$(ls $(LLAMACPP)/sdist/llama_cpp_python-*.tar.gz | tail -1) -C $(LLAMACPP)/unpack
	mv $(LLAMACPP)/unpack/llama_cpp_python-*/vendor/llama.cpp $(LLAMACPP)/src && rm -rf $(LLAMACPP)/unpack
	cmake -S $(LLAMACPP)/src -B $(LLAMACPP)/build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
	    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF
	cmake --build $(LLAMACPP)/build -j --target llama-bench llama-quantize

llamacpp: $(LLAMACPP)/build/bin/llama-bench

## bench-llama: RWKV-7 0.1B and 0.4B shapes against llama.cpp (F32/Q8_0/Q4_0/Q4_K_M vs fp32/int8/int4): decode,
##              prefill 512, peak RSS, disk, export vs convert+quantize time; the same weights in both (issue #30)
bench-llama: $(BIN)/.installed llamacpp
	$(BIN)/python scripts/bench_llamacpp.py --shapes 0.1b,0.4b --threads 2 --rounds 3 --json build/bench-llamacpp.json

## bench-scale: billion-parameter RWKV-7 shapes (export/load memory, disk, decode vs ceiling); heavy, not in CI
bench-scale: $(BIN)/.installed
	mkdir -p build
	$(BIN)/python scripts/bench_scale.py --shapes 0.4b,1.5b --precisions fp32 --dir build/scale --json build/bench-scale.json
	$(BIN)/python scripts/bench_scale.py --shapes 0.4b --precisions fp16,int8 --dir build/scale --json build/bench-scale-low.json

clean:
	rm -rf build

.PHONY: venv demo test test-fast test-slow test-edge test-kernels test-shared lint ci bench bench-quant bench-scale bench-llama llamacpp clean web-assets
