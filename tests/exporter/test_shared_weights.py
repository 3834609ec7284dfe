"""One weights file per export (issue 18), at a size CI can afford: an RWKV-7 of ~180 MB forced onto
external data. Both graphs point into the same file at 64 KiB-aligned offsets, each weight is stored
once, the folder can be moved, the export's memory does not hold a second copy, and both graphs
compute what BlinkDL's package computes from the checkpoint."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

REPO = Path(__file__).resolve().parents[2]

_V7 = r"""
import os, sys, json
os.environ.update(RWKV_V7_ON="1", RWKV_JIT_ON="0", RWKV_CUDA_ON="0")
import numpy as np
from rwkv.model import RWKV
m = RWKV(sys.argv[1][:-4], strategy="cpu fp32")
state = None
for t in json.loads(sys.argv[2]):
    logits, state = m.forward([t], state)
np.save(sys.argv[3], logits.float().numpy())
"""


def blinkdl_logits(path: Path, tokens) -> np.ndarray:
    """BlinkDL's package on an RWKV-7 (its v7 mode is chosen at import time: a fresh process)."""
    out = Path(str(path) + f".{len(tokens)}.npy")
    if not out.exists():
        r = subprocess.run(
            [sys.executable, "-c", _V7, str(path), json.dumps(tokens), str(out)], capture_output=True, text=True
        )
        assert r.returncode == 0, r.stderr[-2000:]
    return np.load(out)[None]


def _bench_scale():
    spec = importlib.util.spec_from_file_location("bench_scale", REPO / "scripts" / "bench_scale.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _external(path: Path) -> dict:
    m = onnx.load(str(path), load_external_data=False)
    return {
        t.name: {e.key: e.value for e in t.external_data}
        for t in m.graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
    }


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    d = tmp_path_factory.mktemp("big")
    ck = _bench_scale().random_rwkv7(d / "r7.pth", n_layer=3, n_embd=1024, ffn=4096, vocab=4096)
    return ck


@pytest.mark.slow
def test_one_aligned_weights_file_shared_by_both_graphs(big, tmp_path):
    bench = _bench_scale()
    out = tmp_path / "a" / "m.onnx"
    out.parent.mkdir()
    # in a fresh process, so that its peak RSS is the export's own
    r = bench._child(bench._EXPORT, big, out, json.dumps({"external_data": True}))
    files = sorted(p.name for p in out.parent.iterdir())
    assert files == ["m.onnx", "m.onnx.data", "m.seq.onnx"]
    data = out.parent / "m.onnx.data"
    step, seq = _external(out), _external(out.parent / "m.seq.onnx")
    assert step and seq
    assert {e["location"] for e in [*step.values(), *seq.values()]} == {"m.onnx.data"}
    for e in [*step.values(), *seq.values()]:
        off, n = int(e["offset"]), int(e["length"])
        assert off + n <= data.stat().st_size
        if n >= 65536:
            assert off % 65536 == 0, "a large tensor that onnxruntime could not memory-map"
    # the sequence graph reuses the step graph's bytes for every weight they share
    shared = set(step) & set(seq)
    assert len(shared) >= 0.9 * len(step)
    assert all(step[k]["offset"] == seq[k]["offset"] for k in shared)
    import torch

    weights = sum(v.numel() * 4 for v in torch.load(big, weights_only=True, mmap=True).values())
    assert data.stat().st_size < 1.05 * weights, "the weights are stored more than once"
    # export memory: well under two copies of the weights (issue 18 goal: <= 1.5x)
    grown = (r["export_peak_rss_mb"] - r["export_baseline_rss_mb"]) * 2**20
    assert grown <= 1.5 * data.stat().st_size, r

    # the folder can be moved: locations are relative
    moved = tmp_path / "moved"
    shutil.move(out.parent, moved)
    from rwkv_runtime import Session

    tokens = [5, 300, 17, 4000, 9]
    truth = blinkdl_logits(big, tokens)[-1]
    s = Session(moved / "m.onnx")
    logits, _ = s.prefill(tokens)
    np.testing.assert_allclose(np.asarray(logits).reshape(-1), truth, atol=2e-4, rtol=1e-3)
    st = s.new_state()
    for t in tokens:
        logits, st = s.step(t, st)
    np.testing.assert_allclose(np.asarray(logits).reshape(-1), truth, atol=2e-4, rtol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fp16", "int8"])
def test_reduced_precision_shares_one_file_too(big, tmp_path, kind):
    from rwkv_export.export import ExportOptions, export
    from rwkv_runtime import Session

    opts = ExportOptions(external_data=True, **({"precision": "fp16"} if kind == "fp16" else {"quantize": "int8"}))
    out = export(big, tmp_path / "m.onnx", opts)[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data", "m.seq.onnx"]
    assert {e["location"] for e in _external(out).values()} == {"m.onnx.data"}
    tokens = [5, 300, 17]
    truth = blinkdl_logits(big, tokens)[-1]
    logits, _ = Session(out).prefill(tokens)
    err = np.abs(np.asarray(logits).reshape(-1) - truth).max()
    assert err < 0.05 * np.abs(truth).max() + 1e-2, err


def test_mode_and_companion_files_of_a_small_export(tmp_path):
    """CI-speed check of the same layout on the tiny RWKV-7 reference model."""
    from rwkv_export.export import ExportOptions, export, load_manifest

    from ..conftest import ref_model

    out = export(ref_model("golden-rwkv7"), tmp_path / "m.onnx", ExportOptions(external_data=True))[0]
    man = load_manifest(out)
    assert man.options["weights_file"] == "m.onnx.data"
    assert man.export_id and man.export_id == load_manifest(tmp_path / "m.seq.onnx").export_id
    assert len(set(_external(out)) & set(_external(tmp_path / "m.seq.onnx"))) == len(_external(out))
    assert os.stat(tmp_path / "m.onnx.data").st_mode & 0o777 == os.stat(out).st_mode & 0o777


def test_two_graphs_share_one_weights_file_by_default(tmp_path):
    """Issue #30: below 2 GB too, the default export (step + sequence) writes each weight once, in one
    file both graphs point into; a single graph, or --no-external-data, stays self-contained."""
    from rwkv_export.export import ExportOptions, export, load_manifest

    from ..conftest import ref_model

    ck = ref_model("golden-rwkv7")

    def folder(name):
        (tmp_path / name).mkdir()
        return tmp_path / name / "m.onnx"

    out = export(ck, folder("d"), ExportOptions())[0]
    d = out.parent
    assert sorted(p.name for p in d.iterdir()) == ["m.onnx", "m.onnx.data", "m.seq.onnx"]
    assert load_manifest(out).options["weights_file"] == "m.onnx.data"
    step, seq = _external(out), _external(d / "m.seq.onnx")
    assert step and set(step) == set(seq)
    assert all(step[k]["offset"] == seq[k]["offset"] for k in step)  # the same bytes, not copies
    # the graphs themselves hold no large weights: the data file holds them once
    inline = export(ck, folder("i"), ExportOptions(external_data=False))[0]
    size = lambda p: p.stat().st_size  # noqa: E731
    together = size(out) + size(d / "m.seq.onnx") + size(d / "m.onnx.data")
    assert together < 0.7 * (size(inline) + size(inline.with_name("m.seq.onnx")))
    one = export(ck, folder("s"), ExportOptions(graphs=("step",)))[0]
    assert sorted(p.name for p in one.parent.iterdir()) == ["m.onnx"]
