"""scripts/bench_llamacpp.py writes the same weights in the Hugging Face layout llama.cpp's converter
reads: every tensor under a name gguf-py's RWKV-7 tensor map knows (llama.cpp's own `gguf` package from
PyPI, a dev dependency), the values unchanged."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from ..conftest import ref_model

REPO = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_llamacpp", REPO / "scripts" / "bench_llamacpp.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_hf_names_are_unique_and_keep_the_layer():
    w = torch.load(ref_model("golden-rwkv7"), weights_only=True)
    names = {k: _bench().hf_name(k) for k in w}
    assert len(set(names.values())) == len(names)
    assert names["emb.weight"] == "model.embeddings.weight" and names["head.weight"] == "head.weight"
    assert names["blocks.1.att.receptance.weight"] == "model.layers.1.attention.receptance.weight"
    assert names["blocks.1.ffn.value.weight"] == "model.layers.1.feed_forward.value.weight"
    assert names["blocks.0.ln0.bias"] == "model.layers.0.pre_norm.bias"


def test_every_tensor_maps_to_a_gguf_rwkv7_name():
    import gguf

    w = torch.load(ref_model("golden-rwkv7"), weights_only=True)
    n_layer = 1 + max(int(k.split(".")[1]) for k in w if k.startswith("blocks."))
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.RWKV7, n_layer)
    bench = _bench()
    for k in w:
        name = bench.hf_name(k)
        if ".attention.x_" in name:
            continue  # the converter stacks x_r..x_g into one tensor itself
        assert tmap.get_name(name, try_suffixes=(".weight", ".bias")) is not None, (k, name)
