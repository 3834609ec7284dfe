"""OpenAI's ``logit_bias`` through a real server on 127.0.0.1 and the official `openai` client. Truth:
``Session.generate`` with the same bias (whose Sampler is checked against biased logits in
tests/runtime/test_sampling.py)."""

from __future__ import annotations

import pytest

from .conftest import client, need_serve_deps

need_serve_deps()

import openai  # noqa: E402 - after the skip check

from rwkv_runtime import Session  # noqa: E402 - after the skip check

PROMPT = "The quick brown fox"


def solo(model, n: int, **sampling) -> str:
    return "".join(Session(model).generate(PROMPT, n, **sampling))


def test_logit_bias_equals_session_generate(default_model, make_server):
    srv = make_server(default_model, model_name="m")
    c = client(srv)
    plain = c.completions.create(model="m", prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    first = Session(default_model).encode(plain[0])[0]  # byte-level: one token
    bias = {first: -100.0, first + 1: 5.0}
    r = c.completions.create(
        model="m", prompt=PROMPT, max_tokens=12, temperature=0, logit_bias={str(k): v for k, v in bias.items()}
    )
    assert r.choices[0].text == solo(default_model, 12, temperature=0, logit_bias=bias) != plain
    assert not r.choices[0].text.startswith(plain[0])
    # seeded sampling with penalties, streamed: the same sample as Session.generate
    kw = dict(temperature=1.2, top_p=0.95, presence_penalty=0.3, seed=4)
    chunks = c.completions.create(
        model="m", prompt=PROMPT, max_tokens=20, stream=True, logit_bias={str(k): v for k, v in bias.items()}, **kw
    )
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == solo(default_model, 20, logit_bias=bias, **kw)
    # chat: +100 on one token forces it
    x = Session(default_model).encode("x")[0]
    r = c.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0, logit_bias={str(x): 100}
    )
    assert r.choices[0].message.content == "xxxxxx"


@pytest.mark.parametrize(
    "bias", [{"abc": 1}, {"5": 101}, {"5": -100.5}, {"999999": 1}, {"-1": 1}, {"5": "1"}, {"5": True}]
)
def test_bad_logit_bias_is_a_400(default_model, make_server, bias):
    srv = make_server(default_model, model_name="m")
    with pytest.raises(openai.BadRequestError) as e:
        client(srv).completions.create(model="m", prompt="Hi", max_tokens=2, logit_bias=bias)
    assert e.value.body["param"] == "logit_bias"
