"""TensorRT backend for ``rwkv_runtime.Session``: ``.engine`` / ``.plan`` / ``.trt`` files.

Needs ``tensorrt`` (>= 10) and NVIDIA's ``cuda.core`` (the ``[tensorrt]`` extra); never torch, never
the exporter. An engine travels with a JSON sidecar ``MODEL.engine.json`` written by ``rwkv-export
build-engine`` (read by ``rwkv_runtime.artifact``): the manifest, the tokenizer JSON, a learned initial
state, and the plugin libraries the engine needs (found by ``loader.plugin_candidates``).

Buffers (see docs/tensorrt.md):

- The recurrent state lives on the GPU. A backend value is a ``DeviceTensor``: a view (offset, shape,
  dtype) into a device Buffer it keeps alive. A run writes all its output state tensors into one
  Buffer (a *state set*) laid out per batch size.
- Double buffering: a run never writes into memory a live value refers to. A set goes back to a small
  free list only when the last value using it is garbage-collected. In the usual loop ``logits, st =
  s.step(t, st)`` the old state is dropped each step, so two sets per batch size alternate and the
  state never goes through the host; a state the caller still holds keeps its set.
- Tokens and logits go through pinned host buffers, copied on the backend's stream around
  ``execute_async_v3``; every run ends with a stream synchronisation.
- ``cuda_graphs=True`` (or ``RWKV_TRT_CUDA_GRAPHS=1``): the step (token copy, engine, logits copy) is
  captured per batch size and per (input set, output set) addresses, on an execution context of its
  own for that batch size -- two graphs per batch size in the double-buffered loop. A key is captured
  the second time it is seen (the first run is TensorRT's warm-up). If capture fails, that batch size
  runs without graphs.

Modules: ``loader`` (imports, logger, plugin libraries), ``memory`` (cuda.core device/stream/buffers,
the state-set pool), ``runner`` (one engine and its contexts), ``backend`` (``TrtBackend``).
"""

from .backend import TrtBackend
from .loader import (
    CUDA_INSTALL_HINT,
    GRAPHS_ENV,
    MIN_TRT_MAJOR,
    PLUGIN_ENV,
    RWKV_PLUGIN_LIBRARY,
    TRT_INSTALL_HINT,
    VERBOSE_ENV,
    TensorRTError,
    import_cuda_core,
    import_tensorrt,
    load_plugin_library,
    plugin_candidates,
    trt_logger,
)
from .memory import DeviceTensor

__all__ = [
    "TrtBackend",
    "TensorRTError",
    "DeviceTensor",
    "import_tensorrt",
    "import_cuda_core",
    "trt_logger",
    "load_plugin_library",
    "plugin_candidates",
    "PLUGIN_ENV",
    "GRAPHS_ENV",
    "VERBOSE_ENV",
    "MIN_TRT_MAJOR",
    "RWKV_PLUGIN_LIBRARY",
    "TRT_INSTALL_HINT",
    "CUDA_INSTALL_HINT",
]
