"""The manifest: the contract between the exporter and the runtime.

The exporter writes it as JSON into the ONNX model's metadata (key ``rwkv.manifest``); the runtime
reads it back and hard-codes nothing about a model: input/output names, every recurrent state tensor
(name, output name, shape with the symbolic ``batch`` axis, dtype, initial value), sizes, tokenizer.
This module must stay importable with numpy alone (no torch, no onnx).
"""
from __future__ import annotations

import base64
import io
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import RuntimeUserError

MANIFEST_KEY = "rwkv.manifest"
TOKENIZER_KEY = "rwkv.tokenizer_json"  # a Hugging Face tokenizer.json travels inside the model
INITIAL_STATE_KEY = "rwkv.initial_state"  # a learned (state-tuned) initial state: base64 of an .npz
FORMAT_VERSION = 1
BATCH = "batch"  # the symbolic batch axis in state shapes


@dataclass
class StateSpec:
    """One recurrent state tensor: graph input ``name``, graph output ``output``."""

    name: str
    output: str
    shape: list  # e.g. ["batch", 768]; "batch" is the only symbolic axis
    dtype: str = "float32"
    init: float = 0.0  # fill value of a fresh state (RWKV-4's pp: -1e30)
    layer: int = -1
    doc: str = ""

    def concrete_shape(self, batch_size: int) -> tuple:
        return tuple(batch_size if d == BATCH else int(d) for d in self.shape)


@dataclass
class Manifest:
    architecture: str  # "rwkv4", "rwkv5", "rwkv5.2", "rwkv6", "rwkv7"
    n_layer: int
    n_embd: int
    vocab_size: int
    graph: str = "step"  # "step" (one token) or "sequence" (tokens [batch, T])
    precision: str = "fp32"
    opset: int = 18
    wkv: str = "plain"  # "plain": standard ONNX ops; "plugin": rwkv::WKV* custom nodes (ORT inlines)
    tokenizer: dict = field(default_factory=lambda: {"kind": "bytes"})
    tokens_input: str = "tokens"
    logits_output: str = "logits"
    state: list = field(default_factory=list)  # list[StateSpec]
    dims: dict = field(default_factory=dict)  # architecture-specific sizes (ffn, heads, ...)
    options: dict = field(default_factory=dict)  # e.g. rescale_every, all_logits
    companions: dict = field(default_factory=dict)  # other graphs of the same export, by kind
    source: dict = field(default_factory=dict)  # what was exported (checkpoint name, format)
    initial_state: str = ""  # "embedded" when INITIAL_STATE_KEY holds a learned starting state
    # one id shared by every graph (and engine, and saved state) of one export: binds companions together
    export_id: str = ""
    exporter_version: str = ""
    format_version: int = FORMAT_VERSION

    # -- (de)serialisation -------------------------------------------------------------------
    def to_json(self) -> str:
        d = asdict(self)
        return json.dumps(d, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        """Parse and validate (schema: see artifact.parse_manifest); a damaged manifest is a RuntimeUserError."""
        from .artifact import parse_manifest

        return parse_manifest(text, "manifest")

    # -- helpers -----------------------------------------------------------------------------
    @property
    def state_inputs(self) -> list:
        return [s.name for s in self.state]

    @property
    def state_outputs(self) -> list:
        return [s.output for s in self.state]

    def summary(self) -> dict[str, Any]:
        """A short human-readable view (``rwkv-export inspect``)."""
        return {
            "architecture": self.architecture,
            "graph": self.graph,
            "layers": self.n_layer,
            "n_embd": self.n_embd,
            "vocab": self.vocab_size,
            "precision": self.precision,
            "wkv": self.wkv,
            "tokenizer": self.tokenizer.get("kind"),
            "state tensors": len(self.state),
        }


def encode_state(arrays: dict) -> str:
    """Arrays -> base64 text of an .npz (how a learned initial state travels in the metadata)."""
    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_state(text: str) -> dict:
    """base64 text of an .npz -> arrays (no pickle); damaged text is a RuntimeUserError."""
    import binascii
    import zipfile

    import numpy as np

    try:
        with np.load(io.BytesIO(base64.b64decode(text, validate=True)), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (binascii.Error, ValueError, OSError, EOFError, zipfile.BadZipFile, TypeError) as e:
        raise RuntimeUserError(f"the embedded state is damaged ({str(e)[:80]})") from None
