"""plugins/tests/gpu_check.py's verdicts: a check asked for that did not run fails the run; reports are written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "plugins" / "tests"))
import gpu_check  # noqa: E402


def test_a_requested_check_that_was_skipped_fails_the_run():
    r = gpu_check.Report(requested={"a", "b"})
    r.run("a", lambda: ("PASSED", ""))
    r.run("b", lambda: ("SKIPPED", "no headers"))
    r.run("c", lambda: ("SKIPPED", "never asked"))
    assert r.checks["c"]["status"] == "NOT REQUESTED"
    assert r.exit_code() == 1
    r.requested.discard("b")
    r.checks["b"]["requested"] = False
    assert r.exit_code() == 0


def test_an_exception_is_one_failed_line_not_a_traceback(capsys):
    r = gpu_check.Report(requested={"x"})

    def boom():
        raise RuntimeError("nvcc exploded\nsecond line")

    assert r.run("x", boom) == "FAILED"
    out = capsys.readouterr().out
    assert "[FAILED] x: RuntimeError: nvcc exploded" in out and "Traceback" not in out
    assert r.exit_code() == 1


def test_runtime_is_found_from_the_checkout_without_installing_it():
    code = (
        "import sys; sys.modules['rwkv_runtime'] = None; sys.path.insert(0, 'plugins/tests'); import gpu_check; "
        "loader, memory, where = gpu_check.import_runtime_tensorrt(); print(where, memory.Cuda.__name__)"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "rwkv_runtime from" in r.stdout and "Cuda" in r.stdout


@pytest.mark.slow
def test_without_a_device_it_says_so_and_exits_2(tmp_path):
    r = subprocess.run(
        [sys.executable, str(REPO / "plugins" / "tests" / "gpu_check.py"), "--report-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if r.returncode != 2:
        pytest.skip("a CUDA device is visible here: the script runs for real")
    assert "cannot run: no CUDA device" in r.stdout and "Traceback" not in r.stderr
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert doc["exit_code"] == 2 and doc["checks"]["device"]["status"] == "SKIPPED"
    assert (tmp_path / "gpu_check.txt").exists()
