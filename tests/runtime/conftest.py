"""Fixtures for the runtime tests: a tiny export copied per test, and a tool to rewrite its manifest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest


def copy_export(src: Path, dst_dir: Path) -> Path:
    """Copy a step graph and its companions into dst_dir; returns the new step graph path."""
    from rwkv_runtime import read_manifest

    man, _ = read_manifest(src)
    dst_dir.mkdir(parents=True, exist_ok=True)
    for name in {src.name, *man.companions.values()}:
        for p in src.parent.glob(name + "*"):  # the graph and any external data beside it
            shutil.copy(p, dst_dir / p.name)
    return dst_dir / src.name


def set_metadata(path: Path, key: str, value: str | None) -> None:
    """Rewrite (or with None remove) one metadata_props entry of an ONNX file in place."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in m.metadata_props}
    if value is None:
        props.pop(key, None)
    else:
        props[key] = value
    del m.metadata_props[:]
    for k, v in props.items():
        m.metadata_props.add(key=k, value=v)
    onnx.save(m, str(path))


def manifest_dict(path: Path) -> dict:
    from rwkv_runtime.artifact import read_onnx_metadata

    return json.loads(read_onnx_metadata(path)["rwkv.manifest"])


def write_manifest(path: Path, d) -> None:
    set_metadata(path, "rwkv.manifest", d if isinstance(d, str) else json.dumps(d))


@pytest.fixture
def tiny(rwkv4_exports, tmp_path) -> Path:
    """A private copy of the tiny RWKV-4 export (step + sequence graphs) that a test may damage."""
    return copy_export(rwkv4_exports["plain"], tmp_path / "m")


@pytest.fixture(scope="module")
def tiny_session(rwkv4_exports):
    from rwkv_runtime import Session

    return Session(rwkv4_exports["plain"])
