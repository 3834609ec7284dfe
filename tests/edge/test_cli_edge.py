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
    state = {
        st["name"]: np.full([1 if d == "batch" else d for d in st["shape"]], st["init"], np.float32)
        for st in manifest["state"]
    }
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
    from rwkv_export.targets.mobile import ort_metadata
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
    feeds.update(
        {
            st["name"]: np.full([1 if d == "batch" else d for d in st["shape"]], st["init"], np.float32)
            for st in man["state"]
        }
    )
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
    for f in [
        "index.html",
        "app.js",
        "serve.py",
        "tiny7.onnx",
        "tiny7.seq.onnx",
        "rwkv-runtime/web.js",
        "rwkv-runtime/session.js",
        "rwkv-runtime/generation.js",
        "ort/ort.webgpu.min.mjs",
    ]:
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
    onnx_path = export(ref_model("golden-rwkv4"), src / "t4.onnx", ExportOptions(external_data=True, graphs=("step",)))[
        0
    ]
    from rwkv_export.targets.web import external_files

    assert external_files(onnx_path), "the export should use external data"
    out = tmp_path / "mobile"
    r = CliRunner().invoke(main, ["mobile", str(onnx_path), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["required_operators.config", "t4.manifest.json", "t4.ort"]
    man = json.loads((out / "t4.manifest.json").read_text())
    got = _ort_steps(out / "t4.ort", man, PROMPT)
    assert np.abs(got - ref_logits("golden-rwkv4", "atom")).max() <= 5e-5


def test_web_assets_equal_the_sources():
    """exporter/targets/web_assets (what the rwkv_export wheel ships for `rwkv-export web`) links to js/src and
    deploy_examples/web (one copy of each file), and the schema module is current: sync_web_assets.py --check."""
    import subprocess
    import sys

    from .conftest import REPO

    r = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "sync_web_assets.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr


def _fake_ort_web(folder):
    """A folder laid out as `npm install onnxruntime-web` leaves it (node_modules/onnxruntime-web/dist)."""
    from rwkv_export.targets.web import ORT_FILES

    dist = folder / "node_modules" / "onnxruntime-web" / "dist"
    dist.mkdir(parents=True)
    for f in ORT_FILES:
        (dist / f).write_bytes(b"// " + f.encode())
    return folder / "node_modules"


def test_web_works_without_a_checkout_given_ort_web(v7_export, tmp_path, monkeypatch):
    """No js/ (as from an installed rwkv-export): one line naming the npm step and --ort-web; with --ort-web
    (a node_modules, a package folder or a dist folder) the bundle has the shipped runtime and ORT Web's files."""
    import rwkv_export.targets.web as web

    monkeypatch.setattr(web, "JS_DIR", tmp_path / "no-checkout" / "js")
    runner = CliRunner()
    r = runner.invoke(main, ["web", str(v7_export), "-o", str(tmp_path / "a")])
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output  # was: "run from a checkout of rwkv-export"
    assert "npm install onnxruntime-web@1.30.0" in r.output and "--ort-web" in r.output
    assert not (tmp_path / "a").exists()
    nm = _fake_ort_web(tmp_path / "deps")
    for i, arg in enumerate([nm, nm / "onnxruntime-web", nm / "onnxruntime-web" / "dist"]):
        out = tmp_path / f"site{i}"
        r = runner.invoke(main, ["web", str(v7_export), "-o", str(out), "--ort-web", str(arg)])
        assert r.exit_code == 0, r.output
        assert (out / "ort" / "ort.webgpu.min.mjs").read_bytes() == b"// ort.webgpu.min.mjs"
        for f in (web.RUNTIME_DIR).iterdir():
            if f.name not in web.NODE_ONLY:
                assert (out / "rwkv-runtime" / f.name).read_bytes() == f.read_bytes()
        assert not (out / "rwkv-runtime" / "node.js").exists()
        assert (out / "app.js").read_bytes() == (web.DEMO_DIR / "app.js").read_bytes()
    empty = tmp_path / "empty"
    empty.mkdir()
    for bad, why in [(tmp_path / "nope", "no such folder"), (empty, "no ONNX Runtime Web files there")]:
        r = runner.invoke(main, ["web", str(v7_export), "-o", str(tmp_path / "b"), "--ort-web", str(bad)])
        assert r.exit_code == 1 and why in r.output and r.output.count("\n") == 1, r.output
    assert not (tmp_path / "b").exists()


def test_web_refuses_a_model_without_tokenizer(tmp_path):
    """--tokenizer none: the demo page cannot turn text into tokens (the runtime refuses generate, as Python)."""
    from rwkv_export.export import ExportOptions, export

    m = export(ref_model("golden-rwkv4"), tmp_path / "n.onnx", ExportOptions(tokenizer="none", graphs=("step",)))[0]
    r = CliRunner().invoke(
        main, ["web", str(m), "-o", str(tmp_path / "site"), "--ort-web", str(_fake_ort_web(tmp_path / "d"))]
    )
    assert r.exit_code == 1 and "--tokenizer none" in r.output and r.output.count("\n") == 1, r.output
    assert not (tmp_path / "site").exists()


@pytest.mark.slow
def test_wheel_ships_the_web_runtime(tmp_path):
    """The rwkv_export wheel carries web_assets (the runtime and the demo page), so `rwkv-export web`
    works from an installed package."""
    import subprocess
    import sys
    import zipfile

    from .conftest import REPO

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if r.returncode != 0 and "No module named" in r.stderr:
        pytest.skip(f"cannot build a wheel here: {r.stderr.strip().splitlines()[-1][:120]}")
    assert r.returncode == 0, r.stderr[-2000:]
    [whl] = tmp_path.glob("rwkv_export-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    from rwkv_export.targets.web import DEMO_FILES, RUNTIME_DIR

    for f in RUNTIME_DIR.iterdir():
        assert f"rwkv_export/targets/web_assets/rwkv-runtime/{f.name}" in names
    for f in DEMO_FILES:
        assert f"rwkv_export/targets/web_assets/demo/{f}" in names
