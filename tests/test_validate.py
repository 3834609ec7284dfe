"""rwkv-export validate, and its reproduction with Polygraphy alone, catch a wrong export."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from rwkv_export.cli import main

POLYGRAPHY = shutil.which("polygraphy") or str(Path(sys.executable).with_name("polygraphy"))
EXAMPLES = Path(__file__).resolve().parents[1] / "deploy_examples"


def corrupt(src: Path, dst: Path, name="blocks.0.att.w"):
    """One weight changed slightly: a decay of layer 0 (this tiny model's matrices are ~3e-7, so a
    decay, which every step's state goes through, is where a small change shows)."""
    m = onnx.load(str(src))
    for t in m.graph.initializer:
        if t.name == name:
            a = numpy_helper.to_array(t).copy()
            a.flat[5] *= 1.02
            t.CopyFrom(numpy_helper.from_array(a, t.name))
    onnx.save(m, str(dst))
    return dst


@pytest.mark.parametrize("wkv", ["plain", "plugin"])
@pytest.mark.parametrize("graph", ["step", "sequence"])
def test_validate_passes_on_a_good_export(rwkv4_exports, rwkv4_ref, wkv, graph):
    model = rwkv4_exports[wkv]
    if graph == "sequence":
        model = model.with_name(model.stem + ".seq.onnx")
    res = CliRunner().invoke(main, ["validate", str(model), "--reference", str(rwkv4_ref), "--steps", "24",
                                    "--prompt", "Describe"])
    assert res.exit_code == 0, res.output
    assert "PASS" in res.output and "teacher-forced" in res.output and "free-running" in res.output


def test_validate_and_polygraphy_fail_on_a_corrupted_export(rwkv4_exports, rwkv4_ref, tmp_path):
    good = rwkv4_exports["plain"]
    bad = corrupt(good, tmp_path / "bad.onnx")
    ins, outs = tmp_path / "in.json", tmp_path / "ref.json"
    res = CliRunner().invoke(main, ["validate", str(good), "--reference", str(rwkv4_ref), "--steps", "24",
                                    "--save-inputs", str(ins), "--save-outputs", str(outs)])
    assert res.exit_code == 0, res.output
    assert ins.is_file() and outs.is_file() and "polygraphy run" in res.output

    res = CliRunner().invoke(main, ["validate", str(bad), "--reference", str(rwkv4_ref), "--steps", "24"])
    assert res.exit_code == 1
    assert "FAIL" in res.output and "first bad step: teacher-forced step" in res.output

    cmd = [POLYGRAPHY, "run", None, "--onnxrt", "--load-inputs", str(ins), "--load-outputs", str(outs),
           "--atol", "1e-3", "--rtol", "1e-3"]
    ok = subprocess.run([c if c else str(good) for c in cmd], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
    fail = subprocess.run([c if c else str(bad) for c in cmd], capture_output=True, text=True)
    assert fail.returncode != 0 and "FAILED" in (fail.stdout + fail.stderr)


def test_validate_user_errors(rwkv4_exports, tmp_path):
    from .conftest import ref_model

    other = ref_model("tiny-rwkv-6v0-1m")
    res = CliRunner().invoke(main, ["validate", str(rwkv4_exports["plain"]), "--reference", str(other)])
    assert res.exit_code == 1 and "not its checkpoint" in res.output
    res = CliRunner().invoke(main, ["validate", str(tmp_path / "none.onnx"), "--reference", str(other)])
    assert res.exit_code == 1 and "no such file" in res.output
    res = CliRunner().invoke(main, ["validate", str(rwkv4_exports["plain"]), "--reference", str(other),
                                    "--backend", "tensorrt"])
    assert res.exit_code == 1


def test_data_loader_script_with_polygraphy(rwkv4_exports):
    env = dict(os.environ, RWKV_MODEL=str(rwkv4_exports["plain"]), RWKV_STEPS="6")
    r = subprocess.run([POLYGRAPHY, "run", str(rwkv4_exports["plain"]), "--onnxrt",
                        "--data-loader-script", f"{EXAMPLES / 'polygraphy_data_loader.py'}:load_data"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "PASSED" in r.stdout + r.stderr


def test_validate_tensorrt_backend_needs_tensorrt(rwkv4_exports, rwkv4_ref):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        res = CliRunner().invoke(main, ["validate", str(rwkv4_exports["plain"]), "--reference", str(rwkv4_ref),
                                        "--backend", "tensorrt", "--steps", "4"])
        assert res.exit_code == 1 and "pip install tensorrt" in res.output
        pytest.skip("TensorRT is not installed: only its one-line error was checked")
    res = CliRunner().invoke(main, ["validate", str(rwkv4_exports["plugin"]), "--reference", str(rwkv4_ref),
                                    "--backend", "tensorrt", "--steps", "16"])
    assert res.exit_code == 0, res.output
