"""``Session.score`` with odd arguments (issue #24 part 5, docs/errors.md "Audit of this round"): each is
one ``RuntimeUserError`` or a correct result, never numpy's MemoryError/ValueError or a silent NaN; and
its ``stop`` hook abandons a long scoring between two model runs (what the server's shutdown uses)."""

from __future__ import annotations

import numpy as np
import pytest

from rwkv_runtime import RuntimeUserError

TEXT = list(b"The quick brown fox jumps.")


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    """The default model exported twice: stepping scorer, and an --all-logits one (chunked scorer)."""
    from rwkv_export import DEFAULT_MODEL
    from rwkv_export.export import ExportOptions, export
    from rwkv_runtime import Session

    d = tmp_path_factory.mktemp("score")
    plain = export(DEFAULT_MODEL, d / "m.onnx", ExportOptions())[0]
    every = export(DEFAULT_MODEL, d / "all.onnx", ExportOptions(all_logits=True))[0]
    return Session(plain), Session(every)


@pytest.mark.parametrize("tokens", [[], [[]], np.zeros((1, 0), np.int64), np.zeros((0,), np.int32)])
def test_empty_tokens_are_named_as_empty(sessions, tokens):
    # was: "token ids must be integers, not float64" (numpy reads [] as float64)
    with pytest.raises(RuntimeUserError, match="no tokens given"):
        sessions[0].score(tokens)


@pytest.mark.parametrize("k", [257, 10**9, 10**30, np.int64(2**62)])
def test_top_k_past_the_vocabulary_means_every_token(sessions, k):
    """Was: MemoryError (an [1, T, 10^9] array) or numpy's 'Maximum allowed dimension exceeded'."""
    s = sessions[0]
    got = s.score([TEXT], top_k=k)
    full = s.score([TEXT], top_k=256)
    assert got.top_ids.shape == (1, len(TEXT), 256)
    np.testing.assert_array_equal(got.top_ids, full.top_ids)
    # every token listed, most likely first: the scored token's own log-probability is among them
    j = 5
    row = dict(zip(got.top_ids[0, j].tolist(), got.top_logprobs[0, j].tolist()))
    assert row[TEXT[j]] == pytest.approx(got.logprobs[0, j])
    assert np.all(np.diff(got.top_logprobs[0, j]) <= 0)


@pytest.mark.parametrize(
    "logits", [np.full((1, 256), np.nan), np.full((1, 256), np.inf), [[None] * 256], "abc", [["x"] * 256]]
)
def test_start0_logits_must_be_finite_numbers(sessions, logits):
    # was: NaN logits (or None, read as NaN) gave a NaN log-probability at position 0; a string a ValueError
    with pytest.raises(RuntimeUserError, match="logits"):
        sessions[0].score([TEXT], start=0, logits=logits)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(start=len(TEXT) + 1), "past the end"),
        (dict(start=10**30), "past the end"),
        (dict(start=-1), "start must be"),
        (dict(start=1.0), "start must be"),
        (dict(top_k=-1), "top_k must be"),
        (dict(top_k=True), "top_k must be"),
        (dict(tokens=[[1.5, 2.0]]), "integers"),
        (dict(tokens=[[1.0, 2.0]]), "integers"),
        (dict(tokens=[["a", "b"]]), "integers"),
        (dict(tokens=[[1, 2], [3]]), "rectangular"),
        (dict(tokens=[[[1, 2]]]), "shape"),
        (dict(tokens=[[1, 256]]), "outside"),
        (dict(tokens=np.array([[1, 2**63]], np.uint64)), "outside"),
        (dict(chunk_size=0), "chunk_size"),
    ],
)
def test_odd_arguments_are_one_line(sessions, kw, match):
    kw = {"tokens": [TEXT], **kw}
    with pytest.raises(RuntimeUserError, match=match):
        sessions[0].score(**kw)


def test_a_state_of_another_export_is_refused(sessions):
    plain, every = sessions
    with pytest.raises(RuntimeUserError, match="another export"):
        plain.score([TEXT], state=every.new_state(1))


def test_start_at_the_end_scores_nothing_and_continues(sessions):
    s = sessions[0]
    sc = s.score([TEXT], start=len(TEXT))
    assert np.isnan(sc.logprobs).all() and not sc.greedy.any()
    want, _ = s.prefill([TEXT])
    np.testing.assert_allclose(sc.logits, want, atol=1e-5)


@pytest.mark.parametrize("which", [0, 1])
def test_stop_abandons_between_runs(sessions, which):
    """Both scorers (stepping, all-logits chunks) ask ``stop`` before each run and give up when it says so;
    never asked to stop, the result is the plain call's."""
    from rwkv_runtime.scoring import ScoringStopped

    s = sessions[which]
    asked = []

    def stop():
        asked.append(1)
        return len(asked) > 2

    with pytest.raises(ScoringStopped):
        s.score([TEXT], chunk_size=4, stop=stop)
    assert len(asked) == 3
    a = s.score([TEXT], chunk_size=4, stop=lambda: False)
    b = s.score([TEXT], chunk_size=4)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
