"""The per-version contract (``ArchSpec``) and the one table of supported RWKV versions.

Every version module (rwkv4.py, rwkv5.py, ...) ends with ``SPEC = ArchSpec(...)`` (or ``ArchSpec.of``); ``REGISTRY`` below
lists those modules in the order their key patterns are tried. The exporter, the validator and the
checkpoint loader use only what an ``ArchSpec`` declares. docs/adding-a-version.md walks through
adding one.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import UnsupportedArchitecture

# Modules holding a SPEC (a bare name: a module of this package), in the order their ``detect`` is tried: the first match wins (RWKV-6 and -7
# checkpoints also carry att.ln_x, which marks RWKV-5; RWKV-5.0/5.1 carry time_first, which marks RWKV-4).
REGISTRY = ("rwkv7", "rwkv6", "rwkv5", "rwkv4")


@dataclass(frozen=True)
class ArchSpec:
    """What one RWKV version provides. ``cfg`` is the plain dict ``config_from_weights`` returns
    (n_layer, n_embd, vocab_size, ffn_dim, and the version's own sizes); ``w`` is a checkpoint's
    tensors in BlinkDL naming (float32 torch tensors)."""

    name: str  # "RWKV-4": what messages call it
    versions: tuple  # the manifest's architecture strings it covers ("rwkv5", "rwkv5.2")
    detect: Callable  # (w) -> one of ``versions`` when the keys are this version's, else None
    config_from_weights: Callable  # (w, hf_config | None) -> cfg; checks every key and shape
    export_weights: Callable  # (w, cfg) -> {name: np.ndarray} as the graph builder reads them
    state_layout: Callable  # (cfg) -> [StateSpec]: the recurrent state, generated from one layout
    Model: type  # reference (torch): Model.from_weights(w, cfg); .new_state(B), .step, .sequence
    build_graph: Callable  # (GraphBuilder, W, cfg, GraphOptions) -> None: step or sequence graph
    default_tokenizer: Callable  # (cfg) -> the manifest's tokenizer entry
    load_state_tuning: Callable | None = None  # (path or dict, cfg) -> {state name: [1,...]}; None: no learned state
    half_rescale_every: int = 0  # residual rescaling by default in float16/bfloat16 (RWKV-4: 6)

    @classmethod
    def of(cls, module: str, name: str, versions: tuple, **fields) -> ArchSpec:
        """The spec of version module ``module`` (its ``__name__``) from its own functions and classes
        named as the fields above (``detect``, ``config_from_weights``, ... ``Model``, ``build_graph``;
        ``load_state_tuning`` where it has one; ``default_tokenizer``: ``keys.default_tokenizer``
        unless it has its own). ``fields``: any field given explicitly instead."""
        from .keys import default_tokenizer

        ns = {"default_tokenizer": default_tokenizer, **vars(sys.modules[module])}
        own = ("detect", "config_from_weights", "export_weights", "state_layout", "Model", "build_graph")
        found = {f: ns[f] for f in own + ("default_tokenizer",)} | {f: ns[f] for f in ("load_state_tuning",) if f in ns}
        return cls(name=name, versions=versions, **(found | fields))


def specs() -> list:
    """Every registered spec, in detection order (imports the version modules: torch)."""
    return [importlib.import_module(m if "." in m else f"{__name__}.{m}").SPEC for m in REGISTRY]


def detect(w: dict) -> str:
    """The architecture string of a checkpoint's tensors (BlinkDL naming)."""
    from ..errors import CheckpointError

    for spec in specs():
        version = spec.detect(w)
        if version:
            return version
    keys = sorted(w)
    raise CheckpointError(
        "not an RWKV checkpoint: no emb.weight / blocks.N.att.* keys found "
        f"(first keys: {', '.join(keys[:5]) or 'none'})"
    )


def get(version: str) -> ArchSpec:
    """The spec covering an architecture string (as in a manifest or from ``detect``)."""
    for spec in specs():
        if version in spec.versions:
            return spec
    supported = ", ".join(s.name for s in specs())
    raise UnsupportedArchitecture(
        f"architecture {version!r} is not supported by this exporter (supported: {supported})"
    )
