"""State files (issue #24): ``Session.save_state`` never replaces the model's own files (a path naming
the graph, its companion or weights file, directly or through a link, is refused and the file kept), and
``State.save`` is all or nothing through ``rwkv_runtime.safe_write``."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest

from rwkv_runtime import RuntimeUserError, Session


@pytest.fixture
def external(tmp_path):
    from rwkv_export.export import ExportOptions, export

    from ..conftest import ref_model

    return export(ref_model("golden-rwkv7"), tmp_path / "m.onnx", ExportOptions(external_data=True))[0]


def test_save_state_refuses_the_models_own_files(external, tmp_path):
    s = Session(external)
    st = s.new_state()
    files = [external, tmp_path / "m.seq.onnx", tmp_path / "m.onnx.data"]
    before = {p: p.read_bytes() for p in files}
    os.link(external, tmp_path / "hard.onnx")
    os.symlink(tmp_path / "m.onnx.data", tmp_path / "soft.npz")
    for p in files + [tmp_path / "hard.onnx", tmp_path / "soft.npz", tmp_path / "." / "m.onnx"]:
        with pytest.raises(RuntimeUserError, match="is one of the model's files"):
            s.save_state(st, p)
    assert {p: p.read_bytes() for p in files} == before
    s.save_state(st, tmp_path / "s.npz")  # an ordinary path still works, and loads back
    np.testing.assert_array_equal(
        s.load_state(tmp_path / "s.npz").numpy()[s.manifest.state[0].name], st.numpy()[s.manifest.state[0].name]
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".rwkv-export-")]


@pytest.mark.parametrize("fail", ["write", "replace", "interrupt"])
def test_state_save_failure_keeps_the_old_file(external, tmp_path, monkeypatch, fail):
    s = Session(external)
    target = tmp_path / "s.npz"
    target.write_bytes(b"old state")
    if fail == "write":

        def savez(f, **kw):
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(np, "savez", savez)
    else:
        real = os.replace

        def replace(a, b):
            if Path(b) == target and not str(a).endswith("/old/0"):
                raise OSError(errno.ENOSPC, "No space") if fail == "replace" else KeyboardInterrupt()
            return real(a, b)

        monkeypatch.setattr(os, "replace", replace)
    with pytest.raises((RuntimeUserError, KeyboardInterrupt)):
        s.save_state(s.new_state(), target)
    assert target.read_bytes() == b"old state"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data", "m.seq.onnx", "s.npz"]
