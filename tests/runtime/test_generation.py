"""The generation core (rwkv_runtime/generation.py) on its own: stop matching (against str.find, and in
time linear in the text), per-row failure in BatchGenerator and Batch (the other rows produce what they
produce alone), the constraint hook, and Session.generate as a batch of one (its tokens against stepping
Session.step by hand)."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest

from rwkv_runtime import BatchGenerator, RuntimeUserError, SamplingParams
from rwkv_runtime.generation import Batch, Row, StopMatcher, TextStream
from rwkv_runtime.sampling import Sampler


def _stops_like_find(pieces, stops):
    """(delivered text, stopped) by StopMatcher, and the truth: str.find on all the text after each piece."""
    m = StopMatcher(stops)
    out, stopped = "", False
    for p in pieces:
        text, stopped = m.push(p)
        out += text
        if stopped:
            break
    if not stopped:
        out += m.release()
    full, expect = "", None
    for p in pieces:
        full += p
        found = [i for i in (full.find(s) for s in stops if s) if i >= 0]
        if found:
            expect = full[: min(found)]
            break
    return (out, stopped), ((expect, True) if expect is not None else (full, False))


def test_stop_matcher_equals_find_on_periodic_text():
    """Periodic stop strings and texts (where a KMP failure table matters: "abab" then "abac"), pieces of
    random lengths, several stop strings at once."""
    rng = random.Random(5)
    for _ in range(3000):
        alpha = rng.choice(["ab", "abc", "a\n"])
        stops = ["".join(rng.choice(alpha) for _ in range(rng.randint(1, 9))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choice(alpha) for _ in range(rng.randint(0, 40)))
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 12))))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        got, want = _stops_like_find(pieces, stops)
        assert got == want, (pieces, stops)


def _push_time(stops, pieces: list) -> float:
    m = StopMatcher(stops)
    t = time.perf_counter()
    for p in pieces:
        m.push(p)
    return time.perf_counter() - t


def test_stop_matching_cost_does_not_grow_with_held_text():
    """2 MB of stop strings: the text ("aaaa...") keeps matching the start of the second, so all of it is
    held back; the first starts with a character the text never has. Each token costs what it costs with
    nothing held. (The engine's old matcher tried every length of the held text against every stop
    string for every token: 5000 tokens took ~100x the time of the plain case, seconds.)"""
    n, big = 5000, 1 << 20
    stops = ["b" + "a" * big, "a" * big + "c"]
    pieces = ["a"] * n
    plain = min(_push_time(["zz", "yy"], pieces) for _ in range(3))
    slow = min(_push_time(stops, pieces) for _ in range(3))
    m = StopMatcher(stops)
    for p in pieces:
        assert m.push(p) == ("", False)
    assert len(m.held) == n and m.push("x") == ("a" * n + "x", False)
    assert slow < 4 * plain + 0.05, (slow, plain)


def test_text_stream_holds_split_characters_and_stops():
    tok = type("T", (), {"decode": staticmethod(lambda ids: bytes(ids).decode("utf-8", "replace"))})()
    ts = TextStream(tok, stops=("\nUser:",), logprobs=False)
    got = [ts.push(t)[0] for t in "hé\nUs".encode()]
    assert "".join(got) == "hé" and got[1] == "" and ts.push(ord("e"))[0] == ""
    assert ts.push(ord("r"))[0] == "" and ts.push(ord(":")) == ("", None, True)


def _alone(session, prompt, params, n):
    return list(session.generate_tokens(prompt, n, params))


PROMPTS = [[10, 20, 30], [40, 50], [60, 70, 80, 90]]
PARAMS = [
    SamplingParams(temperature=0),
    SamplingParams(temperature=1.0, top_p=0.9, seed=7),
    SamplingParams(temperature=0.8, seed=666),
]  # seed 666: the row made to fail below


def _poison_seed_666(monkeypatch):
    real = Sampler.__call__

    def call(self, logits, *a, **k):
        if self.params.seed == 666:
            raise ValueError("injected sampler failure")
        return real(self, logits, *a, **k)

    monkeypatch.setattr(Sampler, "__call__", call)


def test_batch_generator_failure_of_one_sequence_leaves_the_others(tiny_session, monkeypatch, caplog):
    """A sampler that raises for one sequence: that sequence leaves with its error (in ``failed``, logged
    with its traceback); the others produce exactly what they produce alone. (step() raised for all.)"""
    want = [_alone(tiny_session, p, s, 8) for p, s in zip(PROMPTS[:2], PARAMS[:2])]
    _poison_seed_666(monkeypatch)
    gen = BatchGenerator(tiny_session)
    ids = [gen.add(p, s) for p, s in zip(PROMPTS, PARAMS)]
    for _ in range(8):
        gen.step()
    assert isinstance(gen.failed[ids[2]], ValueError) and gen.order == ids[:2]
    assert "injected sampler failure" in caplog.text and "Traceback" in caplog.text
    assert [gen.remove(i) for i in ids[:2]] == want
    assert gen.remove(ids[2]) == [] and gen.state is None


def test_batch_model_step_failure_is_isolated_to_its_row(tiny_session, monkeypatch):
    """The model step of the batch fails for one row's token: it is retried row by row, that row ends
    with the error, the others carry on with the same tokens as alone."""
    s = tiny_session
    want = [_alone(s, p, SamplingParams(temperature=0), 6) for p in PROMPTS]
    bad = want[1][2]  # the third token of the second sequence: its step is made to fail
    assert all(bad not in w[:6] for w in (want[0], want[2])), "pick prompts whose tokens differ"
    real = type(s).step

    def step(self, tokens, state=None):
        if bad in np.asarray(tokens).reshape(-1).tolist():
            raise MemoryError("injected step failure")
        return real(self, tokens, state)

    monkeypatch.setattr(type(s), "step", step)
    b = Batch(s)
    rows = [Row(Sampler(SamplingParams(temperature=0)), max_new_tokens=6) for _ in PROMPTS]
    for r, p in zip(rows, PROMPTS):
        logits, st = s.prefill([p])
        b.add(r, st, logits)
    errors = []
    while b.rows:
        errors += [o for o in b.step() if o.error is not None]
    assert [o.row for o in errors] == [rows[1]] and isinstance(rows[1].error, MemoryError)
    assert rows[1].tokens == want[1][:3] and rows[1].reason == "error"
    assert rows[0].tokens == want[0] and rows[2].tokens == want[2]


class _OnlyEven:
    """A constraint: only even token ids, and complete after 3 tokens."""

    def __init__(self, vocab):
        self.mask = np.arange(vocab) % 2 == 0
        self.seen = []

    def allowed(self):
        return self.mask

    def advance(self, token):
        self.seen.append(token)
        return len(self.seen) == 3


@pytest.mark.parametrize("params", [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=3)])
def test_constraint_hook_masks_every_token_and_ends_the_row(tiny_session, params):
    s = tiny_session
    logits, st = s.prefill([[1, 2, 3]])
    c = _OnlyEven(s.vocab_size)
    row = Row(Sampler(params, s.vocab_size), max_new_tokens=10, constraint=c)
    b = Batch(s)
    b.add(row, st, logits)
    # the truth: the masked logits' argmax (greedy), stepping by hand
    expect, lg, st2 = [], logits[0], st
    while b.rows:
        b.step()
    assert row.reason == "stop" and len(row.tokens) == 3 and all(t % 2 == 0 for t in row.tokens)
    if params.temperature == 0:
        for _ in range(3):
            t = int(np.argmax(np.where(c.mask, lg, -np.inf)))
            expect.append(t)
            lg, st2 = s.step([t], st2)
            lg = lg[0]
        assert row.tokens == expect


def test_a_mask_that_allows_nothing_is_the_rows_error(tiny_session):
    s = tiny_session
    logits, st = s.prefill([[1, 2]])
    nothing = type("C", (), {"allowed": lambda self: np.zeros(s.vocab_size, bool), "advance": lambda self, t: False})()
    row = Row(Sampler(SamplingParams(temperature=0), s.vocab_size), max_new_tokens=3, constraint=nothing)
    b = Batch(s, log_failures=False)
    b.add(row, st, logits)
    (out,) = b.step()
    assert isinstance(out.error, RuntimeUserError) and "allow no token" in str(out.error) and not b.rows


def test_generate_is_a_batch_of_one_that_matches_stepping(tiny_session):
    """Session.generate's tokens and final state against Session.step by hand (greedy); the state after
    max_new_tokens includes the last token (as before the core)."""
    s = tiny_session
    logits, st = s.prefill([[5, 6, 7]])
    toks = []
    for _ in range(6):
        t = int(np.argmax(logits[0]))
        toks.append(t)
        logits, st = s.step([t], st)
    gen = s.generate([5, 6, 7], 6, temperature=0)
    text = "".join(gen)
    assert text == s.decode(toks) and gen.stats["new_tokens"] == 6
    for k, v in st.numpy().items():
        np.testing.assert_allclose(gen.state.numpy()[k], v, atol=1e-6)


def test_a_tokenizer_that_raises_for_one_row_ends_that_row(tiny_session, caplog):
    """Detokenizing is per row too: a tokenizer failing on one row's third token ends that row with the
    error; the other row's text is what generate gives alone."""
    s = tiny_session

    class Breaks:
        calls = 0

        def decode(self, ids):
            Breaks.calls += 1
            if Breaks.calls == 3:
                raise KeyError("injected tokenizer failure")
            return s.tokenizer.decode(ids)

    want = "".join(s.generate(PROMPTS[0], 8, temperature=0))
    b = Batch(s)
    rows = [
        Row(Sampler(SamplingParams(temperature=0)), max_new_tokens=8, text=TextStream(t))
        for t in (s.tokenizer, Breaks())
    ]
    for r, p in zip(rows, PROMPTS):
        logits, st = s.prefill([p])
        b.add(r, st, logits)
    text = ""
    while b.rows:
        text += "".join(o.text for o in b.step() if o.row is rows[0])
    assert text == want and rows[0].reason == "length"
    assert isinstance(rows[1].error, KeyError) and len(rows[1].tokens) == 3 and "Traceback" in caplog.text
