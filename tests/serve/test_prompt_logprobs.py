"""The prompt's own log-probabilities on /v1/completions (``echo`` + ``logprobs``, ``max_tokens`` 0 or
more, vLLM's ``prompt_logprobs``), driven by the official `openai` client against a real server on
127.0.0.1. Truth: log_softmax of ``Session.step``'s logits after each prompt token, computed here."""

from __future__ import annotations

import functools

import pytest

from .conftest import client, need_serve_deps

need_serve_deps()

import httpx  # noqa: E402 - after the skip check
import numpy as np  # noqa: E402 - after the skip check

from rwkv_runtime import Session  # noqa: E402 - after the skip check

pytestmark = pytest.mark.slow

PROMPT = "import os\nimport sys\n\ndef main(argv):\n    return 0\n"
K = 3


@functools.lru_cache(maxsize=4)
def truth(model, prompt: str):
    """(ids, [lp of token j | tokens before], [top K ids], final greedy token, its lp) by stepping."""
    s = Session(model)
    ids = s.encode(prompt)
    st, lps, tops = None, [None], [None]
    logits = None
    for t in ids:
        if logits is not None:
            x = logits.astype(np.float64)
            lp = x - x.max() - np.log(np.exp(x - x.max()).sum())
            lps.append(lp[t])
            tops.append([int(i) for i in np.argsort(-lp, kind="stable")[:K]])
        logits, st = s.step(np.array([t]), st)
        logits = logits[0]
    x = logits.astype(np.float64)
    lp = x - x.max() - np.log(np.exp(x - x.max()).sum())
    return ids, lps, tops, int(np.argmax(x)), float(lp[np.argmax(x)])


def check(model, lp: dict, prompt: str, tokens: int | None = None, k: int = K):
    s = Session(model)
    ids, lps, tops, _, _ = truth(model, prompt)
    n = len(ids)
    assert lp["tokens"][:n] == [s.decode([t]) for t in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    np.testing.assert_allclose(lp["token_logprobs"][1:n], lps[1:], atol=2e-4)
    for j in range(1, n):
        top = lp["top_logprobs"][j]
        want = {s.decode([t]) for t in tops[j][:k]} | {s.decode([ids[j]])}
        assert set(top) == want, j
        assert max(top.values()) == pytest.approx(max(lps[j], max(top.values())), abs=1e-9)
    assert lp["text_offset"][:n] == list(range(n))  # byte-level model, ASCII prompt: one char a token
    if tokens is not None:
        assert len(lp["tokens"]) == n + tokens


@pytest.mark.parametrize("cache", [True, False])
def test_echo_logprobs_max_tokens_0(default_model, make_server, cache):
    srv = make_server(default_model, model_name="m", **({} if cache else {"cache_bytes": 0}))
    c = client(srv)
    for _ in range(2):  # the second time the prompt (and its chunk boundaries) are in the prefix cache
        r = c.completions.create(model="m", prompt=PROMPT, max_tokens=0, echo=True, logprobs=K, temperature=0)
        ch = r.choices[0]
        assert ch.text == PROMPT and ch.finish_reason == "length"
        check(default_model, ch.logprobs.model_dump(), PROMPT, tokens=0)
        assert r.usage.prompt_tokens == len(PROMPT) and r.usage.completion_tokens == 0
    # a prompt that extends a cached one: its cached prefix still gets its log-probabilities
    longer = PROMPT + "\nif __name__ == '__main__':\n    main(sys.argv)\n"
    r = c.completions.create(model="m", prompt=longer, max_tokens=0, echo=True, logprobs=K)
    check(default_model, r.choices[0].logprobs.model_dump(), longer, tokens=0)


@pytest.mark.parametrize("cache", [True, False])
def test_echo_logprobs_then_generated(default_model, make_server, cache):
    """lm-evaluation-harness's request (max_tokens 1): the prompt's logprobs, then the greedy token's."""
    srv = make_server(default_model, model_name="m", **({} if cache else {"cache_bytes": 0}))
    c = client(srv)
    ids, _, _, greedy, greedy_lp = truth(default_model, PROMPT)
    s = Session(default_model)
    r = c.completions.create(model="m", prompt=PROMPT, max_tokens=1, echo=True, logprobs=1, temperature=0)
    ch = r.choices[0]
    assert ch.text == PROMPT + s.decode([greedy])
    lp = ch.logprobs.model_dump()
    n = len(ids)
    np.testing.assert_allclose(lp["token_logprobs"][1:n], truth(default_model, PROMPT)[1][1:], atol=2e-4)
    assert lp["token_logprobs"][n] == pytest.approx(greedy_lp, abs=2e-4)
    assert lp["text_offset"][n] == len(PROMPT)
    assert r.usage.completion_tokens == 1 and r.usage.prompt_tokens == n
    # a token-id prompt, two prompts in one request, n=2: each choice has its prompt's logprobs
    r = c.completions.create(model="m", prompt=[ids, ids[:20]], max_tokens=2, echo=True, logprobs=0, n=2, temperature=0)
    assert len(r.choices) == 4
    for ch in r.choices:
        m = n if ch.index < 2 else 20
        np.testing.assert_allclose(ch.logprobs.token_logprobs[1:m], truth(default_model, PROMPT)[1][1:m], atol=2e-4)
        assert len(ch.logprobs.tokens) == m + 2


def test_streamed_equals_not_streamed(default_model, make_server):
    srv = make_server(default_model, model_name="m")
    c = client(srv)
    for max_tokens in (0, 4):
        whole = c.completions.create(
            model="m", prompt=PROMPT, max_tokens=max_tokens, echo=True, logprobs=2, temperature=0
        )
        text, lp = "", {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for ev in c.completions.create(
            model="m", prompt=PROMPT, max_tokens=max_tokens, echo=True, logprobs=2, temperature=0, stream=True
        ):
            for ch in ev.choices:
                text += ch.text
                if ch.logprobs is not None:
                    for k in lp:
                        lp[k] += getattr(ch.logprobs, k) or []
        assert text == whole.choices[0].text
        assert lp == whole.choices[0].logprobs.model_dump()
        check(default_model, lp, PROMPT, tokens=max_tokens, k=2)


def test_vllm_prompt_logprobs_and_tokenizer_info(default_model, make_server):
    srv = make_server(default_model, model_name="m")
    ids, lps, tops, _, _ = truth(default_model, PROMPT)
    r = httpx.post(
        srv.url + "/v1/completions",
        json={"model": "m", "prompt": PROMPT, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 2},
        timeout=60,
    ).json()
    pl = r["choices"][0]["prompt_logprobs"]
    assert pl[0] is None and len(pl) == len(ids)
    for j in range(1, len(ids)):
        d = pl[j]
        assert d[str(ids[j])]["logprob"] == pytest.approx(lps[j], abs=2e-4)
        assert [int(t) for t, v in d.items() if v["rank"] <= 2][:2] == tops[j][:2]
        assert (d[str(ids[j])]["rank"] == 1) == (ids[j] == tops[j][0])
        assert d[str(ids[j])]["decoded_token"] == PROMPT[j]
    assert r["choices"][0]["logprobs"] is None and r["choices"][0]["text"] != PROMPT  # no echo asked
    info = httpx.get(srv.url + "/tokenizer_info", timeout=10).json()
    assert "eos_token" in info and info["model_max_length"] > 0


def test_max_tokens_0_without_logprobs_and_refusals(default_model, make_server):
    srv = make_server(default_model, model_name="m")
    c = client(srv)
    r = c.completions.create(model="m", prompt="abc", max_tokens=0, echo=True)
    assert r.choices[0].text == "abc" and r.choices[0].logprobs is None and r.usage.completion_tokens == 0
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="m", prompt="abc", max_tokens=-1, echo=True)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="m", prompt=[300], max_tokens=0, echo=True, logprobs=1)
    with pytest.raises(openai.BadRequestError):  # chat keeps max_tokens >= 1
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], max_tokens=0)
