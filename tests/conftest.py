"""Shared fixtures: the reference models in ../shared (skipped with a reason where absent) and
session-scoped exports so each test file does not re-export."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# BlinkDL's `rwkv` package reads these at import time: plain PyTorch on the CPU
os.environ.setdefault("RWKV_JIT_ON", "0")
os.environ.setdefault("RWKV_CUDA_ON", "0")

# Property-based tests (hypothesis) run a fixed, reproducible set of examples by default, so CI cannot
# pass or fail by luck; HYPOTHESIS_PROFILE=explore draws fresh examples on every run (local bug hunting).
try:
    from hypothesis import settings as _hsettings

    _hsettings.register_profile("ci", derandomize=True, print_blob=True)
    _hsettings.register_profile("explore", derandomize=False)
    _hsettings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # hypothesis is a dev dependency; its tests skip without it
    pass

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REF = SHARED / "reference" / "models"
PROMPTS = {"in": b'"in', "atom": b"Describe the structure of an atom."}


def ref_model(name: str) -> Path:
    p = REF / f"{name}.pth"
    if not p.is_file():
        pytest.skip(f"reference model {p} not available (../shared/reference is absent)")
    return p


def ref_logits(name: str, prompt: str) -> np.ndarray:
    return np.load(REF / f"{name}.blinkdl-logits-{prompt}.npy")


@pytest.fixture(scope="session")
def rwkv4_ref() -> Path:
    return ref_model("tiny-rwkv-4v0-660K")


@pytest.fixture(scope="session")
def rwkv4_exports(rwkv4_ref, tmp_path_factory) -> dict:
    """The RWKV-4 reference model exported in plain and plugin mode (step + sequence graphs)."""
    from rwkv_export.export import ExportOptions, export

    out = {}
    d = tmp_path_factory.mktemp("rwkv4")
    for wkv in ("plain", "plugin"):
        paths = export(rwkv4_ref, d / f"tiny4-{wkv}.onnx", ExportOptions(wkv=wkv))
        out[wkv] = paths[0]
    return out
