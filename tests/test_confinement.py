"""Every command refuses a model whose files name a path outside the model's folder (issue #24): one
`Error:` line, exit 1, and neither onnxruntime, TensorRT's parser nor onnx's loader ever opens the model.

The check lives once, in rwkv_runtime.artifact.open_artifact (the one artifact reader); this test is the
proof that each command goes through it before anything loads the graph."""

from __future__ import annotations

import shutil

import onnx
import pytest
from click.testing import CliRunner

from rwkv_export.cli import main


@pytest.fixture(scope="module")
def escaping(rwkv4_ref, tmp_path_factory):
    """An export (weights in a separate file) whose graphs name '../secret.bin' as their external data, with
    a file there: a reader that followed the location would find data."""
    from rwkv_export.export import ExportOptions, export

    root = tmp_path_factory.mktemp("escape")
    (root / "m").mkdir()
    step, seq = export(rwkv4_ref, root / "m" / "e.onnx", ExportOptions(external_data=True))
    shutil.copyfile(step.with_name("e.onnx.data"), root / "secret.bin")
    for g in (step, seq):
        m = onnx.load(str(g), load_external_data=False)
        for t in m.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = "../secret.bin"
        onnx.save(m, str(g))
    step.with_name("e.onnx.data").unlink()
    return step


@pytest.mark.parametrize(
    "args",
    [
        ["inspect", "{m}"],
        ["generate", "{m}", "--prompt", "hi", "-n", "2"],
        ["validate", "{m}", "--reference", "{ref}", "--steps", "2"],
        ["bench", "{m}"],
        ["build-engine", "{m}", "-o", "{out}/m.engine"],
        ["triton", "{m}", "-o", "{out}/repo"],
        ["web", "{m}", "-o", "{out}/web"],
        ["mobile", "{m}", "-o", "{out}/mobile"],
        ["serve", "{m}", "--port", "0"],
    ],
    ids=lambda a: a[0],
)
def test_every_command_refuses_before_loading(escaping, rwkv4_ref, tmp_path, monkeypatch, args):
    import importlib.util

    import onnxruntime

    if args[0] == "build-engine" and importlib.util.find_spec("tensorrt") is None:
        pytest.skip("build-engine asks for TensorRT before it reads the model; not installed here")
    loaded = []

    def refuse(*a, **k):
        loaded.append(a)
        raise AssertionError("a model with escaping external data reached a loader")

    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)
    monkeypatch.setattr(onnx, "load", refuse)
    monkeypatch.setattr(onnx, "load_model", refuse)
    argv = [a.format(m=escaping, ref=rwkv4_ref, out=tmp_path) for a in args]
    r = CliRunner().invoke(main, argv)
    assert r.exit_code == 1, r.output
    assert r.output.startswith("Error: e.onnx: external data file '../secret.bin' is outside the model's folder")
    assert r.output.count("\n") == 1 and not loaded
    assert sorted(tmp_path.iterdir()) == []  # nothing written
