"""The PyTorch reference RWKV-4 computes what BlinkDL's implementation computes, in both forms."""

import numpy as np
import pytest
import torch

from rwkv_export.arch import rwkv4
from rwkv_export.checkpoint import load_checkpoint

from ..conftest import PROMPTS, ref_logits
from ..helpers import blinkdl_logits, random_rwkv4


@pytest.fixture(scope="module")
def model(rwkv4_ref):
    return rwkv4.Model.from_weights(load_checkpoint(rwkv4_ref).weights)


@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_step_form_matches_blinkdl_logits(model, prompt):
    st, out = model.new_state(1), []
    with torch.no_grad():
        for t in PROMPTS[prompt]:
            logits, st = model.step(torch.tensor([t]), st)
            out.append(logits[0].numpy())
    assert np.abs(np.stack(out) - ref_logits("golden-rwkv4", prompt)).max() <= 1e-5


def test_sequence_form_equals_step_form(model):
    tokens = list(PROMPTS["atom"])
    with torch.no_grad():
        st, out = model.new_state(1), []
        for t in tokens:
            logits, st = model.step(torch.tensor([t]), st)
            out.append(logits[0])
        seq_logits, seq_st = model.sequence(torch.tensor([tokens]), model.new_state(1))
    assert np.abs(seq_logits[0].numpy() - torch.stack(out).numpy()).max() <= 1e-5
    for key in st:
        assert torch.allclose(st[key], seq_st[key], atol=1e-5, rtol=1e-5), key


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_parallel_wkv_chunk_size_does_not_matter(chunk):
    """The chunked parallel WKV gives the same outputs and state at any chunk size (one chunk: 1000)."""
    g = torch.Generator().manual_seed(chunk)
    T, C = 70, 128
    k, v = torch.randn(1, T, C, generator=g), torch.randn(1, T, C, generator=g)
    w, u = -torch.exp(torch.randn(C, generator=g)), torch.randn(C, generator=g)
    aa, bb, pp = torch.zeros(1, C), torch.zeros(1, C), torch.full((1, C), -1e30)
    a = rwkv4.wkv4_parallel(w, u, k, v, aa, bb, pp, chunk)
    b = rwkv4.wkv4_parallel(w, u, k, v, aa, bb, pp, 1000)
    for p, q in zip(a, b):
        assert torch.allclose(p, q, atol=1e-5, rtol=1e-5)


def test_random_odd_shapes_match_blinkdl_package(tmp_path):
    pytest.importorskip("rwkv", reason="BlinkDL's rwkv package is not installed")
    path = random_rwkv4(tmp_path / "odd.pth", n_embd=72, n_layer=3, ffn=200, vocab=301, seed=3)
    tokens = [5, 300, 17, 0, 42, 42, 9, 150]
    truth = blinkdl_logits(path, tokens)
    m = rwkv4.Model.from_weights(load_checkpoint(path).weights)
    st, out = m.new_state(1), []
    with torch.no_grad():
        for t in tokens:
            logits, st = m.step(torch.tensor([t]), st)
            out.append(logits[0].numpy())
    assert np.abs(np.stack(out) - truth).max() <= 1e-4
