"""One module per RWKV version: its reference math, state layout and ONNX graph.

Each module provides ``config_from_weights``, ``state_layout``, ``Model`` (PyTorch reference with
``step``/``sequence``/``new_state``), ``export_weights``, ``build_graph`` and ``default_tokenizer``.
"""
from __future__ import annotations

import importlib

from ..errors import UnsupportedArchitecture

# version string (as detected from checkpoint keys) -> module name
MODULES = {"rwkv4": "rwkv4", "rwkv5": "rwkv5", "rwkv5.2": "rwkv5", "rwkv6": "rwkv6", "rwkv7": "rwkv7"}
KNOWN = ("rwkv4", "rwkv5", "rwkv5.2", "rwkv6", "rwkv7")


def get(version: str):
    if version not in MODULES:
        pretty = version.replace("rwkv", "RWKV-")
        raise UnsupportedArchitecture(
            f"{pretty} checkpoint recognised, but {pretty} is not supported yet by this exporter "
            f"(supported: {', '.join(v.replace('rwkv', 'RWKV-') for v in MODULES)})")
    return importlib.import_module(f"{__name__}.{MODULES[version]}")
