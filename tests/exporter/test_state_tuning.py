"""State-tuned initial states: baked into an export, or loaded by the runtime as the starting state."""

import numpy as np
import pytest
import torch

import rwkv_runtime
from rwkv_export.arch import rwkv6
from rwkv_export.checkpoint import load_checkpoint
from rwkv_export.export import ExportOptions, export, state_tuning_to_npz

from ..conftest import ref_model
from ..helpers import random_state_tuning, step_all

PROMPT = b"Describe"


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """The tiny RWKV-6 and a (made-up but well-scaled) state-tuning file for it."""
    path = ref_model("golden-rwkv6")
    d = tmp_path_factory.mktemp("tuning")
    ts = random_state_tuning(path, d / "tuned.pth", seed=0)
    merged = {**{k: v for k, v in torch.load(path, weights_only=True).items()}, **ts}
    torch.save(merged, d / "merged.pth")
    return path, d / "tuned.pth", d / "merged.pth", d


def reference_logits(merged_path):
    """The PyTorch reference with the time_state merged into the checkpoint (it starts from it)."""
    ck = load_checkpoint(merged_path)
    m = rwkv6.Model.from_weights(ck.weights)
    st, out = m.new_state(1), []
    with torch.no_grad():
        for t in PROMPT:
            lg, st = m.step(torch.tensor([t]), st)
            out.append(lg[0].numpy())
    return np.stack(out)


def test_state_tuning_baked_into_export(tuned):
    base, tuning, merged, d = tuned
    truth = reference_logits(merged)
    p = export(base, d / "baked.onnx", ExportOptions(state_tuning=str(tuning)))[0]
    s = rwkv_runtime.Session(p)
    assert s.manifest.initial_state == "embedded"
    logits, _ = step_all(s, PROMPT)
    assert np.abs(logits - truth).max() <= 1e-5
    plain = rwkv_runtime.Session(export(base, d / "plain.onnx", ExportOptions(graphs=("step",)))[0])
    untuned, _ = step_all(plain, PROMPT)
    assert np.abs(untuned - truth).max() > 1e-2  # the learned state really changes the output
    # a checkpoint with time_state merged in exports the same starting state
    s2 = rwkv_runtime.Session(export(merged, d / "merged.onnx", ExportOptions(graphs=("step",)))[0])
    assert np.abs(step_all(s2, PROMPT)[0] - truth).max() <= 1e-5


def test_state_tuning_loaded_by_runtime(tuned):
    base, tuning, merged, d = tuned
    truth = reference_logits(merged)
    npz = state_tuning_to_npz(base, tuning, d / "tuned.npz")
    plain = export(base, d / "p.onnx", ExportOptions(graphs=("step",)))[0]
    s = rwkv_runtime.Session(plain, initial_state=npz)
    logits, _ = step_all(s, PROMPT)
    assert np.abs(logits - truth).max() <= 1e-5
    st = s.new_state(3).numpy()  # broadcast over a batch
    assert np.allclose(st["state.0.wkv"][0], st["state.0.wkv"][2]) and np.abs(st["state.0.wkv"]).max() > 0


def test_rwkv4_has_no_state_tuning(rwkv4_ref, tmp_path, tuned):
    from rwkv_export.errors import ExportError

    with pytest.raises(ExportError, match="RWKV-4 has no learned initial state"):
        export(rwkv4_ref, tmp_path / "x.onnx", ExportOptions(state_tuning=str(tuned[1])))
    assert not list(tmp_path.glob("*.onnx"))
