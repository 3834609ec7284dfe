"""``rwkv-export eval``: LAMBADA and perplexity of an export (and of its PyTorch reference) against an
independent computation with BlinkDL's own ``rwkv`` package (0.8.32, cpu fp32) on the same checkpoint,
scored here the way BlinkDL's RWKV-LM scripts score LAMBADA. The model is the embedded default model
(byte-level RWKV-4 trained on Python's standard library), so the data file is Python written for this
test, in LAMBADA's format."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from rwkv_export.cli import main

REPO = Path(__file__).resolve().parents[2]
CKPT = REPO / "exporter" / "default_model" / "tiny-rwkv4-pystdlib.pth"

DOCS = [
    "def __init__(self, name):\n        self.name = name",
    "for key, value in items.items():\n        result[key] = value",
    "import os\nimport sys\n\n\ndef main():\n    return sys",
    "class Error(Exception):\n    pass\n\n\nclass Warning(Exception):\n    pass",
    "    if not isinstance(value, str):\n        raise TypeError",
    "with open(path) as f:\n    data = f.read()\n    return data",
    "    def __repr__(self):\n        return f'{self.__class__.__name__}()'\n\n    def __len__(self):\n        return len(self._data)",
    "try:\n    import threading\nexcept ImportError:\n    threading = None",
    "        for i in range(len(self)):\n            yield self[i]",
]
TEXT = "\n\n".join(DOCS[:5]) + "\n"


@pytest.fixture(scope="module")
def export_path(tmp_path_factory):
    from rwkv_export.export import ExportOptions, export

    return export(CKPT, tmp_path_factory.mktemp("eval") / "m.onnx", ExportOptions())[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval-data")
    (d / "lambada.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS), encoding="utf-8")
    (d / "text.txt").write_text(TEXT, encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def blinkdl():
    import os

    os.environ.setdefault("RWKV_JIT_ON", "0")
    os.environ.setdefault("RWKV_CUDA_ON", "0")
    from rwkv.model import RWKV

    return RWKV(str(CKPT)[:-4], strategy="cpu fp32", verbose=False)


def _logp(logits, t) -> float:
    x = logits.double()
    return float(x[t] - x.max() - (x - x.max()).exp().sum().log())


def blinkdl_lambada(model, docs):
    """As RWKV-LM's run_lambada: rsplit(' ', 1), src = [0] + context, dst = ' ' + last word (bytes here)."""
    xsum, xacc = 0.0, 0
    for text in docs:
        ctx, last = text.rsplit(" ", 1)
        src, dst = [0] + list(ctx.encode()), list((" " + last).encode())
        out, state = model.forward(src, None)
        ok = True
        for i, t in enumerate(dst):
            xsum += _logp(out, t)
            ok &= int(out.argmax()) == t
            if i + 1 < len(dst):
                out, state = model.forward([t], state)
        xacc += ok
    return math.exp(-xsum / len(docs)), xacc / len(docs)


def run_eval(*args):
    r = CliRunner().invoke(main, ["eval", *map(str, args), "--json", "-q"])
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


@pytest.mark.slow
def test_lambada_equals_blinkdl(export_path, data, blinkdl):
    ppl, acc = blinkdl_lambada(blinkdl, DOCS)
    assert 0 < acc < 1  # the data discriminates: some documents right, some wrong
    out = run_eval(export_path, "--data", data / "lambada.jsonl", "--reference", CKPT, "--batch", "4")
    for who in ("export", "reference"):
        assert out[who]["perplexity"] == pytest.approx(ppl, rel=1e-4), who
        assert out[who]["accuracy"] == pytest.approx(acc, abs=1e-12), who


@pytest.mark.slow
def test_lambada_batch_and_limit(export_path, data, blinkdl):
    """Batching (rows of different lengths together) changes nothing; --limit takes the first N."""
    one = run_eval(export_path, "--data", data / "lambada.jsonl", "--batch", "1")
    many = run_eval(export_path, "--data", data / "lambada.jsonl", "--batch", "64")
    assert many["export"]["perplexity"] == pytest.approx(one["export"]["perplexity"], rel=1e-6)
    assert many["export"]["accuracy"] == one["export"]["accuracy"]
    ppl, acc = blinkdl_lambada(blinkdl, DOCS[:3])
    lim = run_eval(export_path, "--data", data / "lambada.jsonl", "--limit", "3")
    assert lim["export"]["perplexity"] == pytest.approx(ppl, rel=1e-4)
    assert lim["export"]["accuracy"] == pytest.approx(acc)


@pytest.mark.slow
def test_perplexity_equals_blinkdl(export_path, data, blinkdl):
    toks = [0] + list(TEXT.encode())
    lps, state = [], None
    out, state = blinkdl.forward(toks[:1], None)
    for t in toks[1:]:
        lps.append(_logp(out, t))
        out, state = blinkdl.forward([t], state)
    ppl = math.exp(-sum(lps) / len(lps))
    res = run_eval(export_path, "--task", "perplexity", "--data", data / "text.txt", "--reference", CKPT)
    assert res["export"]["perplexity"] == pytest.approx(ppl, rel=1e-4)
    assert res["reference"]["perplexity"] == pytest.approx(ppl, rel=1e-4)
    assert res["export"]["accuracy"] is None


@pytest.mark.slow
def test_text_output_and_cost_line(tmp_path, data):
    """A quantised export prints its cost against the reference in one line."""
    from rwkv_export.export import ExportOptions, export

    q = export(CKPT, tmp_path / "q.onnx", ExportOptions(quantize="int8"))[0]
    r = CliRunner().invoke(
        main, ["eval", str(q), "--data", str(data / "lambada.jsonl"), "--limit", "3", "--reference", str(CKPT), "-q"]
    )
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    assert lines[0].startswith("lambada: 3 documents")
    assert lines[1].startswith("export ") and "accuracy" in lines[1]
    assert lines[2].startswith("reference ")
    assert lines[3].startswith("export - reference: perplexity")
    assert lines[4].startswith("cost of int8 (block 128): ") and lines[4].endswith("%")


@pytest.mark.parametrize(
    "content, msg",
    [
        ('{"text": "one two"}\nnot json\n', "line 2: not JSON"),
        ('{"text": 3}\n', 'line 1: expected an object with a "text" string'),
        ('{"text": "nospace"}\n', "line 1: the text has no last word"),
        ("\n\n", "no documents"),
    ],
)
def test_bad_data_is_one_error_line(export_path, tmp_path, content, msg):
    f = tmp_path / "bad.jsonl"
    f.write_text(content, encoding="utf-8")
    r = CliRunner().invoke(main, ["eval", str(export_path), "--data", str(f), "-q"])
    assert r.exit_code == 1
    assert r.output.startswith("Error: ") and msg in r.output and len(r.output.strip().splitlines()) == 1


def test_missing_data_and_bad_pad(export_path, tmp_path):
    r = CliRunner().invoke(main, ["eval", str(export_path), "--data", str(tmp_path / "nope.jsonl")])
    assert r.exit_code == 1 and "no such file" in r.output
    (tmp_path / "d.jsonl").write_text('{"text": "a b"}\n')
    r = CliRunner().invoke(main, ["eval", str(export_path), "--data", str(tmp_path / "d.jsonl"), "--pad-token", "300"])
    assert r.exit_code == 1 and "outside the model's vocabulary" in r.output
    r = CliRunner().invoke(main, ["eval", str(export_path), "--data", str(tmp_path / "d.jsonl"), "--pad-token", "x"])
    assert r.exit_code == 2


@pytest.fixture(scope="module")
def all_logits_path(tmp_path_factory):
    from rwkv_export.export import ExportOptions, export

    return export(CKPT, tmp_path_factory.mktemp("eval-all") / "a.onnx", ExportOptions(all_logits=True))[0]


@pytest.mark.parametrize("which", ["plain", "all-logits"])
def test_score_matches_stepping(export_path, all_logits_path, which):
    """Session.score (the runtime method behind eval and the server) equals log_softmax of Session.step,
    through the all-logits sequence graph in chunks or stepping; and scored in two pieces (start=0 with
    the first piece's logits and state) it is the same."""
    from rwkv_runtime import Session
    from rwkv_runtime.scoring import has_all_logits

    s = Session(all_logits_path if which == "all-logits" else export_path)
    assert has_all_logits(s) == (which == "all-logits")
    toks = np.array([list(b"import os\nimport sys\n"), list(b"def f(x):\n    return x\n")[:21]])
    sc = s.score(toks, start=1, top_k=3, chunk_size=4)
    a = s.score(toks[:, :9], start=1)
    b = s.score(toks[:, 9:], a.state, start=0, logits=a.logits)
    np.testing.assert_allclose(np.concatenate([a.logprobs[:, 1:], b.logprobs], 1), sc.logprobs[:, 1:], atol=1e-5)
    for b in range(2):
        st, ref = None, []
        for t in toks[b]:
            lg, st = s.step(np.array([t]), st)
            ref.append(lg[0].astype(np.float64))
        L = np.stack(ref)
        lp = L - L.max(1, keepdims=True)
        lp -= np.log(np.exp(lp).sum(1, keepdims=True))
        T = toks.shape[1]
        np.testing.assert_allclose(sc.logprobs[b, 1:], lp[np.arange(T - 1), toks[b, 1:]], atol=2e-5)
        assert np.isnan(sc.logprobs[b, 0])
        assert (sc.greedy[b, 1:] == (L[:-1].argmax(1) == toks[b, 1:])).all()
        np.testing.assert_array_equal(sc.top_ids[b, 1:, 0], L[:-1].argmax(1))
        np.testing.assert_allclose(sc.logits[b], L[-1], atol=2e-5)


def test_score_refuses_bad_arguments(export_path):
    from rwkv_runtime import RuntimeUserError, Session

    s = Session(export_path)
    toks = np.array([list(b"abc")])
    for kw, msg in [
        (dict(start=4), "past the end"),
        (dict(start=0), "needs the logits"),
        (dict(start=0, logits=np.zeros((1, 5))), "logits must have shape"),
        (dict(top_k=-1), "top_k"),
        (dict(start=1.5), "start"),
        (dict(chunk_size=0), "chunk_size"),
    ]:
        with pytest.raises(RuntimeUserError, match=msg):
            s.score(toks, **kw)
    sc = s.score(toks, start=3)  # nothing to score: only the state and logits after the tokens
    assert np.isnan(sc.logprobs).all() and sc.total().shape == (1,)
