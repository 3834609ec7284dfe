"""Exports shared by the Triton tests: RWKV-4 (pp = -1e30), RWKV-7 ([H, N, N] states), a state-tuned RWKV-6."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from ..conftest import REPO, ref_model
from ..helpers import random_state_tuning


def _load_example(name: str, path):
    """Import a deploy_examples script by path. (Putting deploy_examples/ on sys.path would make its
    triton/ folder importable as `triton`, which torch and transformers then take for OpenAI's Triton.)"""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_load_example("triton_client", REPO / "deploy_examples" / "triton_client.py")
_load_example("local_server", REPO / "deploy_examples" / "triton" / "local_server.py")


@pytest.fixture(scope="session")
def triton_exports(tmp_path_factory) -> dict:
    """{"rwkv4"|"rwkv7"|"tuned6": step graph path}; rwkv4 also has its sequence graph."""
    from rwkv_export.export import ExportOptions, export

    d = tmp_path_factory.mktemp("triton-exports")
    out = {
        "rwkv4": export(ref_model("golden-rwkv4"), d / "tiny4.onnx")[0],
        "rwkv7": export(ref_model("golden-rwkv7"), d / "tiny7.onnx", ExportOptions(graphs=("step",)))[0],
    }
    base = ref_model("golden-rwkv6")
    random_state_tuning(base, d / "tuning.pth", seed=1)
    out["tuned6"] = export(
        base, d / "tuned6.onnx", ExportOptions(graphs=("step",), state_tuning=str(d / "tuning.pth"))
    )[0]
    return out
