"""rwkv_runtime: run exported RWKV models with numpy + onnxruntime (TensorRT optional). No torch."""
from .errors import BackendUnavailable, RuntimeUserError
from .manifest import Manifest, StateSpec

__version__ = "0.1.0"
