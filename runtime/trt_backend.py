"""``rwkv_runtime.trt_backend``: the TensorRT backend's public names, kept importable here.

The code lives in ``rwkv_runtime.tensorrt`` (loader / memory / runner / backend); the engine sidecar
is read by ``rwkv_runtime.artifact`` (the one artifact reader).
"""
from .artifact import (ENGINE_SUFFIXES, SIDECAR_FORMAT, SIDECAR_VERSION, read_engine_initial_state,
                       read_engine_manifest, read_sidecar, sidecar_path)
from .tensorrt import (CUDA_INSTALL_HINT, GRAPHS_ENV, MIN_TRT_MAJOR, PLUGIN_ENV, RWKV_PLUGIN_LIBRARY, TRT_INSTALL_HINT,
                       VERBOSE_ENV, DeviceTensor, TensorRTError, TrtBackend, import_cuda_core, import_tensorrt,
                       load_plugin_library, plugin_candidates, trt_logger)

__all__ = ["ENGINE_SUFFIXES", "SIDECAR_FORMAT", "SIDECAR_VERSION", "sidecar_path", "read_sidecar",
           "read_engine_manifest", "read_engine_initial_state", "TrtBackend", "TensorRTError", "DeviceTensor",
           "import_tensorrt", "import_cuda_core", "trt_logger", "load_plugin_library", "plugin_candidates",
           "PLUGIN_ENV", "GRAPHS_ENV", "VERBOSE_ENV", "MIN_TRT_MAJOR", "RWKV_PLUGIN_LIBRARY", "TRT_INSTALL_HINT",
           "CUDA_INSTALL_HINT"]
