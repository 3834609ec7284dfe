"""``logprobs`` on both endpoints, driven by the official `openai` client against a real server on
127.0.0.1. Truth: the export run alone in this process with ``Session.prefill``/``step`` (the tokens from
``Session.generate_tokens`` with the same settings), log_softmax of the raw logits taken here."""

from __future__ import annotations

import asyncio
import functools
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from .conftest import need_serve_deps

need_serve_deps()

import numpy as np  # noqa: E402 - after the skip check
import openai  # noqa: E402 - after the skip check

from rwkv_runtime import SamplingParams, Session  # noqa: E402 - after the skip check
from rwkv_runtime.server import GenRequest  # noqa: E402 - after the skip check
from rwkv_runtime.server.engine import Engine, _Seq  # noqa: E402 - after the skip check
from rwkv_runtime.server.events import _OUTBOX, Delta, Handle  # noqa: E402 - after the skip check
from rwkv_runtime.tokenizers import StreamDecoder  # noqa: E402 - after the skip check

from .conftest import client  # noqa: E402 - after the skip check

CHAT = "User: What is a string?\n\nAssistant:"  # what the template makes of MSGS
MSGS = [{"role": "user", "content": "What is a string?"}]
SAMPLED = dict(temperature=1.4, top_p=0.9, top_k=40, presence_penalty=0.5, frequency_penalty=0.3, seed=11)


@functools.lru_cache(maxsize=2)
def _session(model) -> Session:
    return Session(model)


def truth(model, prompt: str, n: int, k: int, **sampling):
    """(ids, [(logprob of the token, [(id, logprob)] of the k most likely)]) of ``prompt`` run alone."""
    s = _session(model)
    sampling = {"temperature": 0.0, "top_p": 1.0, **sampling}
    prompt_ids = s.encode(prompt)
    ids = list(s.generate_tokens(prompt_ids, n, SamplingParams(**sampling)))
    logits, st = s.prefill(np.array([prompt_ids]))
    out = []
    for t in ids:
        x = logits[0].astype(np.float64)
        lp = x - x.max() - np.log(np.exp(x - x.max()).sum())
        top = np.argsort(-lp, kind="stable")[:k]
        out.append((lp[t], [(int(i), lp[i]) for i in top]))
        logits, st = s.step(np.array([t]), st)
    return ids, out


def text_of(s: Session, ids) -> str:
    """The text streamed for ``ids`` (as Session.generate: invalid UTF-8 replaced piece by piece)."""
    dec = StreamDecoder(s.tokenizer)
    return "".join(dec.push(t) for t in ids) + dec.flush()


def offsets(s: Session, ids) -> list:
    """Where each token's text starts: the tokens of one multi-byte character all start where it does."""
    dec, out, group, at = StreamDecoder(s.tokenizer), [], 0, 0
    for t in ids:
        group += 1
        piece = dec.push(t)
        if not dec.pending:
            out, group, at = out + [at] * group, 0, at + len(piece)
    return out + [at] * group


def check_completion(model, lp, ids, want):
    s = _session(model)
    assert lp.tokens == [s.decode([t]) for t in ids]
    np.testing.assert_allclose(lp.token_logprobs, [w[0] for w in want], atol=1e-4, rtol=0)
    for top, t, (chosen, alts) in zip(lp.top_logprobs, ids, want):
        expect: dict = {}
        for i, v in alts + [(t, chosen)]:  # the k most likely, and the chosen token
            expect.setdefault(s.decode([i]), v)
        assert list(top) == list(expect)  # same strings, same order
        np.testing.assert_allclose(list(top.values()), list(expect.values()), atol=1e-4, rtol=0)
    assert lp.text_offset == offsets(s, ids)


def check_chat(model, content, ids, want, k):
    s = _session(model)
    assert [c.token for c in content] == [s.decode([t]) for t in ids]
    assert [bytes(c.bytes) for c in content] == [bytes([t]) for t in ids]  # byte-level: token id = byte
    np.testing.assert_allclose([c.logprob for c in content], [w[0] for w in want], atol=1e-4, rtol=0)
    for c, (_, alts) in zip(content, want):
        assert len(c.top_logprobs) == k
        assert [(a.token, bytes(a.bytes)) for a in c.top_logprobs] == [(s.decode([i]), bytes([i])) for i, _ in alts]
        np.testing.assert_allclose([a.logprob for a in c.top_logprobs], [v for _, v in alts], atol=1e-4, rtol=0)


def joined(chunks, chat: bool, index: int = 0):
    """Choice ``index``'s logprobs in a stream, concatenated (completions: the four lists)."""
    lps = [ch.choices[0].logprobs for ch in chunks if ch.choices and ch.choices[0].index == index]
    if chat:
        return [c for lp in lps if lp for c in lp.content]
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for lp in filter(None, lps):
        for key, v in out.items():
            v += getattr(lp, key)
    return out


@pytest.mark.parametrize("which", ["default_model", "v7_model"])
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
def test_completion_logprobs_equal_session(sampled, which, request, make_server):
    model = request.getfixturevalue(which)
    srv = make_server(model, model_name="m")
    c = client(srv)
    sampling = SAMPLED if sampled else {"temperature": 0.0}
    k, n = (1, 2) if sampled else (5, 1)
    kw = dict(
        model="m",
        prompt="The quick brown fox",
        max_tokens=16,
        logprobs=k,
        n=n,
        extra_body={"top_k": sampling.get("top_k", 0)},
        **{a: b for a, b in sampling.items() if a != "top_k"},
    )
    r = c.completions.create(**kw)
    chunks = list(c.completions.create(stream=True, **kw))  # the same seed
    for j, ch in enumerate(r.choices):  # choice j is sampled with seed + j
        ids, want = truth(model, "The quick brown fox", 16, k, **{**sampling, "seed": sampling.get("seed", 0) + j})
        assert ch.text == text_of(_session(model), ids)
        check_completion(model, ch.logprobs, ids, want)
        if sampled:  # raw logits, not the sampler's distribution: the chosen token is reported when not the top one
            assert any(len(top) == 2 for top in ch.logprobs.top_logprobs)
        # streaming: each chunk carries the logprobs of its own text; together the same as above
        got, delivered = joined(chunks, False, j), ""
        assert got == ch.logprobs.model_dump(include=set(got))
        for x in chunks:
            if x.choices and x.choices[0].index == j and x.choices[0].logprobs:
                delivered += x.choices[0].text
                assert all(o < len(delivered) for o in x.choices[0].logprobs.text_offset)
        assert delivered == ch.text


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
def test_chat_logprobs_equal_session(sampled, default_model, make_server):
    srv = make_server(default_model, model_name="m")
    c = client(srv)
    sampling = SAMPLED if sampled else {"temperature": 0.0}
    ids, want = truth(default_model, CHAT, 20, 4, **sampling)
    kw = dict(
        model="m",
        messages=MSGS,
        max_tokens=20,
        logprobs=True,
        top_logprobs=4,
        extra_body={"top_k": sampling.get("top_k", 0)},
        **{a: b for a, b in sampling.items() if a != "top_k"},
    )
    r = c.chat.completions.create(**kw)
    text, content = r.choices[0].message.content, r.choices[0].logprobs.content
    # the template's stop string may end the reply early: exactly the tokens of the text are reported
    n = len(text.encode())
    assert _session(default_model).decode(ids).startswith(text) and len(content) == n
    check_chat(default_model, content, ids[:n], want[:n], 4)
    assert b"".join(bytes(x.bytes) for x in content) == text.encode()
    chunks = list(c.chat.completions.create(stream=True, **kw))
    assert joined(chunks, True) == content
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
    # logprobs without top_logprobs: no alternatives
    r = c.chat.completions.create(model="m", messages=MSGS, max_tokens=5, temperature=0, logprobs=True)
    assert [x.top_logprobs for x in r.choices[0].logprobs.content] == [[]] * 5


def test_logprobs_with_stop_strings(default_model, make_server):
    srv = make_server(default_model, model_name="m")
    c = client(srv)
    ids, want = truth(default_model, "Hello", 40, 2)
    full = _session(default_model).decode(ids)  # byte tokenizer: each character is its own token
    stop = full[10:14]
    cut = full.index(stop)
    kw = dict(model="m", prompt="Hello", max_tokens=40, temperature=0, logprobs=2, stop=[stop, "zzzz"])
    r = c.completions.create(**kw)
    assert r.choices[0].text == full[:cut]
    check_completion(default_model, r.choices[0].logprobs, ids[:cut], want[:cut])  # not the stop string's
    # streaming: the text held back while it could begin the stop string comes with its logprobs later
    chunks = list(c.completions.create(stream=True, **kw))
    assert joined(chunks, False) == r.choices[0].logprobs.model_dump(include=set(joined(chunks, False)))
    assert "".join(ch.choices[0].text for ch in chunks) == full[:cut]
    # a stop string that never completes: what was held back is released at the end, with its logprobs
    r = c.completions.create(
        model="m", prompt="Hello", max_tokens=12, temperature=0, logprobs=2, stop=[full[11:13] + "\x01"]
    )
    assert r.choices[0].text == full[:12]
    check_completion(default_model, r.choices[0].logprobs, ids[:12], want[:12])


def test_logprobs_refusals_and_off_values(default_model, make_server):
    srv = make_server(default_model, model_name="m")
    c = client(srv)
    # (echo with logprobs is served since the prompt is scored: tests/serve/test_prompt_logprobs.py)
    bad = [dict(logprobs=6), dict(logprobs=-1), dict(extra_body={"logprobs": True})]
    for kw in bad:
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model="m", prompt="x", max_tokens=2, **kw)
        assert e.value.body["param"] == "logprobs"
    for kw, param in [
        (dict(logprobs=True, top_logprobs=21), "top_logprobs"),
        (dict(logprobs=True, top_logprobs=-1), "top_logprobs"),
        (dict(top_logprobs=2), "top_logprobs"),
    ]:  # without logprobs: true (as OpenAI)
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="m", messages=MSGS, max_tokens=2, **kw)
        assert e.value.body["param"] == param
    # "off" values are accepted and change nothing
    r = c.completions.create(model="m", prompt="x", max_tokens=3, temperature=0, extra_body={"logprobs": False})
    assert r.choices[0].logprobs is None
    r = c.completions.create(model="m", prompt="x", max_tokens=3, temperature=0, echo=True)
    assert r.choices[0].logprobs is None and r.choices[0].text.startswith("x")
    r = c.chat.completions.create(model="m", messages=MSGS, max_tokens=3, temperature=0, logprobs=False, top_logprobs=0)
    assert r.choices[0].logprobs is None


def _accept(engine, s, t):
    """One sampled token through the sequence's generation-core row, then the engine's events for it (a
    finishing row's state, which the core's batch would provide, faked): the finish reason or None."""
    s.row.final = {"x": np.zeros((1, 1), np.float32)}
    out = s.row.accept(t, 0.0)
    engine._event(out, 0.0)
    return out.reason


def test_logprobs_follow_delivered_text():
    """The engine's alignment rule (the generation core's TextStream), with tokens of several characters (which the byte-level test models
    lack) and a multi-byte character split over two tokens: a token is reported with the text that
    completes it; at a stop string, every token that produced delivered text is, the rest never."""
    vocab = {1: b"ab", 2: b"c\n", 3: b"\nUs", 4: b"er: x", 5: b"\xc3", 6: b"\xa9"}
    tok = SimpleNamespace(decode=lambda ids: b"".join(vocab[i] for i in ids).decode("utf-8", "replace"))
    engine = Engine(SimpleNamespace(manifest=SimpleNamespace(export_id="fake")))
    loop = asyncio.new_event_loop()
    try:
        req = GenRequest([1], SamplingParams(temperature=0), 10, stop=("\n\nUser:",), logprobs=1)
        s = _Seq(Handle(req, loop), tok, 600.0)
        s.row.logits = np.zeros(8, np.float32)
        reasons = [_accept(engine, s, t) for t in (1, 5, 6, 2, 3, 4)]  # "ab" "é" "c\n" | "\nUs" "er: x"
        events, _OUTBOX.items = [ev for _, ev in _OUTBOX.items if isinstance(ev, Delta)], []
    finally:
        loop.close()
    assert reasons == [None] * 5 + ["stop"]
    got = [(ev.text, [(e.token, e.start) for e in ev.logprobs or ()]) for ev in events]
    assert got == [("ab", [(1, 0)]), ("é", [(5, 2), (6, 2)]), ("c", []), ("", [(2, 3)])]
    assert all(
        e.logprob == pytest.approx(-np.log(8)) and e.top == ((0, e.logprob),)
        for ev in events
        for e in ev.logprobs or ()
    )


@pytest.mark.parametrize("kind", ["world", "hf-json"])
def test_token_bytes_of_partial_characters(kind, tmp_path):
    """``bytes`` of tokens that are pieces of a character: their own bytes, so they join to the text."""
    from rwkv_runtime.server.logprobs import TokenTexts
    from rwkv_runtime.tokenizers import make_tokenizer

    if kind == "world":
        pytest.importorskip("pyrwkv_tokenizer")
        tok, text = make_tokenizer({"kind": "world"}), "naïve 𝔘ꙮ \U0001f9ec ok"
    else:
        from ..conftest import hf_tokenizer_json

        path = hf_tokenizer_json(tmp_path / "tokenizer.json")  # 20B where ../shared is, else a small BPE
        tok, text = make_tokenizer({"kind": "hf-json"}, path.read_text()), "naïve € 日本語 ok"
    texts = TokenTexts(tok)
    pieces = [texts(t) for t in tok.encode(text)]
    assert any(s == "\ufffd" for s, _ in pieces)  # some token is part of a character
    assert b"".join(b for _, b in pieces) == text.encode()
    assert all(b == s.encode() for s, b in pieces if "\ufffd" not in s)


PIECES = [
    b"a",
    b"b",
    b"\n",
    b"ab",
    b"b\n",
    b"\nU",
    b"\xc3",
    b"\xa9",
    b"\xe2\x82",
    b"\xac",
    b"\xe2",
    b"\x82\xac",
    b"\xc3\xa9a",
    b"\xff",
]


def _run_engine(tokens, stop, logprobs):
    """Feed ``tokens`` (ids into PIECES) through the generation core's row and the engine's events, the
    end-of-reply flush included (max_tokens is their number): (text events, tokens accepted, stopped)."""
    tok = SimpleNamespace(decode=lambda ids: b"".join(PIECES[i] for i in ids).decode("utf-8", "replace"))
    engine = Engine(SimpleNamespace(manifest=SimpleNamespace(export_id="fake")))
    loop = asyncio.new_event_loop()
    try:
        s = _Seq(
            Handle(GenRequest([0], SamplingParams(temperature=0), len(tokens), stop=stop, logprobs=logprobs), loop),
            tok,
            600.0,
        )
        s.row.logits = np.linspace(0, 1, len(PIECES), dtype=np.float32)
        n, stopped = 0, False
        for t in tokens:
            n += 1
            reason = _accept(engine, s, t)
            if reason is not None:
                stopped = reason == "stop"
                break
        events, _OUTBOX.items = [ev for _, ev in _OUTBOX.items if isinstance(ev, Delta)], []
    finally:
        loop.close()
    return events, n, stopped


@settings(max_examples=300, deadline=None)
@given(
    tokens=st.lists(st.integers(0, len(PIECES) - 1), min_size=1, max_size=24),
    stop=st.lists(st.text(alphabet="ab\nUé€", min_size=1, max_size=4), max_size=3).map(tuple),
)
def test_logprobs_alignment_holds_for_any_tokens_and_stop_strings(tokens, stop):
    """Asking for logprobs never changes the text; a token is never reported ahead of its text; the
    reported tokens' spans tile the delivered text from 0 (the pieces of one character share one span)
    and reach its end; at the end every accepted token is reported, on a stop string exactly those
    whose text starts before the delivered text ends."""
    plain, n0, _ = _run_engine(tokens, stop, None)
    events, n, stopped = _run_engine(tokens, stop, 3)
    assert n == n0 and [e.text for e in events if e.text] == [e.text for e in plain]
    delivered, reported = "", []
    for i, ev in enumerate(events):
        delivered += ev.text
        last = i == len(events) - 1  # (a stop string ends the reply: only the last event can be cut)
        for e in ev.logprobs or ():
            assert e.start < len(delivered) and (e.end <= len(delivered) or (stopped and last))
            reported.append(e)
    assert [e.token for e in reported] == tokens[: len(reported)]
    at = 0
    for a, b in zip([None] + reported, reported):
        assert b.start == at or (a is not None and (b.start, b.end) == (a.start, a.end))
        at = b.end
    assert all(e.start < len(delivered) for e in reported) if stopped else len(reported) == n
    if delivered:  # the next, unreported token would start at or after the delivered text's end
        assert reported and reported[-1].end >= len(delivered)
    top = [len(PIECES) - 1, len(PIECES) - 2, len(PIECES) - 3]  # (the fake logits rise with the id)
    assert all([t for t, _ in e.top] == top for e in reported)


def test_a_stop_string_completed_by_the_final_flush_is_a_stop():
    """b"\\xc3" then b"\\n": the first token's text waits for the rest of a character; the reply hits
    max_tokens, the flush decodes "\\ufffd\\n" and finds the stop string "\\n" in it: the text ends before
    it and finish_reason is "stop" (it was "length")."""
    tok = SimpleNamespace(decode=lambda ids: b"".join(PIECES[i] for i in ids).decode("utf-8", "replace"))
    engine = Engine(SimpleNamespace(manifest=SimpleNamespace(export_id="fake")))
    loop = asyncio.new_event_loop()
    try:
        s = _Seq(Handle(GenRequest([0], SamplingParams(temperature=0), 2, stop=("\n",), logprobs=0), loop), tok, 600.0)
        s.row.logits = np.zeros(len(PIECES), np.float32)
        assert [_accept(engine, s, t) for t in (6, 2)] == [None, "stop"]  # (length, then the flush's stop)
        events, _OUTBOX.items = [ev for _, ev in _OUTBOX.items], []
    finally:
        loop.close()
    assert [ev.text for ev in events[:-1]] == ["\ufffd"] and events[-1].reason == "stop"
    assert [e.token for e in events[0].logprobs] == [6, 2]  # one character's pieces: reported together


def test_best_of_returns_the_candidates_with_the_best_mean_logprob(default_model, make_server):
    """best_of=5, n=2: candidate j is the sample with seed + j; the two returned are those whose tokens
    have the highest mean log-probability (OpenAI's rule), best first; usage counts all five."""
    srv = make_server(default_model, model_name="m")
    c = client(srv)
    sampling = dict(temperature=1.5, top_p=1.0, seed=3)
    cands = [truth(default_model, "The quick brown fox", 8, 1, **{**sampling, "seed": 3 + j}) for j in range(5)]
    means = [np.mean([w[0] for w in want]) for _, want in cands]
    order = sorted(range(5), key=lambda j: (-means[j], j))[:2]
    assert order != [0, 1]  # (this seed makes the ranking matter)
    kw = dict(model="m", prompt="The quick brown fox", max_tokens=8, best_of=5, n=2, **sampling)
    r = c.completions.create(**kw)
    assert [ch.text for ch in r.choices] == [text_of(_session(default_model), cands[j][0]) for j in order]
    assert [ch.index for ch in r.choices] == [0, 1] and all(ch.logprobs is None for ch in r.choices)
    assert r.usage.completion_tokens == 5 * 8
    r = c.completions.create(logprobs=1, **kw)  # and with the log-probabilities returned
    for ch, j in zip(r.choices, order):
        check_completion(default_model, ch.logprobs, *cands[j])
