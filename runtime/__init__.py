"""rwkv_runtime: run exported RWKV models with numpy + onnxruntime (TensorRT optional). No torch."""
from .errors import BackendUnavailable, RuntimeUserError
from .manifest import Manifest, StateSpec

__version__ = "0.1.0"
from .sampling import Sampler, SamplingParams
from .session import Session, State, read_manifest

__all__ = ["Session", "State", "Manifest", "StateSpec", "SamplingParams", "Sampler", "read_manifest",
           "RuntimeUserError", "BackendUnavailable"]
