"""Damaged checkpoints and configs: a clean ``Error:`` line with exit 1, or an export that computes
what BlinkDL's own package computes from the same file; never a traceback. The named cases of the
issue are regression tests; a hypothesis suite generates the rest."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from rwkv_export.cli import main

from ..conftest import ref_model
from ..helpers import blinkdl_logits

NAME = "golden-rwkv4"
TOKENS = list(b'"in')


def cli(*args) -> tuple[int, str]:
    res = CliRunner().invoke(main, [str(a) for a in args])
    if res.exit_code not in (0, 1) or (res.exception is not None and not isinstance(res.exception, SystemExit)):
        raise AssertionError(f"exit {res.exit_code}, {res.exception!r}\n{res.output}")
    return res.exit_code, res.output


def one_error(code: int, output: str) -> str:
    lines = output.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("Error:"), output
    assert "Traceback" not in output and "rwkv-export-" not in output
    return lines[0]


@pytest.fixture(scope="module")
def sd():
    return torch.load(ref_model(NAME), weights_only=True)


def export_dict(d: dict, tmp: Path, *extra) -> tuple[int, str]:
    torch.save(d, tmp / "ck.pth")
    return cli("export", tmp / "ck.pth", "-o", tmp / "m.onnx", "-q", *extra)


@pytest.mark.parametrize(
    "change, expect",
    [
        (lambda d: {**d, 7: d["emb.weight"]}, "not a string"),
        (lambda d: {**d, "blocks.extra.foo": torch.zeros(3)}, "'blocks.extra.foo' does not name a layer"),
        (lambda d: {**d, "blocks.0.att.key.weight": d["blocks.0.att.key.weight"].to(torch.int32)}, "is int32"),
        (lambda d: {**d, "blocks.1.ln1.weight": d["blocks.1.ln1.weight"] > 0}, "is bool"),
        (lambda d: {**d, "head.weight": d["head.weight"].to(torch.complex64)}, "is complex64"),
        (lambda d: {**d, "emb.weight": d["emb.weight"][:0], "head.weight": d["head.weight"][:0]}, "vocabulary"),
    ],
)
def test_named_checkpoint_cases(sd, tmp_path, change, expect):
    assert expect in one_error(*export_dict(change(dict(sd)), tmp_path))
    assert not (tmp_path / "m.onnx").exists()


def test_nonfinite_weights_refused_unless_allowed(sd, tmp_path):
    d = dict(sd)
    d["blocks.1.att.value.weight"] = d["blocks.1.att.value.weight"].clone()
    d["blocks.1.att.value.weight"][3, 4] = float("nan")
    assert "'blocks.1.att.value.weight' holds NaN" in one_error(*export_dict(d, tmp_path))
    code, out = export_dict(d, tmp_path, "--allow-nonfinite")
    assert code == 0 and (tmp_path / "m.onnx").is_file(), out


@pytest.mark.parametrize(
    "text, expect",
    [
        (b"null", "expected a JSON object, found null"),
        (b"[1, 2]", "expected a JSON object, found list"),
        (b'{"hidden_size": "\xff\xfe"}', "not UTF-8"),
        (b'{"layer_norm_epsilon": "small"}', "layer_norm_epsilon must be a number"),
        (b'{"rescale_every": true}', "rescale_every must be a number"),
        (b'{"layer_norm_epsilon": -1}', "layer_norm_epsilon must be in (0, 1)"),
        (b'{"model_type": 3}', "model_type must be a string"),
    ],
)
def test_hf_config_cases(sd, tmp_path, text, expect):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_bytes(text)
    torch.save(sd, hf / "pytorch_model.bin")
    assert expect in one_error(*cli("export", hf, "-o", tmp_path / "m.onnx", "-q"))


def test_os_errors_name_the_users_path(sd, tmp_path):
    (tmp_path / "dir.pth").mkdir()
    assert f"{tmp_path / 'dir.pth'}" in one_error(*cli("export", tmp_path / "dir.pth", "-o", tmp_path / "m.onnx", "-q"))
    torch.save(sd, tmp_path / "ck.pth")
    assert "is an input" in one_error(*cli("export", tmp_path / "ck.pth", "-o", tmp_path / "ck.pth", "-q"))
    assert "does not exist" in one_error(*cli("export", tmp_path / "ck.pth", "-o", tmp_path / "no" / "m.onnx", "-q"))


def test_malformed_embedded_initial_state_is_one_line(tmp_path):
    """A model whose manifest promises an embedded initial state it does not carry (or carries
    damaged): a clear error from every command, never click's bare "Aborted!"."""
    import onnx

    from rwkv_export.export import export
    from rwkv_runtime.manifest import INITIAL_STATE_KEY

    out = export(ref_model("golden-rwkv7"), tmp_path / "m.onnx")[0]
    m = onnx.load(str(out))
    props = {p.key: p.value for p in m.metadata_props}
    man = json.loads(props["rwkv.manifest"])
    man["initial_state"] = "embedded"
    for payload in (None, "not base64 !!", "UEsDBAo="):  # missing; not base64; a truncated zip
        new = {**props, "rwkv.manifest": json.dumps(man)}
        new.pop(INITIAL_STATE_KEY, None)
        if payload is not None:
            new[INITIAL_STATE_KEY] = payload
        del m.metadata_props[:]
        onnx.helper.set_model_props(m, new)
        onnx.save(m, str(tmp_path / "bad.onnx"))
        for cmd in (["generate", tmp_path / "bad.onnx", "-p", "x", "-n", "2"], ["inspect", tmp_path / "bad.onnx"]):
            code, output = cli(*cmd)
            if code == 0:  # inspect may print the manifest without decoding the state
                assert cmd[0] == "inspect"
                continue
            assert "Aborted" not in output
            one_error(code, output)


# -- generated damage ----------------------------------------------------------------------------
_DTYPES = [torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.uint8, torch.bool, torch.complex64]


_ODD_KEYS = [
    "blocks.x.att.key",
    "blocks.-1.ln1.weight",
    "blocks.0.",
    "blocks.99999999.ln1.weight",
    "blocks.1.att.time_state",
    "blocks.0.att.k_k",
    "emb.weight.extra",
]


def damage(sd: dict, data) -> tuple[dict, list]:
    """Apply 1-3 generated kinds of damage to a copy of ``sd``; returns it and what was done."""
    d, done = dict(sd), []
    for _ in range(data.draw(st.integers(1, 3))):
        k = data.draw(st.sampled_from(sorted(x for x in d if isinstance(x, str))))
        kind = data.draw(st.sampled_from(["dtype", "nonfinite", "shape", "drop", "add", "scalar", "empty"]))
        done.append((kind, k))
        if kind == "dtype":
            d[k] = d[k].to(data.draw(st.sampled_from(_DTYPES)))
        elif kind == "nonfinite" and d[k].is_floating_point() and d[k].numel():
            t = d[k].clone().reshape(-1)
            t[data.draw(st.integers(0, t.numel() - 1))] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
            d[k] = t.reshape(d[k].shape)
        elif kind == "shape":
            d[k] = d[k].reshape(-1) if data.draw(st.booleans()) else d[k].reshape(-1)[: max(1, d[k].numel() // 2)]
        elif kind == "drop":
            d.pop(k)
        elif kind == "scalar":
            d[k] = torch.tensor(data.draw(st.floats(-1e3, 1e3)))
        elif kind == "empty":
            d[k] = torch.zeros(0, *d[k].shape[1:])
        elif kind == "add":
            new = data.draw(st.one_of(st.integers(-5, 5), st.text(max_size=20), st.sampled_from(_ODD_KEYS)))
            d[new] = data.draw(st.sampled_from([torch.zeros(3), torch.ones(2, 2), d[k]]), label="value")
            done[-1] = (kind, new)
    return d, done


@pytest.mark.slow
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(data=st.data())
def test_generated_damaged_checkpoints(sd, data):
    d, done = damage(sd, data)
    data.draw(st.just(done), label="damage")  # what was done, in the report of a failing example
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        code, output = export_dict(d, tmp)
        event("refused" if code else "exported")
        if code == 1:
            one_error(code, output)
            assert sorted(p.name for p in tmp.iterdir()) == ["ck.pth"], "files left after a failed export"
            return
        # exported: it must compute what BlinkDL's package computes from the same file
        from rwkv_runtime import Session

        try:
            truth = blinkdl_logits(tmp / "ck.pth", TOKENS)[-1]
        except Exception as e:  # noqa: BLE001  the reference cannot run it: we should have refused
            raise AssertionError(f"exported a checkpoint BlinkDL's package cannot run ({e!r})") from None
        s = Session(tmp / "m.onnx")
        st_ = s.new_state()
        for t in TOKENS:
            logits, st_ = s.step(t, st_)
        np.testing.assert_allclose(np.asarray(logits).reshape(-1), truth, atol=1e-3, rtol=1e-3)


_LEAF = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True) | st.text(max_size=8)
_JSON = st.recursive(
    _LEAF, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3), max_leaves=6
)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    torch.manual_seed(0)
    cfg = transformers.RwkvConfig(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=2,
        attention_hidden_size=32,
        intermediate_size=64,
        context_length=32,
    )
    d = tmp_path_factory.mktemp("hf")
    transformers.RwkvForCausalLM(cfg).save_pretrained(d)
    return d


@pytest.mark.slow
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(
    top=st.one_of(st.just("dict"), _JSON),
    fields=st.dictionaries(
        st.sampled_from(
            [
                "layer_norm_epsilon",
                "rescale_every",
                "hidden_size",
                "vocab_size",
                "model_type",
                "num_hidden_layers",
                "attention_hidden_size",
                "intermediate_size",
            ]
        ),
        _JSON,
        max_size=4,
    ),
    raw=st.one_of(st.none(), st.binary(max_size=12)),
)
def test_generated_hf_configs(hf_model, top, fields, raw):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hf = tmp / "hf"
        shutil.copytree(hf_model, hf)
        base = json.loads((hf / "config.json").read_text())
        if raw is not None:
            (hf / "config.json").write_bytes(raw)
        else:
            (hf / "config.json").write_text(json.dumps({**base, **fields} if top == "dict" else top))
        code, output = cli("export", hf, "-o", tmp / "m.onnx", "-q")
        event("refused" if code else "exported")
        if code == 1:
            one_error(code, output)
            return
        from rwkv_runtime import Session

        logits, _ = Session(tmp / "m.onnx").prefill([1, 2, 3])
        assert np.isfinite(np.asarray(logits)).all()


def test_damaged_state_tuning_file_is_one_line(tmp_path):
    ck = ref_model("golden-rwkv7")
    for name, content in (
        ("odd.pth", {"blocks.0.att.time_state": torch.zeros(3, 5)}),
        ("none.pth", {"foo": torch.zeros(2)}),
        ("layer.pth", {"blocks.99.att.time_state": torch.zeros(1, 64, 64)}),
    ):
        torch.save(content, tmp_path / name)
        code, out = cli("export", ck, "-o", tmp_path / "m.onnx", "-q", "--state-tuning", tmp_path / name)
        one_error(code, out)
    (tmp_path / "junk.pth").write_bytes(b"\x80junk")
    one_error(*cli("export", ck, "-o", tmp_path / "m.onnx", "-q", "--state-tuning", tmp_path / "junk.pth"))
    assert not (tmp_path / "m.onnx").exists()
