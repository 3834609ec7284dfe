"""Helpers shared by the exporter reliability tests: what "the old set" and "the new set" of an
export folder are, checked against BlinkDL's logits for the model each set came from."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from ..conftest import REF, ref_logits, ref_model

OLD, NEW = "golden-rwkv7", "golden-rwkv6"  # two models with different logits


def snapshot(d: Path) -> dict:
    """Every entry of a folder: name -> sha256 of the bytes (directories as 'dir')."""
    out = {}
    for p in sorted(d.iterdir()):
        out[p.name] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def check_runs_as(model: Path, name: str):
    """The runtime accepts ``model`` and both graphs compute ``name``'s logits (BlinkDL's)."""
    from rwkv_runtime import Session

    want = ref_logits(name, "in")[-1]
    s = Session(model)
    logits, _ = s.prefill(list(b'"in'))
    np.testing.assert_allclose(np.asarray(logits).reshape(-1), want, atol=2e-4)
    st = s.new_state()
    for t in b'"in':
        logits, st = s.step(t, st)
    np.testing.assert_allclose(np.asarray(logits).reshape(-1), want, atol=2e-4)


def assert_old_or_new(d: Path, old: dict, out: Path) -> str:
    """The folder holds exactly the old set (byte for byte) or a complete new set; returns which."""
    now = snapshot(d)
    if now == old:
        check_runs_as(out, OLD)
        return "old"
    from rwkv_export.export import load_manifest

    assert set(now) == set(old), f"files differ from both sets: {sorted(now)} vs {sorted(old)}"
    ids = {load_manifest(d / n).export_id for n in now if n.endswith(".onnx")}
    assert len(ids) == 1, "graphs of different exports side by side"
    assert all(now[n] != old[n] for n in now), "a file of the old set beside new ones"
    check_runs_as(out, NEW)
    return "new"


@pytest.fixture(scope="session")
def old_and_new():
    if not (REF / f"{OLD}.pth").is_file():
        pytest.skip("reference models absent")
    return ref_model(OLD), ref_model(NEW)
