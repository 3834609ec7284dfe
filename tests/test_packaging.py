"""rwkv-runtime installs on its own: a fresh virtual environment gets the runtime from this checkout and
nothing of the exporter's stack (torch, onnx, polygraphy), and generates the same text as the dev install."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import venv
from pathlib import Path

import pytest

import rwkv_runtime

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = {"torch", "onnx", "polygraphy", "rwkv-export"}  # (click arrives through tokenizers -> huggingface_hub)


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


@pytest.mark.slow
def test_runtime_installs_alone_and_generates(rwkv4_exports, tmp_path):
    # the source tree is copied so the build leaves nothing (egg-info, build/) in the checkout
    src = tmp_path / "src"
    shutil.copytree(REPO / "runtime", src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    inst = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", f"{src}[cpu]"], capture_output=True, text=True, env=env, timeout=900
    )
    if inst.returncode != 0 and ("Could not find a version" in inst.stderr or "connection" in inst.stderr.lower()):
        pytest.skip("the package registry is unreachable: " + inst.stderr.strip().splitlines()[-1])
    assert inst.returncode == 0, inst.stderr[-2000:]

    listed = subprocess.run(
        [str(py), "-m", "pip", "list", "--format=json"], capture_output=True, text=True, env=env, check=True
    )
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert "rwkv-runtime" in names and "onnxruntime" in names
    assert not names & FORBIDDEN, f"installed with rwkv-runtime: {sorted(names & FORBIDDEN)}"
    assert "onnxruntime-gpu" not in names

    site = next((env_dir / "lib").glob("python3*/site-packages"))
    print(
        f"\nrwkv-runtime[cpu] fresh install: {_dir_size(site) / 2**20:.1f} MiB in site-packages, "
        f"{len(names)} distributions: {', '.join(sorted(names))}"
    )

    # generate greedily from an export made beforehand (by the exporter in the dev environment)
    model = rwkv4_exports["plain"]
    code = (
        "import sys, rwkv_runtime\n"
        "s = rwkv_runtime.Session(sys.argv[1])\n"
        "sys.stdout.write(''.join(s.generate(sys.argv[2], 48, temperature=0)))\n"
        "assert 'torch' not in sys.modules and 'onnx' not in sys.modules\n"
    )
    run = subprocess.run(
        [str(py), "-c", code, str(model), "The "], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    expect = "".join(rwkv_runtime.Session(model).generate("The ", 48, temperature=0))
    assert run.stdout == expect and len(expect) > 0
