"""The two sides of the comparison as Polygraphy runners: the PyTorch reference (``reference_runner``) and
the export (``backend_runner``: onnxruntime through ``OnnxrtRunner`` around our own session, or TensorRT
through ``TrtRunner`` around the engine that ``targets.tensorrt.loader.EngineLoader`` -- the one engine
loader, ``build-engine``'s too -- builds with validate's profile: batch 1, 1..chunk tokens per call)."""

from __future__ import annotations

import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from rwkv_runtime.errors import BackendUnavailable

from .target import DEFAULT_CHUNK, Target, ValidationError

REFERENCE_RUNNER = "pytorch-reference"


def load_reference(checkpoint, manifest):
    """The PyTorch reference model for ``checkpoint``, checked to be the one ``manifest`` was exported from."""
    from .. import arch
    from ..checkpoint import load_checkpoint

    ck = load_checkpoint(checkpoint)
    spec = arch.get(ck.version)
    cfg = spec.config_from_weights(ck.weights, ck.hf_config)
    got = (ck.version, cfg["n_layer"], cfg["n_embd"], cfg["vocab_size"])
    want = (manifest.architecture, manifest.n_layer, manifest.n_embd, manifest.vocab_size)
    if got != want:
        raise ValidationError(
            f"--reference {Path(checkpoint).name} is {got[0]} with {got[1]} layers, n_embd {got[2]}, "
            f"vocab {got[3]}; the model is {want[0]} with {want[1]}, {want[2]}, {want[3]}: "
            "not its checkpoint"
        )
    return spec.Model.from_weights(ck.weights, cfg)


def reference_runner(model, manifest):
    """A Polygraphy runner (``BaseRunner``) that runs the PyTorch reference on ONNX-style feeds.

    Its inputs and outputs are named as the exported graph's (``tokens``, ``state.{i}.{field}`` ->
    ``logits``, ``new_state.{i}.{field}``), so Polygraphy compares the two output by output.
    """
    import torch
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    seq = manifest.graph == "sequence"
    last_only = seq and not manifest.options.get("all_logits")

    class TorchReferenceRunner(BaseRunner):
        def __init__(self):
            super().__init__(name=REFERENCE_RUNNER)

        def get_input_metadata_impl(self):
            meta = TensorMetadata()
            meta.add(manifest.tokens_input, np.int64, ["batch", "T"] if seq else ["batch"])
            for s in manifest.state:
                meta.add(s.name, np.float32, list(s.shape))
            return meta

        def infer_impl(self, feed_dict):
            start = time.perf_counter()
            tokens = torch.from_numpy(np.asarray(feed_dict[manifest.tokens_input], dtype=np.int64))
            state = {s.name: torch.from_numpy(np.asarray(feed_dict[s.name], dtype=np.float32)) for s in manifest.state}
            with torch.no_grad():
                logits, new = model.sequence(tokens, state) if seq else model.step(tokens, state)
            if last_only:
                logits = logits[:, -1]
            out = OrderedDict([(manifest.logits_output, logits.float().numpy().copy())])
            for s in manifest.state:
                out[s.output] = new[s.name].float().numpy().copy()
            self.inference_time = time.perf_counter() - start
            return out

    return TorchReferenceRunner()


def backend_runner(target: Target, backend: str, plugins=(), chunk: int = DEFAULT_CHUNK):
    if backend == "onnxruntime":
        return _onnxrt_runner(target)
    if backend == "tensorrt":
        return _trt_runner(target, plugins, chunk)
    raise ValidationError(f"--backend must be onnxruntime or tensorrt, not {backend!r}")


def _onnxrt_runner(target: Target):
    import onnxruntime as ort
    from polygraphy.backend.onnxrt import OnnxrtRunner

    if target.is_engine:
        raise ValidationError(f"{target.path.name} is a TensorRT engine: use --backend tensorrt")
    if target.manifest.precision == "bf16":
        raise ValidationError(
            f"{target.path.name} is a bfloat16 export: onnxruntime's CPU provider has no bfloat16 "
            "MatMul; validate it with --backend tensorrt"
        )
    try:
        # our own session: plugin-mode graphs run as they are (their rwkv:: nodes are model-local functions)
        sess = ort.InferenceSession(str(target.path), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ValidationError(
            f"{target.path.name}: onnxruntime could not load it ({str(e).splitlines()[0][:160]})"
        ) from None
    return OnnxrtRunner(sess, name=f"onnxrt-{target.path.name}")


def require_tensorrt():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        raise BackendUnavailable(
            "--backend tensorrt needs TensorRT's Python package: pip install tensorrt "
            "(NVIDIA's wheels, with a CUDA GPU), or pip install 'rwkv-export[tensorrt]'"
        ) from None


def plugin_libraries(target: Target, plugins=()) -> list:
    """The plugin libraries a TensorRT run loads: ``--plugin``, else the ones an engine's sidecar records,
    else (a plugin-mode export) the built one; each checked to exist."""
    libs = [str(p) for p in plugins] or list(target.plugins)
    if not libs and target.manifest.wkv == "plugin":
        from ..targets.tensorrt.plugin import find_plugin

        found = find_plugin()
        if found is None:
            raise ValidationError(
                f"{target.path.name} is a plugin-mode export: pass --plugin with the TensorRT plugin "
                "library (or build it, or set RWKV_TRT_PLUGIN)"
            )
        libs = [str(found)]
    for lib in libs:
        if not Path(lib).is_file():
            raise ValidationError(f"--plugin {lib}: no such file")
    return libs


def _trt_runner(target: Target, plugins, chunk: int):
    """Polygraphy's ``TrtRunner`` around the engine: deserialized once, reused by both checks."""
    require_tensorrt()
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    engine = EngineFromBytes(engine_bytes(target, plugin_libraries(target, plugins), chunk))()
    return TrtRunner(engine, name=f"trt-{target.path.name}")


def engine_bytes(target: Target, libs: list, chunk: int):
    """The serialized engine: the plugins registered first (``EngineLoader``: TensorRT imported, then
    ``load_library``, or a dlopen for the autoregister library; Polygraphy's ``LoadPlugins`` would only
    dlopen, before TensorRT is there: docs/validation.md), then the engine file's bytes, or the ONNX file
    built by the one engine loader with ``Profile.for_validation(chunk)``."""
    from ..targets.tensorrt.loader import EngineLoader, Profile, custom_ops

    ops = [] if target.is_engine else custom_ops(target.path)
    loader = EngineLoader(libs, bool(ops), echo=lambda m: print(m, file=sys.stderr), dlopen=True)
    if target.is_engine:
        return target.path.read_bytes()
    built = loader.build(
        target.path,
        target.manifest,
        Profile.for_validation(chunk),
        expect_plugins=loader.expects_plugin_layers(ops, target.path.name),
    )
    return bytes(memoryview(built.serialized))
