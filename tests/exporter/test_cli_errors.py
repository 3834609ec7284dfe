"""CLI contract violations found by an audit: one `Error:` line (exit 1), nothing printed or written before
it, no file the user had is lost, and a checkpoint never runs code."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from rwkv_export.cli import main

PWNED = "rwkv-audit-pwned"


def run_cli(*args):
    """The real entry point in a subprocess: stderr is exactly what a user sees (warnings, tracebacks)."""
    return subprocess.run(
        [sys.executable, "-c", "from rwkv_export.cli import main; main()", *map(str, args)],
        capture_output=True,
        text=True,
    )


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error_line(res) -> str:
    """The command failed with exit 1 and printed exactly one line, `Error: ...`, on stderr."""
    code = res.returncode if hasattr(res, "returncode") else res.exit_code
    err = res.stderr
    assert code == 1, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def export_dir(rwkv4_ref, tmp_path_factory) -> Path:
    """One export of the tiny RWKV-4 with its weights in a separate .onnx.data file (step + sequence)."""
    from rwkv_export.export import ExportOptions, export

    d = tmp_path_factory.mktemp("ext")
    export(rwkv4_ref, d / "m.onnx", ExportOptions(external_data=True))
    return d


def _copy(src_dir: Path, dst: Path, skip=()) -> Path:
    dst.mkdir()
    for p in src_dir.iterdir():
        if p.name not in skip:
            shutil.copy(p, dst / p.name)
    return dst / "m.onnx"


# --- validate: --save-inputs / --save-outputs --------------------------------------------------------
@pytest.mark.parametrize("which", ["model", "companion", "weights", "reference"])
def test_validate_never_overwrites_what_it_reads(export_dir, rwkv4_ref, tmp_path, which):
    """`validate --save-outputs m.onnx` replaced the model being validated with Polygraphy JSON."""
    model = _copy(export_dir, tmp_path / "e")
    ref = tmp_path / "ref.pth"
    shutil.copy(rwkv4_ref, ref)
    target = {
        "model": model,
        "companion": model.with_name("m.seq.onnx"),
        "weights": model.with_name("m.onnx.data"),
        "reference": ref,
    }[which]
    before = target.read_bytes()
    res = invoke("validate", model, "--reference", ref, "--steps", "2", "--save-outputs", target)
    assert f"--save-outputs {target}: is a file this check reads" in one_error_line(res)
    assert target.read_bytes() == before


def test_validate_save_paths_are_checked_before_any_work(rwkv4_exports, tmp_path, monkeypatch):
    import rwkv_export.verify.cli as v

    monkeypatch.setattr(v, "load_reference", lambda *a: pytest.fail("the reference was loaded"))
    m, ref = rwkv4_exports["plain"], tmp_path / "unused.pth"
    same = invoke(
        "validate", m, "--reference", ref, "--save-inputs", tmp_path / "a.json", "--save-outputs", tmp_path / "a.json"
    )
    assert "--save-outputs" in one_error_line(same) and "is also --save-inputs" in one_error_line(same)
    # was: Polygraphy created the missing folders (/nonexistent/...) and wrote there
    gone = tmp_path / "no" / "such" / "a.json"
    assert "does not exist" in one_error_line(invoke("validate", m, "--reference", ref, "--save-inputs", gone))
    assert not (tmp_path / "no").exists()
    # was: the whole rollout ran first, then "Error: DIR: Is a directory"
    assert "is a directory" in one_error_line(invoke("validate", m, "--reference", ref, "--save-inputs", tmp_path))


def test_validate_saves_atomically(tmp_path):
    """A failed save (disk full half-way) keeps the old file and leaves no partial one."""
    from rwkv_export.verify.target import ValidationError, _save_atomically

    dest = tmp_path / "feeds.json"
    dest.write_text("old")

    def half_then_enospc(path):
        Path(path).write_text("partial")
        raise OSError(28, "No space left on device", path)

    with pytest.raises(ValidationError, match="No space left on device.*left unchanged"):
        _save_atomically(dest, half_then_enospc)
    assert dest.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["feeds.json"]
    _save_atomically(dest, lambda p: Path(p).write_text("new"))
    assert dest.read_text() == "new" and sorted(os.listdir(tmp_path)) == ["feeds.json"]


# --- generate / bench ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra, expect",
    [
        (["--temperature", "nan"], "temperature must be a finite number"),
        (["--seed", "-1"], "seed must be an integer >= 0"),
        (["--presence-penalty", "inf"], "presence_penalty must be a finite number"),
    ],
)
def test_generate_prints_nothing_before_an_error(rwkv4_exports, extra, expect):
    """The prompt was echoed first, so the terminal showed `helloError: sampling: ...`."""
    res = invoke("generate", rwkv4_exports["plain"], "-p", "hello", "-n", "3", *extra)
    assert expect in one_error_line(res) and res.stdout == ""


def test_generate_with_a_tokenizer_that_does_not_fit_the_model(rwkv4_exports, tmp_path):
    from ..runtime.conftest import copy_export, manifest_dict, write_manifest

    pytest.importorskip("pyrwkv_tokenizer")
    p = copy_export(rwkv4_exports["plain"], tmp_path / "w")
    for f in (p, p.with_name(p.stem + ".seq.onnx")):
        write_manifest(f, {**manifest_dict(f), "tokenizer": {"kind": "world"}})
    res = invoke("generate", p, "-p", "hello", "-n", "2")
    assert "the export's tokenizer does not fit this model" in one_error_line(res) and res.stdout == ""


def test_bench_without_batch_sizes_is_refused(rwkv4_exports):
    """`--batch ''` measured nothing and exited 0."""
    assert "--batch needs at least one batch size" in one_error_line(
        invoke("bench", rwkv4_exports["plain"], "--batch", "")
    )


# --- checkpoints that would run code ---------------------------------------------------------------
class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {PWNED}",))


@pytest.mark.parametrize("fmt", ["zip", "pickle-protocol-4"])
def test_a_checkpoint_that_runs_code_is_refused_in_one_line(tmp_path, fmt):
    """Refused by torch's weights-only loader and nothing runs; stderr is the one Error line (torch's
    multi-line 'Detected pickle protocol 4' warning used to come first)."""
    import torch

    ck = tmp_path / "evil.pth"
    if fmt == "zip":
        torch.save({"emb.weight": torch.zeros(2, 2), "x": _RunsCode()}, ck)
    else:
        ck.write_bytes(pickle.dumps({"x": _RunsCode()}, protocol=4))
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            "from rwkv_export.cli import main; main()",
            "export",
            str(ck),
            "-o",
            str(tmp_path / "o.onnx"),
            "-q",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    line = one_error_line(res)
    assert "refused to load" in line and "weights-only loader" in line
    if fmt == "zip":
        assert "posix.system" in line  # says what was refused, not torch's advice to set weights_only=False
    assert not (tmp_path / PWNED).exists() and not (tmp_path / "o.onnx").exists()


# --- external weights file -------------------------------------------------------------------------
def test_missing_or_truncated_weights_file_is_named(export_dir, tmp_path):
    """onnxruntime's message was cut off before the file name: `... does not exist: "/tmp/x)`."""
    missing = _copy(export_dir, tmp_path / "missing", skip=("m.onnx.data",))
    line = one_error_line(invoke("generate", missing, "-p", "hi", "-n", "2"))
    assert "its weights file m.onnx.data is missing" in line
    cut = _copy(export_dir, tmp_path / "cut")
    data = cut.with_name("m.onnx.data")
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 3])
    line = one_error_line(invoke("generate", cut, "-p", "hi", "-n", "2"))
    assert "its weights file m.onnx.data is truncated or damaged" in line


# --- triton / web / mobile / build-engine -----------------------------------------------------------
@pytest.fixture
def mixed(rwkv4_exports, rwkv4_ref, tmp_path) -> Path:
    """A step graph beside the sequence graph of another export of the same checkpoint."""
    from rwkv_export.export import ExportOptions, export

    d = tmp_path / "mixed"
    d.mkdir()
    step = rwkv4_exports["plain"]  # its manifest names its companion <stem>.seq.onnx
    shutil.copy(step, d / step.name)
    data = step.with_name(step.name + ".data")  # the weights file both graphs of an export share
    if data.exists():
        shutil.copy(data, d / data.name)
    other = export(rwkv4_ref, tmp_path / "other.onnx", ExportOptions(graphs=("sequence",)))[0]
    shutil.copy(other, d / (step.stem + ".seq.onnx"))
    return d / step.name


def test_triton_python_backend_refuses_a_companion_of_another_export(mixed, tmp_path):
    pytest.importorskip("tritonclient")
    res = invoke("triton", mixed, "-o", tmp_path / "repo", "--backend", "python")
    assert "belongs to another export" in one_error_line(res)
    assert not (tmp_path / "repo").exists()


def test_build_engine_refuses_a_companion_of_another_export(mixed, tmp_path):
    """Checked before building (with TensorRT this was found only when the engines were loaded)."""
    from rwkv_export.targets.tensorrt.engine import plan_graphs
    from rwkv_runtime import RuntimeUserError

    with pytest.raises(RuntimeUserError, match="belongs to another export"):
        plan_graphs(mixed, tmp_path / "m.engine")


@pytest.mark.parametrize("name", ["m.engine", "m.engine.json", "m.seq.engine", "model"])
def test_build_engine_timing_cache_is_not_an_input_or_output(rwkv4_exports, tmp_path, name):
    """The cache is written after the engines: `--timing-cache m.engine` replaced the engine just built."""
    model = rwkv4_exports["plain"]
    cache = model if name == "model" else tmp_path / name
    res = invoke("build-engine", model, "-o", tmp_path / "m.engine", "--timing-cache", cache)
    assert "an input or output of this build" in one_error_line(res)


def test_mobile_names_the_users_folder_not_its_temporary_one(rwkv4_exports):
    """mkdtemp's error named `.mobx-abc123` beside the output; /proc refuses new entries."""
    res = invoke("mobile", rwkv4_exports["plain"], "-o", "/proc/rwkv-audit-mobile")
    line = one_error_line(res)
    assert line.startswith("Error: /proc/rwkv-audit-mobile: cannot write there") and ".rwkv-audit-mobile-" not in line


def test_web_and_mobile_refuse_a_manifest_promising_an_absent_initial_state(rwkv4_exports, tmp_path):
    from ..runtime.conftest import copy_export, manifest_dict, write_manifest

    p = copy_export(rwkv4_exports["plain"], tmp_path / "m")
    write_manifest(p, {**manifest_dict(p), "initial_state": "embedded"})
    for cmd in ("web", "mobile"):
        res = invoke(cmd, p, "-o", tmp_path / f"out-{cmd}")
        assert "embeds an initial state, but none is there" in one_error_line(res)
        assert not (tmp_path / f"out-{cmd}").exists()
