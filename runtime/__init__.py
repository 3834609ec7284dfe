"""rwkv_runtime: run exported RWKV models with numpy + onnxruntime (TensorRT optional). No torch."""

from .errors import BackendUnavailable, RuntimeUserError
from .manifest import Manifest, StateSpec

__version__ = "0.1.0"
from .artifact import Artifact, open_artifact, read_manifest
from .backend import Backend
from .batch import BatchGenerator, prefill_many
from .sampling import Sampler, SamplingParams
from .session import Generation, Session
from .state import State

__all__ = [
    "Session",
    "State",
    "Generation",
    "BatchGenerator",
    "prefill_many",
    "Manifest",
    "StateSpec",
    "SamplingParams",
    "Sampler",
    "read_manifest",
    "open_artifact",
    "Artifact",
    "Backend",
    "RuntimeUserError",
    "BackendUnavailable",
]
