"""Hugging Face checkpoints of every version (transformers' RWKV-4, the RWKV-5/6 remote-code layouts,
fla's RWKV7ForCausalLM): the golden models written here in each HF layout, by an inverse mapping of
the test's own (from the published modeling code's parameter names), export to the same logits as
the BlinkDL .pth they came from."""

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import rwkv_runtime
from rwkv_export.export import ExportOptions, export

from ..conftest import ref_model
from ..helpers import step_all

PROMPT = list(b"Hello, HF!")
MODEL_TYPE = {"rwkv4": "rwkv", "rwkv5": "rwkv5", "rwkv5.2": "rwkv5", "rwkv6": "rwkv6", "rwkv7": "rwkv7"}


def hf_v456(w: dict) -> dict:
    """BlinkDL -> transformers' RwkvForCausalLM naming (also the v5/v6 remote code's)."""
    long = {"k": "key", "v": "value", "r": "receptance", "g": "gate"}
    out = {}
    for k, v in w.items():
        if k == "head.weight":
            out[k] = v
            continue
        n = k.replace("emb.weight", "embeddings.weight").replace("blocks.0.ln0.", "blocks.0.pre_ln.")
        n = re.sub(r"^(blocks\.\d+)\.att\.", r"\1.attention.", n)
        n = re.sub(r"^(blocks\.\d+)\.ffn\.", r"\1.feed_forward.", n)
        n = re.sub(r"\.time_mix_([kvrg])$", lambda m: ".time_mix_" + long[m.group(1)], n)
        out["rwkv." + n] = v
    return out


def hf_fla_rwkv7(w: dict) -> dict:
    """BlinkDL -> fla's RWKV7ForCausalLM: Linear-style low-rank matrices (transposed), their bias,
    [C] vectors where fla keeps them flat, projections renamed."""
    top = {
        "emb.weight": "model.embeddings.weight",
        "ln_out.weight": "model.norm.weight",
        "ln_out.bias": "model.norm.bias",
        "head.weight": "lm_head.weight",
    }
    module = {"att": "attn", "ffn": "ffn", "ln0": "pre_norm", "ln1": "attn_norm", "ln2": "ffn_norm"}
    proj = {"receptance": "r_proj", "key": "k_proj", "value": "v_proj", "output": "o_proj", "ln_x": "g_norm"}
    out = {}
    for k, v in w.items():
        if k in top:
            out[top[k]] = v
            continue
        _, i, mod, rest = k.split(".", 3)
        if k in ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"):
            continue  # fla's first layer has no value-residual LoRA
        m = re.match(r"^([wvag])([012])$", rest)
        if mod == "att" and m:
            t, n = m.groups()
            name = {"0": "lora.2.bias", "1": "lora.0.weight", "2": "lora.2.weight"}[n]
            v = v.reshape(-1) if n == "0" else v.t().contiguous()
            out[f"model.layers.{i}.attn.{t}_lora.{name}"] = v
            continue
        head = rest.split(".")[0]
        if mod == "att" and head in proj:
            rest = proj[head] + rest[len(head) :]
        if rest in ("k_k", "k_a") or (mod == "ffn" and rest == "x_k"):
            v = v.reshape(-1)
        out[f"model.layers.{i}.{module[mod]}.{rest}"] = v
    return out


def write_hf(version: str, d, shards: int = 1, model_type=None, extra_cfg=None):
    w = torch.load(ref_model(f"golden-{version}"), weights_only=True)
    hf = hf_fla_rwkv7(w) if version == "rwkv7" else hf_v456(w)
    hf = {k: v.contiguous() for k, v in hf.items()}
    d.mkdir()
    cfg = {
        "model_type": model_type or MODEL_TYPE[version],
        "vocab_size": int(w["emb.weight"].shape[0]),
        "hidden_size": int(w["emb.weight"].shape[1]),
        **(extra_cfg or {}),
    }
    (d / "config.json").write_text(json.dumps(cfg))
    if shards == 1:
        save_file(hf, str(d / "model.safetensors"))
    else:
        names = sorted(hf)
        wmap = {}
        for s in range(shards):
            fn = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: hf[k] for k in names[s::shards]}
            save_file(part, str(d / fn))
            wmap.update({k: fn for k in part})
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    return d


def logits_of(model):
    return step_all(rwkv_runtime.Session(model), PROMPT)[0]


@pytest.mark.parametrize("version", ["rwkv4", "rwkv5", "rwkv5.2", "rwkv6", "rwkv7"])
def test_hf_layout_exports_as_the_blinkdl_checkpoint(version, tmp_path):
    hf = write_hf(version, tmp_path / "hf")
    a = export(hf, tmp_path / "hf.onnx")[0]
    b = export(ref_model(f"golden-{version}"), tmp_path / "pth.onnx")[0]
    sa = rwkv_runtime.Session(a)
    assert sa.manifest.architecture == version and sa.manifest.source["format"] == "huggingface"
    la, lb = logits_of(a), logits_of(b)
    assert np.array_equal(la, lb), np.abs(la - lb).max()
    pa, _ = sa.prefill([PROMPT])
    pb, _ = rwkv_runtime.Session(b).prefill([PROMPT])
    assert np.array_equal(np.asarray(pa), np.asarray(pb))


@pytest.mark.parametrize("version", ["rwkv6", "rwkv7"])
def test_sharded_hf_checkpoint(version, tmp_path):
    hf = write_hf(version, tmp_path / "hf", shards=3)
    a = export(hf, tmp_path / "hf.onnx", ExportOptions(graphs=("step",)))[0]
    b = export(ref_model(f"golden-{version}"), tmp_path / "pth.onnx", ExportOptions(graphs=("step",)))[0]
    assert np.array_equal(logits_of(a), logits_of(b))


def test_fla_tied_embeddings(tmp_path):
    """tie_word_embeddings without lm_head.weight: the head is the embedding."""
    w = torch.load(ref_model("golden-rwkv7"), weights_only=True)
    w["head.weight"] = w["emb.weight"].clone()
    torch.save(w, tmp_path / "tied.pth")
    hf = write_hf("rwkv7", tmp_path / "hf", extra_cfg={"tie_word_embeddings": True})
    from safetensors.torch import load_file

    t = load_file(str(hf / "model.safetensors"))
    del t["lm_head.weight"]
    save_file(t, str(hf / "model.safetensors"))
    a = export(hf, tmp_path / "hf.onnx", ExportOptions(graphs=("step",)))[0]
    b = export(tmp_path / "tied.pth", tmp_path / "pth.onnx", ExportOptions(graphs=("step",)))[0]
    assert np.array_equal(logits_of(a), logits_of(b))


def _error(hf, tmp_path):
    """The export refuses with one line (a CheckpointError: the CLI prints it as its Error line) and
    writes nothing."""
    from rwkv_export.errors import CheckpointError

    with pytest.raises(CheckpointError) as e:
        export(hf, tmp_path / "m.onnx")
    assert "\n" not in str(e.value)
    assert not list(tmp_path.glob("m.onnx*"))
    return str(e.value)


def test_mislabelled_model_type_refused(tmp_path):
    hf = write_hf("rwkv6", tmp_path / "hf", model_type="rwkv5")
    assert "config.json says model_type 'rwkv5' but the weights are rwkv6" in _error(hf, tmp_path)


def test_unknown_model_type_refused(tmp_path):
    hf = write_hf("rwkv6", tmp_path / "hf", model_type="llama")
    assert "model_type 'llama' is not an RWKV layout" in _error(hf, tmp_path)


def test_fla_unknown_key_refused(tmp_path):
    hf = write_hf("rwkv7", tmp_path / "hf")
    from safetensors.torch import load_file

    t = load_file(str(hf / "model.safetensors"))
    t["model.layers.0.attn.w_lora.lora.1.weight"] = torch.zeros(2)
    save_file(t, str(hf / "model.safetensors"))
    assert "not part of fla's RWKV7ForCausalLM layout" in _error(hf, tmp_path)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", ".hidden.safetensors"])
def test_shard_index_cannot_point_outside(tmp_path, shard):
    hf = write_hf("rwkv6", tmp_path / "hf", shards=2)
    idx = json.loads((hf / "model.safetensors.index.json").read_text())
    first = next(iter(idx["weight_map"]))
    idx["weight_map"][first] = shard
    (hf / "model.safetensors.index.json").write_text(json.dumps(idx))
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    assert "is not a file name inside" in _error(hf, tmp_path)


def test_duplicate_tensor_across_shards_refused(tmp_path):
    hf = write_hf("rwkv6", tmp_path / "hf", shards=2)
    from safetensors.torch import load_file

    a, b = sorted(hf.glob("model-*.safetensors"))
    ta, tb = load_file(str(a)), load_file(str(b))
    k = next(iter(ta))
    tb[k] = ta[k]
    save_file(tb, str(b))
    assert "is also in another shard" in _error(hf, tmp_path)
