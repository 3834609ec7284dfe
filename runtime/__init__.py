"""rwkv_runtime: run exported RWKV models with numpy + onnxruntime (TensorRT optional). No torch."""
from .errors import BackendUnavailable, RuntimeUserError
from .manifest import Manifest, StateSpec

__version__ = "0.1.0"
from .sampling import Sampler, SamplingParams
from .batch import BatchGenerator, prefill_many
from .session import Session, State, read_manifest

__all__ = ["Session", "State", "BatchGenerator", "prefill_many", "Manifest", "StateSpec", "SamplingParams", "Sampler", "read_manifest",
           "RuntimeUserError", "BackendUnavailable"]
