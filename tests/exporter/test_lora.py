"""export --lora: a LoRA adapter (RWKV-PEFT's <weight>.lora_A / .lora_B layout) merged while streaming
equals the checkpoint merged independently here with torch and exported plainly."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import rwkv_runtime
from rwkv_export.cli import main
from rwkv_export.export import ExportOptions, export

from ..conftest import ref_model
from ..helpers import step_all

PROMPT = list(b"Describe it.")
RANK, ALPHA = 4, 12.0


def make_adapter(base: dict, path, seed=0, extra_plain=True):
    """A LoRA pair for every layer matrix, the head and the embedding, plus one trained non-LoRA tensor
    (RWKV-PEFT saves those beside the pairs); values scaled so the merge changes the logits clearly."""
    g = torch.Generator().manual_seed(seed)
    ad = {}
    for k, v in base.items():
        if k.endswith(".weight") and v.ndim == 2:
            out_f, in_f = v.shape
            p = k[: -len(".weight")]
            ad[p + ".lora_A"] = torch.randn(RANK, in_f, generator=g) * in_f**-0.5
            ad[p + ".lora_B"] = torch.randn(out_f, RANK, generator=g) * 0.05
    if extra_plain:
        ad["blocks.0.ln1.weight"] = base["blocks.0.ln1.weight"] * 1.1
    torch.save(ad, path)
    return ad


def merge_independently(base: dict, ad: dict, alpha) -> dict:
    """ChatRWKV merge_lora.py's rule, written here: W += B @ A * (alpha / r); other keys replace."""
    w = {k: v.clone().float() for k, v in base.items()}
    for k, v in ad.items():
        if not k.endswith((".lora_A", ".lora_B")):
            w[k] = v.clone().float()
    for k in list(w):
        p = k[: -len(".weight")] if k.endswith(".weight") else None
        if p and p + ".lora_A" in ad:
            A, B = ad[p + ".lora_A"].float(), ad[p + ".lora_B"].float()
            w[k] = w[k] + (B @ A) * ((alpha if alpha is not None else B.shape[1]) / B.shape[1])
    return w


@pytest.mark.parametrize("version", ["rwkv4", "rwkv5.2", "rwkv6", "rwkv7"])
def test_lora_merge_equals_independent_merge(version, tmp_path):
    base_path = ref_model(f"golden-{version}")
    base = torch.load(base_path, weights_only=True)
    ad = make_adapter(base, tmp_path / "adapter.pth")
    torch.save(merge_independently(base, ad, ALPHA), tmp_path / "merged.pth")

    want = export(tmp_path / "merged.pth", tmp_path / "want.onnx")[0]
    opts = ExportOptions(lora=str(tmp_path / "adapter.pth"), lora_alpha=ALPHA)
    got = export(base_path, tmp_path / "got.onnx", opts)[0]
    plain = export(base_path, tmp_path / "plain.onnx", ExportOptions(graphs=("step",)))[0]
    sw, sg = rwkv_runtime.Session(want), rwkv_runtime.Session(got)
    lw, _ = step_all(sw, PROMPT)
    lg, _ = step_all(sg, PROMPT)
    assert np.abs(lg - lw).max() <= 1e-5
    # the sequence graph too (it reads the same merged weights)
    pw, _ = sw.prefill([PROMPT])
    pg, _ = sg.prefill([PROMPT])
    assert np.abs(np.asarray(pg) - np.asarray(pw)).max() <= 1e-5
    lp, _ = step_all(rwkv_runtime.Session(plain), PROMPT)
    assert np.abs(lp - lw).max() > 1e-2  # the adapter really changes the model
    assert sg.manifest.source.get("lora") == "adapter.pth"


def test_lora_default_alpha_is_rank(tmp_path):
    base_path = ref_model("golden-rwkv7")
    base = torch.load(base_path, weights_only=True)
    ad = make_adapter(base, tmp_path / "a.pth", seed=1, extra_plain=False)
    torch.save(merge_independently(base, ad, None), tmp_path / "m.pth")
    want = export(tmp_path / "m.pth", tmp_path / "w.onnx", ExportOptions(graphs=("step",)))[0]
    got = export(base_path, tmp_path / "g.onnx", ExportOptions(graphs=("step",), lora=str(tmp_path / "a.pth")))[0]
    lw, _ = step_all(rwkv_runtime.Session(want), PROMPT)
    lg, _ = step_all(rwkv_runtime.Session(got), PROMPT)
    assert np.abs(lg - lw).max() <= 1e-5


def test_reference_model_with_lora(tmp_path):
    """The non-streaming load (the PyTorch reference behind validate/quality) merges eagerly, the same."""
    from rwkv_export.checkpoint import load_checkpoint
    from rwkv_export.export import reference_model

    base_path = ref_model("golden-rwkv4")
    base = torch.load(base_path, weights_only=True)
    ad = make_adapter(base, tmp_path / "a.pth", seed=2)
    torch.save(merge_independently(base, ad, ALPHA), tmp_path / "m.pth")
    a = reference_model(load_checkpoint(base_path, lora=tmp_path / "a.pth", lora_alpha=ALPHA))
    b = reference_model(tmp_path / "m.pth")
    with torch.no_grad():
        sa, sb = a.new_state(1), b.new_state(1)
        for t in PROMPT[:5]:
            la, sa = a.step(torch.tensor([t]), sa)
            lb, sb = b.step(torch.tensor([t]), sb)
            assert torch.allclose(la, lb, atol=1e-5)


def _cli(*args):
    return CliRunner().invoke(main, ["export", *map(str, args), "-q"])


@pytest.fixture
def rwkv4(tmp_path):
    base_path = ref_model("golden-rwkv4")
    return base_path, torch.load(base_path, weights_only=True)


@pytest.mark.parametrize(
    "case,message",
    [
        ("shape", "shapes do not match blocks.0.att.key.weight"),
        ("half", "blocks.0.att.key.lora_B is missing"),
        ("absent", "which the checkpoint does not have"),
        ("empty", "not a LoRA adapter"),
        ("pissa", "is not a LoRA pair of this layout"),
        ("unknown", "neither a LoRA pair nor a tensor of the checkpoint"),
        ("plainshape", "has shape"),
        ("nan", "NaN or infinite"),
    ],
)
def test_lora_refusals(rwkv4, tmp_path, case, message):
    base_path, base = rwkv4
    C = base["blocks.0.att.key.weight"].shape[1]
    good = {"blocks.0.att.key.lora_A": torch.randn(RANK, C), "blocks.0.att.key.lora_B": torch.randn(C, RANK)}
    ad = dict(good)
    if case == "shape":
        ad["blocks.0.att.key.lora_A"] = torch.randn(RANK, C + 1)
    elif case == "half":
        del ad["blocks.0.att.key.lora_B"]
    elif case == "absent":
        ad = {"blocks.9.att.key.lora_A": torch.randn(RANK, C), "blocks.9.att.key.lora_B": torch.randn(C, RANK)}
    elif case == "empty":
        ad = {"blocks.0.ln1.weight": base["blocks.0.ln1.weight"]}
    elif case == "pissa":
        ad["blocks.0.att.key.init_lora_A"] = torch.randn(RANK, C)
    elif case == "unknown":
        ad["blocks.0.att.nonsense"] = torch.randn(C)
    elif case == "plainshape":
        ad["blocks.0.ln1.weight"] = torch.randn(C + 2)
    elif case == "nan":
        ad["blocks.0.att.key.lora_B"] = torch.full((C, RANK), float("nan"))
    torch.save(ad, tmp_path / "a.pth")
    res = _cli(base_path, "-o", tmp_path / "m.onnx", "--lora", tmp_path / "a.pth")
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0], res.output
    assert not list(tmp_path.glob("m.onnx*"))


def test_lora_alpha_without_lora_and_bad_alpha(rwkv4, tmp_path):
    base_path, base = rwkv4
    res = _cli(base_path, "-o", tmp_path / "m.onnx", "--lora-alpha", "16")
    assert res.exit_code == 1 and "Error: --lora-alpha applies to --lora" in res.output
    make_adapter(base, tmp_path / "a.pth")
    res = _cli(base_path, "-o", tmp_path / "m.onnx", "--lora", tmp_path / "a.pth", "--lora-alpha", "-1")
    assert res.exit_code == 1 and "Error: --lora-alpha must be a positive number" in res.output
    assert not list(tmp_path.glob("m.onnx*"))


def test_lora_cli_merges(rwkv4, tmp_path):
    base_path, base = rwkv4
    ad = make_adapter(base, tmp_path / "a.pth")
    torch.save(merge_independently(base, ad, ALPHA), tmp_path / "m.pth")
    res = _cli(
        base_path, "-o", tmp_path / "got.onnx", "--graphs", "step", "--lora", tmp_path / "a.pth", "--lora-alpha", ALPHA
    )
    assert res.exit_code == 0, res.output
    assert "merged LoRA" in res.output
    want = export(tmp_path / "m.pth", tmp_path / "want.onnx", ExportOptions(graphs=("step",)))[0]
    lw, _ = step_all(rwkv_runtime.Session(want), PROMPT)
    lg, _ = step_all(rwkv_runtime.Session(tmp_path / "got.onnx"), PROMPT)
    assert np.abs(lg - lw).max() <= 1e-5
