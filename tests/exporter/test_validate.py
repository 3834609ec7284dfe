"""``rwkv-export validate`` passes good exports, fails a slightly wrong one at the right step, and its
saved files let ``polygraphy run`` repeat the check alone; the data-loader script feeds Polygraphy
real rollout states. Everything runs for real with ONNX Runtime on the tiny RWKV-4 reference."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from rwkv_export.cli import main

POLYGRAPHY = str(Path(sys.executable).with_name("polygraphy"))
DATA_LOADER = Path(__file__).resolve().parents[2] / "deploy_examples" / "polygraphy_data_loader.py"
STEPS = "16"


def seq(step_graph: Path) -> Path:
    return step_graph.with_name(step_graph.stem + ".seq.onnx")


def validate(*args):
    return CliRunner().invoke(main, ["validate", *map(str, args)])


def corrupt(src: Path, dst: Path, name="blocks.0.att.value", index=0, delta=0.03) -> Path:
    """A copy of ``src`` with ONE element of one MatMul weight changed (+0.03, a few % of that
    matrix's largest entry). This one only shows once the token-shift state is non-zero: at step 0
    the value mix sees a zero previous token, so the first step passes and step 1 fails."""
    m = onnx.load(str(src))
    (t,) = [t for t in m.graph.initializer if t.name == name]
    a = numpy_helper.to_array(t).copy()
    a.flat[index] += delta
    t.CopyFrom(numpy_helper.from_array(a, name))
    onnx.save(m, str(dst))
    return dst


def polygraphy_replay(model: Path, inputs: Path, outputs: Path):
    return subprocess.run(
        [
            POLYGRAPHY,
            "run",
            str(model),
            "--onnxrt",
            "--load-inputs",
            str(inputs),
            "--load-outputs",
            str(outputs),
            "--atol",
            "1e-4",
            "--rtol",
            "1e-3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def bad_model(rwkv4_exports, tmp_path_factory):
    # one element of layer 0's bonus u: from a fresh state (aa = bb = 0) the first step's WKV is v whatever u
    # is, so step 0 passes and step 1 fails, on any weights (a value-matrix element shows at step 0 unless
    # that channel's time_mix_v is ~0, as in the trained model this test once used)
    return corrupt(rwkv4_exports["plain"], tmp_path_factory.mktemp("bad") / "bad.onnx", name="blocks.0.att.u")


@pytest.mark.parametrize("wkv", ["plain", "plugin"])
@pytest.mark.parametrize("graph", ["step", "sequence"])
def test_validate_passes_on_good_exports(rwkv4_exports, rwkv4_ref, graph, wkv):
    res = validate(
        rwkv4_exports[wkv],
        "--reference",
        rwkv4_ref,
        "--graph",
        graph,
        "--steps",
        STEPS,
        "--prompt",
        "import os\n",
        "--chunk",
        "5",
    )
    assert res.exit_code == 0, res.output
    name = rwkv4_exports[wkv].name if graph == "step" else seq(rwkv4_exports[wkv]).name
    assert f"validating {name}: rwkv4 {graph} graph, fp32, wkv {wkv}" in res.output
    # summary first: the verdict, then one row per output group (max abs, max rel, tol used, worst step,
    # first bad step); the per-step tables only with --verbose
    lines = res.output.splitlines()
    assert lines[lines.index("") + 1].startswith("PASS:"), res.output
    for group in (
        "logits",
        "att_shift (x2)",
        "wkv_aa (x2)",
        "wkv_bb (x2)",
        "wkv_pp (x2)",
        "ffn_shift (x2)",
        "logits (free-running)",
    ):
        assert re.search(rf"^\s*{re.escape(group)}\s+\S+\s+\S+\s+\S+\s+\d+\s+-$", res.output, re.M), group
    assert "1. teacher-forced" not in res.output and "2. free-running" not in res.output
    assert len(lines) <= 20, res.output  # was two tables of one row per step


def test_verbose_adds_both_per_step_tables_after_the_summary(rwkv4_exports, rwkv4_ref):
    res = validate(rwkv4_exports["plain"], "--reference", rwkv4_ref, "--steps", "5", "--verbose")
    assert res.exit_code == 0, res.output
    out = res.output
    assert (
        out.index("PASS:")
        < out.index("summary, over all steps")
        < out.index("1. teacher-forced")
        < out.index("2. free-running")
    )
    for table in out.split("1. teacher-forced")[1].split("2. free-running"):
        assert [int(ln.split()[0]) for ln in table.splitlines() if re.match(r"^\s+\d+\s", ln)] == list(range(5))


@pytest.mark.slow
def test_validate_fails_on_a_corrupted_export_naming_the_first_bad_step(rwkv4_ref, bad_model):
    res = validate(bad_model, "--reference", rwkv4_ref, "--steps", STEPS, "--prompt", "import os\n", "-v")
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    last = next(ln for ln in res.output.splitlines() if ln.startswith("FAIL:"))
    m = re.match(
        r"FAIL: the export differs from the reference; first bad step: (\d+) \(teacher-forced step (\d+)", last
    )
    assert m, last
    first = int(m.group(1))
    # the named step is the first row marked FAIL in the teacher-forced table, and a later one:
    # the corruption needs the state to show
    table = res.output.split("1. teacher-forced")[1].split("2. free-running")[0]
    rows = [ln.split() for ln in table.splitlines() if re.match(r"^\s+\d+\s", ln)]
    assert [int(r[0]) for r in rows if r[-1] == "FAIL"][0] == first == 1
    assert re.search(r"wkv_aa \(x2\).*\s1$", res.output, re.M)  # the group that broke, and when
    assert re.search(r"^\s+teacher-forced step 1 failed in: .*wkv_aa", res.output, re.M)


@pytest.mark.slow
def test_polygraphy_alone_repeats_the_check(rwkv4_exports, rwkv4_ref, bad_model, tmp_path):
    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json

    good = rwkv4_exports["plain"]
    ins, outs = tmp_path / "inputs.json", tmp_path / "reference.json"
    res = validate(
        good,
        "--reference",
        rwkv4_ref,
        "--steps",
        STEPS,
        "--prompt",
        "import os\n",
        "--save-inputs",
        ins,
        "--save-outputs",
        outs,
    )
    assert res.exit_code == 0, res.output
    assert f"polygraphy run {good} --onnxrt --load-inputs {ins} --load-outputs {outs}" in res.output

    # the feeds are the reference rollout: a fresh state, then each step's state is the previous output
    feeds, results = load_json(str(ins)), RunResults.load(str(outs))
    assert [name for name, _ in results] == ["pytorch-reference"]
    iters = results[0][1]
    assert len(feeds) == len(iters) == int(STEPS)
    assert np.all(feeds[0]["state.0.wkv_pp"] == np.float32(-1e30))
    for i in range(1, len(feeds)):
        for k in ("att_shift", "wkv_aa", "wkv_bb", "wkv_pp", "ffn_shift"):
            np.testing.assert_array_equal(feeds[i][f"state.1.{k}"], iters[i - 1][f"new_state.1.{k}"])

    ok = polygraphy_replay(good, ins, outs)
    assert ok.returncode == 0 and "PASSED" in ok.stdout + ok.stderr, (ok.stdout + ok.stderr)[-3000:]
    bad = polygraphy_replay(bad_model, ins, outs)
    assert bad.returncode != 0 and "FAILED" in bad.stdout + bad.stderr, (bad.stdout + bad.stderr)[-3000:]
    assert "new_state.0.wkv_aa" in bad.stdout + bad.stderr


@pytest.mark.parametrize("graph", ["step", "sequence"])
def test_data_loader_script_gives_polygraphy_real_states(rwkv4_exports, tmp_path, graph):
    model = rwkv4_exports["plugin"] if graph == "step" else seq(rwkv4_exports["plain"])
    ins, outs = tmp_path / "in.json", tmp_path / "out.json"
    env = dict(os.environ, RWKV_MODEL=str(model), RWKV_STEPS="12", RWKV_PROMPT="def f", RWKV_CHUNK="4")
    r = subprocess.run(
        [
            POLYGRAPHY,
            "run",
            str(model),
            "--onnxrt",
            "--data-loader-script",
            f"{DATA_LOADER}:load_data",
            "--save-inputs",
            str(ins),
            "--save-outputs",
            str(outs),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 0 and "PASSED" in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]

    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json

    feeds, iters = load_json(str(ins)), RunResults.load(str(outs))[0][1]
    assert len(feeds) == (12 if graph == "step" else 3)
    assert feeds[0]["tokens"].shape == ((1,) if graph == "step" else (1, 4))
    assert np.all(feeds[0]["state.1.wkv_pp"] == np.float32(-1e30))  # the manifest's initial state
    for i in range(1, len(feeds)):  # then the model's own state, carried
        np.testing.assert_array_equal(feeds[i]["state.1.wkv_bb"], iters[i - 1]["new_state.1.wkv_bb"])


def test_user_errors_are_one_line(rwkv4_exports, tmp_path):
    from ..conftest import ref_model

    rwkv6 = ref_model("golden-rwkv6")
    res = validate(rwkv4_exports["plain"], "--reference", rwkv6)
    assert res.exit_code == 1 and "not its checkpoint" in res.output and "Traceback" not in res.output
    res = validate(tmp_path / "none.onnx", "--reference", rwkv6)
    assert res.exit_code == 1 and res.output.strip() == f"Error: {tmp_path / 'none.onnx'}: no such file"
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not an engine")
    res = validate(engine, "--reference", rwkv6)
    assert res.exit_code == 1 and "no model.engine.json sidecar: pass --onnx" in res.output
    res = validate(rwkv4_exports["plain"], "--reference", rwkv6, "--prompt", "a", "--tokens", "1")
    assert res.exit_code == 1 and res.output.count("\n") == 1


def test_tensorrt_profile_of_validate(rwkv4_exports):
    """Without TensorRT: the profile validate gives the one engine loader (batch 1; a sequence graph takes
    1..chunk tokens per call, tuned for chunk). tests/tensorrt checks validate builds through that loader."""
    from rwkv_export.targets.tensorrt.loader import Profile, profile_shapes
    from rwkv_export.verify.target import load_target

    man = load_target(rwkv4_exports["plugin"], "sequence").manifest
    prof = Profile.for_validation(6)
    assert profile_shapes(man, "tokens", (-1, -1), prof) == [(1, 1), (1, 6), (1, 6)]
    assert profile_shapes(man, "state.1.wkv_pp", (-1, 64), prof) == [(1, 64)] * 3
    step = load_target(rwkv4_exports["plugin"], "step").manifest
    assert profile_shapes(step, "tokens", (-1,), prof) == [(1,)] * 3


def test_an_engine_takes_its_manifest_from_its_sidecar(rwkv4_exports, tmp_path):
    from rwkv_export.verify.target import load_target
    from rwkv_runtime import artifact as trt_backend  # the engine sidecar's home
    from rwkv_runtime import read_manifest

    man, _ = read_manifest(seq(rwkv4_exports["plain"]))
    engine = tmp_path / "model.seq.engine"
    engine.write_bytes(b"not an engine")
    trt_backend.sidecar_path(engine).write_text(
        json.dumps(
            {
                "format": trt_backend.SIDECAR_FORMAT,
                "format_version": trt_backend.SIDECAR_VERSION,
                "manifest": json.loads(man.to_json()),
                "plugins": [{"name": "gone.so", "path": "/gone.so"}],
            }
        )
    )
    target = load_target(engine)
    assert target.is_engine and target.manifest.graph == "sequence" and target.plugins == []


def test_tensorrt_backend(rwkv4_exports, rwkv4_ref):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        res = validate(rwkv4_exports["plugin"], "--reference", rwkv4_ref, "--backend", "tensorrt")
        assert res.exit_code == 1 and res.output.count("\n") == 1 and "pip install tensorrt" in res.output
        pytest.skip("TensorRT is not installed (only its one-line error was checked)")
    from rwkv_export.targets.tensorrt.plugin import find_plugin

    if find_plugin() is None:
        pytest.skip("the TensorRT plugin library is not built (plugins/build/librwkv_trt_plugins.so)")
    for model in (rwkv4_exports["plugin"], seq(rwkv4_exports["plugin"])):
        res = validate(model, "--reference", rwkv4_ref, "--backend", "tensorrt", "--steps", STEPS)
        assert res.exit_code == 0, res.output
