"""The contract between ``Session`` and an execution backend (onnxruntime, TensorRT).

``Session`` validates every user input (tokens, states, sizes) and depends on nothing but this protocol;
a backend only moves tensors and runs graphs. Backends: ``ort_backend.OrtBackend``,
``rwkv_runtime.tensorrt.TrtBackend``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from .manifest import Manifest


@runtime_checkable
class Backend(Protocol):
    manifest: Manifest
    """The manifest of the artifact the backend runs (already validated)."""

    device: str
    """Where state values live: ``"cpu"`` or ``"cuda"``."""

    def has(self, kind: str) -> bool:
        """Whether this export has a ``kind`` graph (``"step"`` or ``"sequence"``) the backend can run.
        Cheap (asked on every step)."""

    def from_numpy(self, arr: np.ndarray) -> Any:
        """A backend value holding a *copy* of ``arr`` (the caller may change ``arr`` afterwards)."""

    def to_numpy(self, value: Any) -> np.ndarray:
        """The contents of a backend value on the host. May be a view: ``State`` copies it before handing
        it to a user."""

    def run(self, kind: str, tokens: np.ndarray, values: dict, specs: list) -> tuple[np.ndarray, dict]:
        """Run the ``kind`` graph once.

        ``tokens``: int64 [B] (step) or [B, T] (sequence), already checked against the vocabulary;
        ``values``: {state name: backend value}, the input state (never written to);
        ``specs``: the manifest's StateSpecs, in order.
        Returns (logits float32 on the host, a new array the caller owns: [B, V], or [B, T, V] for a
        sequence graph exported with all logits; {state name: new backend value}). The new values must
        not share memory with any value a live ``State`` refers to.
        """
