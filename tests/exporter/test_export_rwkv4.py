"""The exported RWKV-4 ONNX, run through rwkv_runtime, computes what the checkpoint computes."""

import json

import numpy as np
import onnx
import pytest

import rwkv_runtime
from rwkv_export.export import ExportOptions, export, load_manifest

from ..conftest import PROMPTS, ref_logits
from ..helpers import blinkdl_logits, random_rwkv4, step_all

NAME = "golden-rwkv4"


@pytest.mark.parametrize("wkv", ["plain", "plugin"])
@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_step_graph_matches_blinkdl_step_by_step(rwkv4_exports, wkv, prompt):
    s = rwkv_runtime.Session(rwkv4_exports[wkv])
    logits, _ = step_all(s, PROMPTS[prompt])
    err = np.abs(logits - ref_logits(NAME, prompt)).max(axis=1)  # per step
    assert err.max() <= 1e-5, f"first bad step {int(np.argmax(err > 1e-5))}: {err.max():.2e}"


@pytest.mark.parametrize("wkv", ["plain", "plugin"])
def test_sequence_graph_matches_steps(rwkv4_exports, wkv):
    s = rwkv_runtime.Session(rwkv4_exports[wkv])
    tokens = list(PROMPTS["atom"])
    step_logits, step_state = step_all(s, tokens)
    logits, state = s.prefill(np.array([tokens]))
    assert np.abs(logits[0] - ref_logits(NAME, "atom")[-1]).max() <= 1e-5
    for k in state.keys():
        np.testing.assert_allclose(state[k], step_state[k], atol=1e-5, rtol=1e-5, err_msg=k)


def test_plugin_export_uses_custom_nodes_with_function_bodies(rwkv4_exports):
    m = onnx.load(str(rwkv4_exports["plugin"]))
    wkv = [n for n in m.graph.node if n.domain == "rwkv"]
    assert len(wkv) == 2 and {n.op_type for n in wkv} == {"WKV4"}
    assert {a.name for a in wkv[0].attribute} == {"plugin_version", "plugin_namespace"}
    assert {(f.domain, f.name) for f in m.functions} == {("rwkv", "WKV4")}
    seq = onnx.load(str(rwkv4_exports["plugin"]).replace(".onnx", ".seq.onnx"))
    assert {n.op_type for n in seq.graph.node if n.domain == "rwkv"} == {"WKV4Seq"}
    plain = onnx.load(str(rwkv4_exports["plain"]))
    assert not [n for n in plain.graph.node if n.domain == "rwkv"] and not plain.functions


def test_manifest_describes_the_model(rwkv4_exports):
    path = rwkv4_exports["plain"]
    onnx.checker.check_model(str(path), full_check=True)
    man = load_manifest(path)
    assert (man.architecture, man.n_layer, man.n_embd, man.vocab_size) == ("rwkv4", 2, 64, 256)
    assert man.graph == "step" and man.tokenizer == {"kind": "bytes"} and man.precision == "fp32"
    assert man.companions == {"step": path.name, "sequence": path.name.replace(".onnx", ".seq.onnx")}
    assert len(man.state) == 10  # 5 per layer
    pp = [s for s in man.state if s.name.endswith("wkv_pp")]
    assert pp and all(s.init == -1e30 for s in pp)
    m = onnx.load(str(path))
    ins = [i.name for i in m.graph.input]
    outs = [o.name for o in m.graph.output]
    assert ins == ["tokens"] + man.state_inputs and outs == ["logits"] + man.state_outputs
    # the batch axis is dynamic
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    json.loads(man.to_json())


def test_dynamic_batch_equals_one_by_one(rwkv4_exports):
    s = rwkv_runtime.Session(rwkv4_exports["plain"])
    prompts = [b"abc", b"xyz", b"hello"]
    st = s.new_state(3)
    for j in range(3):
        logits, st = s.step(np.array([p[j] for p in prompts]), st)
    for b, p in enumerate(prompts):
        single, _ = step_all(s, p[:3])
        np.testing.assert_allclose(logits[b], single[-1], atol=1e-5)


def test_random_odd_shapes_match_blinkdl_package(tmp_path):
    pytest.importorskip("rwkv", reason="BlinkDL's rwkv package is not installed")
    path = random_rwkv4(tmp_path / "odd.pth", n_embd=40, n_layer=5, ffn=96, vocab=77, seed=11)
    tokens = [1, 76, 3, 3, 50, 0, 21, 9, 9, 9, 60]
    truth = blinkdl_logits(path, tokens)
    onnx_path = export(path, tmp_path / "odd.onnx")[0]
    s = rwkv_runtime.Session(onnx_path)
    logits, st = step_all(s, tokens)
    assert np.abs(logits - truth).max() <= 1e-4
    pl, _ = s.prefill(np.array([tokens]), chunk_size=4)
    assert np.abs(pl[0] - truth[-1]).max() <= 1e-4


@pytest.mark.parametrize("layers, att, eps", [(3, 48, 1e-5), (13, 48, 1e-4)])
def test_huggingface_checkpoint_matches_transformers(tmp_path, layers, att, eps):
    """Including transformers' inference-time residual rescaling (every 6 blocks) and a non-default
    layer-norm eps. (transformers' own RWKV cannot run attention_hidden_size != hidden_size.)"""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    import torch

    torch.manual_seed(0)
    cfg = transformers.RwkvConfig(
        vocab_size=123,
        hidden_size=48,
        num_hidden_layers=layers,
        attention_hidden_size=att,
        intermediate_size=160,
        context_length=64,
        layer_norm_epsilon=eps,
    )
    model = transformers.RwkvForCausalLM(cfg).eval()
    with torch.no_grad():  # HF's init leaves some weights at exactly zero/one: make them all matter
        for name, p in model.named_parameters():
            if "time_decay" in name:
                p.copy_(torch.randn_like(p))
            elif p.dim() >= 1:
                p.add_(torch.randn_like(p) * 0.1)
    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir)
    tokens = [3, 99, 7, 7, 120, 0, 64, 5]
    with torch.no_grad():
        truth = model(torch.tensor([tokens])).logits[0].numpy()
    onnx_path = export(hf_dir, tmp_path / "hf.onnx")[0]
    s = rwkv_runtime.Session(onnx_path)
    logits, _ = step_all(s, tokens)
    assert np.abs(logits - truth).max() <= 1e-4
    pl, _ = s.prefill(np.array([tokens]))
    assert np.abs(pl[0] - truth[-1]).max() <= 1e-4


def test_failed_export_leaves_nothing_behind(tmp_path, rwkv4_ref, monkeypatch):
    import onnx as onnx_mod

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx_mod, "save_model", boom)
    with pytest.raises(rwkv_runtime.RuntimeUserError, match="no space left"):
        export(rwkv4_ref, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_external_data_export_runs(tmp_path, rwkv4_ref):
    """Both graphs point into one shared weights file (the step graph's Gemm layout is the sequence
    graph's too), each weight stored once."""
    step, seq = export(rwkv4_ref, tmp_path / "m.onnx", ExportOptions(external_data=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data", "m.seq.onnx"]
    onnx.checker.check_model(str(step))
    weights = sum(v.numel() * 4 for v in __import__("torch").load(rwkv4_ref, weights_only=True).values())
    assert (tmp_path / "m.onnx.data").stat().st_size < 1.1 * weights
    s = rwkv_runtime.Session(step)
    logits, _ = step_all(s, PROMPTS["in"])
    assert np.abs(logits - ref_logits(NAME, "in")).max() <= 1e-5
