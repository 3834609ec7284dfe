"""Exports shared by the Triton tests: RWKV-4 (pp = -1e30), RWKV-7 ([H, N, N] states), a state-tuned RWKV-6."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ..conftest import REPO, ref_model

sys.path.insert(0, str(REPO / "deploy_examples"))  # triton_client
sys.path.insert(0, str(REPO / "deploy_examples" / "triton"))  # local_server


@pytest.fixture(scope="session")
def triton_exports(tmp_path_factory) -> dict:
    """{"rwkv4"|"rwkv7"|"tuned6": step graph path}; rwkv4 also has its sequence graph."""
    from rwkv_export.arch import rwkv6
    from rwkv_export.checkpoint import load_checkpoint
    from rwkv_export.export import ExportOptions, export

    d = tmp_path_factory.mktemp("triton-exports")
    out = {"rwkv4": export(ref_model("tiny-rwkv-4v0-660K"), d / "tiny4.onnx")[0],
           "rwkv7": export(ref_model("tiny-rwkv-7v0-834K"), d / "tiny7.onnx", ExportOptions(graphs=("step",)))[0]}
    base = ref_model("tiny-rwkv-6v0-1m")
    cfg = rwkv6.config_from_weights(load_checkpoint(base).weights)
    g = torch.Generator().manual_seed(1)
    ts = {f"blocks.{i}.att.time_state": torch.randn(cfg["n_head"], cfg["head_size"], cfg["head_size"], generator=g) * 0.3
          for i in range(cfg["n_layer"])}
    torch.save(ts, d / "tuning.pth")
    out["tuned6"] = export(base, d / "tuned6.onnx",
                           ExportOptions(graphs=("step",), state_tuning=str(d / "tuning.pth")))[0]
    return out
