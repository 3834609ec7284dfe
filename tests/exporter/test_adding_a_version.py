"""docs/adding-a-version.md, followed: a version written as one module (tests/exporter/toy_version.py) and one
registry entry exports, runs in ONNX Runtime and matches its own reference, with no other file touched."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from rwkv_export import arch
from rwkv_export.checkpoint import load_checkpoint
from rwkv_export.export import ExportOptions, export, load_manifest, sequence_path
from tests.exporter import toy_version


@pytest.fixture
def toy_registered(monkeypatch):
    monkeypatch.setattr(arch, "REGISTRY", ("tests.exporter.toy_version",) + arch.REGISTRY)


def _run_steps(path, tokens):
    man = load_manifest(path)
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    state = {sp.name: np.zeros([1] + sp.shape[1:], np.float32) for sp in man.state}
    for t in tokens:
        out = dict(zip([o.name for o in s.get_outputs()], s.run(None, {"tokens": np.array([t]), **state})))
        state = {sp.name: out[sp.output] for sp in man.state}
    return out["logits"][0], state


def test_toy_version_exports_and_matches_its_reference(toy_registered, tmp_path):
    ck_path = toy_version.random_checkpoint(tmp_path / "toy.pth")
    ck = load_checkpoint(ck_path)
    assert ck.version == "toy" and arch.get("toy") is toy_version.SPEC
    step = export(ck_path, tmp_path / "toy.onnx")[0]
    assert load_manifest(step).architecture == "toy"

    tokens = [3, 17, 0, 42, 9]
    spec = arch.get("toy")
    model = spec.Model.from_weights(ck.weights, spec.config_from_weights(ck.weights))
    st = model.new_state(1)
    for t in tokens:
        want, st = model.step(torch.tensor([t]), st)
    got, got_state = _run_steps(step, tokens)
    np.testing.assert_allclose(got, want[0].numpy(), rtol=0, atol=1e-5)
    for k, v in st.items():
        np.testing.assert_allclose(got_state[k], v.numpy(), rtol=0, atol=1e-5)

    # the sequence graph: same logits for the prompt at once, as the reference's parallel form
    seq = ort.InferenceSession(str(sequence_path(step)), providers=["CPUExecutionProvider"])
    zeros = {k: np.zeros_like(v) for k, v in got_state.items()}
    (last,) = seq.run(["logits"], {"tokens": np.array([tokens]), **zeros})
    ref_seq, _ = model.sequence(torch.tensor([tokens]), model.new_state(1))
    np.testing.assert_allclose(last[0], ref_seq[0, -1].numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(last[0], got, rtol=0, atol=1e-5)


def test_toy_version_unknown_without_its_registry_entry(tmp_path):
    """The registry entry is what makes the version known: without it the same file is refused."""
    from rwkv_export.errors import CheckpointError

    with pytest.raises(CheckpointError, match="not an RWKV checkpoint"):
        load_checkpoint(toy_version.random_checkpoint(tmp_path / "toy.pth"))


def test_toy_state_tuning_refused_by_the_contract(toy_registered, tmp_path):
    """A version without ``load_state_tuning`` refuses --state-tuning in one line, by its name."""
    from rwkv_export.errors import ExportError

    ck_path = toy_version.random_checkpoint(tmp_path / "toy.pth")
    (tmp_path / "st.pth").write_bytes(b"x")
    with pytest.raises(ExportError, match="^Toy has no learned initial state"):
        export(ck_path, tmp_path / "t.onnx", ExportOptions(state_tuning=str(tmp_path / "st.pth")))
