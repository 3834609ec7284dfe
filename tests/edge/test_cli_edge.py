"""`rwkv-export web` and `rwkv-export mobile`: what they write, that the .ort files compute what the ONNX
export computes (Python onnxruntime, step by step), and one-line errors that leave nothing behind."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from rwkv_export.cli import main
from tests.conftest import ref_logits, ref_model

PROMPT = list(b"Describe the structure of an atom.")


@pytest.fixture(scope="module")
def v7_export(tmp_path_factory):
    from rwkv_export.export import ExportOptions, export

    d = tmp_path_factory.mktemp("edge-cli")
    return export(ref_model("golden-rwkv7"), d / "tiny7.onnx", ExportOptions())[0]


def _ort_steps(path, manifest, tokens):
    """Run an .ort (or .onnx) step graph with plain onnxruntime, feeding the state back."""
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    state = {st["name"]: np.full([1 if d == "batch" else d for d in st["shape"]], st["init"], np.float32)
             for st in manifest["state"]}
    out = []
    for t in tokens:
        res = s.run(None, {manifest["tokens_input"]: np.array([t], np.int64), **state})
        named = dict(zip([o.name for o in s.get_outputs()], res))
        out.append(named[manifest["logits_output"]][0])
        state = {st["name"]: named[st["output"]] for st in manifest["state"]}
    return np.stack(out)


@pytest.mark.slow
def test_mobile_ort_files_match_the_onnx_export(v7_export, tmp_path):
    out = tmp_path / "mobile"
    r = CliRunner().invoke(main, ["mobile", str(v7_export), "-o", str(out)])
    assert r.exit_code == 0, r.output
    names = sorted(p.name for p in out.iterdir())
    assert names == ["required_operators.config", "tiny7.manifest.json", "tiny7.ort", "tiny7.seq.ort"]
    man = json.loads((out / "tiny7.manifest.json").read_text())
    assert man["companions"] == {"step": "tiny7.ort", "sequence": "tiny7.seq.ort"}
    # the ORT format keeps the metadata: the same manifest (companions aside) as the ONNX export
    from rwkv_export.mobile import ort_metadata
    from rwkv_runtime.manifest import MANIFEST_KEY

    inner = json.loads(ort_metadata(out / "tiny7.ort")[MANIFEST_KEY])
    assert inner["export_id"] == man["export_id"] and inner["state"] == man["state"]
    config = (out / "required_operators.config").read_text()
    assert "ai.onnx;" in config and "MatMul" in config
    got = _ort_steps(out / "tiny7.ort", man, PROMPT)
    want = _ort_steps(v7_export, man, PROMPT)
    assert np.abs(got - want).max() <= 1e-5
    assert np.abs(got - ref_logits("golden-rwkv7", "atom")).max() <= 5e-5  # and BlinkDL's logits
    # the sequence .ort: the whole prompt at once gives the last step's logits
    import onnxruntime as ort

    seq = ort.InferenceSession(str(out / "tiny7.seq.ort"), providers=["CPUExecutionProvider"])
    feeds = {man["tokens_input"]: np.array([PROMPT], np.int64)}
    feeds.update({st["name"]: np.full([1 if d == "batch" else d for d in st["shape"]], st["init"], np.float32)
                  for st in man["state"]})
    logits = seq.run([man["logits_output"]], feeds)[0]
    assert np.abs(logits.reshape(-1, logits.shape[-1])[-1] - want[-1]).max() <= 1e-5


def test_web_bundle_contents(v7_export, tmp_path):
    from .conftest import JS

    if not (JS / "node_modules" / "onnxruntime-web" / "dist" / "ort.webgpu.min.mjs").is_file():
        pytest.skip("js/node_modules has no onnxruntime-web (make test installs it: npm ci in js/)")
    out = tmp_path / "web"
    r = CliRunner().invoke(main, ["web", str(v7_export), "-o", str(out)])
    assert r.exit_code == 0, r.output
    b = json.loads((out / "bundle.json").read_text())
    assert b["model"] == "tiny7.onnx" and b["graphs"] == ["tiny7.onnx", "tiny7.seq.onnx"]
    for f in ["index.html", "app.js", "serve.py", "tiny7.onnx", "tiny7.seq.onnx", "rwkv-runtime/web.js",
              "rwkv-runtime/session.js", "ort/ort.webgpu.min.mjs"]:
        assert (out / f).is_file(), f
    assert (out / "tiny7.onnx").read_bytes() == v7_export.read_bytes()


@pytest.mark.parametrize("cmd", ["web", "mobile"])
def test_errors_are_one_line_and_leave_nothing(v7_export, tmp_path, cmd):
    runner = CliRunner()
    r = runner.invoke(main, [cmd, str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "o1")])
    assert r.exit_code == 1 and r.output.startswith("Error: ") and r.output.count("\n") == 1, r.output
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    r = runner.invoke(main, [cmd, str(v7_export), "-o", str(busy)])
    assert r.exit_code == 1 and "not an empty folder" in r.output and r.output.count("\n") == 1
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    r = runner.invoke(main, [cmd, str(v7_export), "-o", str(tmp_path / "no" / "such" / "dir")])
    assert r.exit_code == 1 and r.output.startswith("Error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]  # no temporary folder left behind


@pytest.mark.slow
def test_mobile_folds_external_data_into_the_ort_file(tmp_path):
    """An export with its weights in an external-data file becomes a self-contained .ort."""
    from rwkv_export.export import ExportOptions, export

    src = tmp_path / "src"
    src.mkdir()
    onnx_path = export(ref_model("golden-rwkv4"), src / "t4.onnx", ExportOptions(external_data=True, graphs=("step",)))[0]
    from rwkv_export.web import external_files

    assert external_files(onnx_path), "the export should use external data"
    out = tmp_path / "mobile"
    r = CliRunner().invoke(main, ["mobile", str(onnx_path), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["required_operators.config", "t4.manifest.json", "t4.ort"]
    man = json.loads((out / "t4.manifest.json").read_text())
    got = _ort_steps(out / "t4.ort", man, PROMPT)
    assert np.abs(got - ref_logits("golden-rwkv4", "atom")).max() <= 5e-5
