"""The golden models in tests/golden are what make_golden.py makes, and BlinkDL's own package still
computes the committed logits on them (the truth every fast test compares against)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from . import make_golden as mg

VERSIONS = {
    "golden-rwkv4": "rwkv4",
    "golden-rwkv5": "rwkv5",
    "golden-rwkv5.2": "rwkv5.2",
    "golden-rwkv6": "rwkv6",
    "golden-rwkv7": "rwkv7",
}


@pytest.mark.parametrize("name", list(mg.ARCHS))
def test_weights_regenerate_from_their_seed(name):
    seed, kind, _ = mg.ARCHS[name]
    want = mg.build(kind, seed)
    got = torch.load(mg.HERE / f"{name}.pth", weights_only=True)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == torch.float32 and torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("name", list(mg.ARCHS))
def test_official_layout_and_size(name):
    from rwkv_export import arch
    from rwkv_export.checkpoint import load_checkpoint

    path = mg.HERE / f"{name}.pth"
    assert path.stat().st_size <= 600_000  # kept small: they live in the repository
    ck = load_checkpoint(path)
    assert ck.version == VERSIONS[name]
    cfg = arch.get(ck.version).config_from_weights(ck.weights)
    assert (cfg["n_layer"], cfg["n_embd"], cfg["vocab_size"]) == (mg.L, mg.C, mg.V)
    for prompt, text in mg.PROMPTS.items():
        logits = np.load(mg.HERE / f"{name}.blinkdl-logits-{prompt}.npy")
        assert logits.shape == (len(text), mg.V) and logits.dtype == np.float32 and np.isfinite(logits).all()
        assert logits.std() > 0.5  # a model whose logits barely move would make a weak truth


@pytest.mark.skipif(importlib.util.find_spec("rwkv") is None, reason="BlinkDL's rwkv package is not installed")
@pytest.mark.parametrize("name", list(mg.ARCHS))
def test_blinkdl_package_reproduces_committed_logits(name):
    _, _, v7 = mg.ARCHS[name]
    got = mg.blinkdl_logits(mg.HERE / f"{name}.pth", v7)
    for prompt in mg.PROMPTS:
        want = np.load(mg.HERE / f"{name}.blinkdl-logits-{prompt}.npy")
        assert np.abs(got[prompt] - want).max() <= 1e-5, prompt
