"""``/tokenize`` and ``/detokenize`` (vLLM's routes) on a real server on 127.0.0.1. Truth: the export's
tokenizer through ``Session.encode``/``decode``, and the chat template's documented rendering."""

from __future__ import annotations

from .conftest import client, need_serve_deps

need_serve_deps()

import httpx  # noqa: E402 - after the skip check

from rwkv_runtime import Session  # noqa: E402 - after the skip check


def post(srv, path: str, body: dict) -> httpx.Response:
    return httpx.post(srv.url + path, json=body, timeout=30)


def test_tokenize_and_detokenize_match_the_session(v7_model, make_server):
    srv = make_server(v7_model, model_name="m", max_prompt_tokens=4096)
    s = Session(v7_model)
    text = "Naïve café — 日本語, ok?\n"
    r = post(srv, "/tokenize", {"model": "m", "prompt": text}).json()
    assert r == {"tokens": s.encode(text), "count": len(s.encode(text)), "max_model_len": 4096}
    assert post(srv, "/detokenize", {"tokens": r["tokens"]}).json() == {"prompt": text}
    # messages: the prompt the chat endpoint would send, as the template renders it
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\n\nthere"}]
    got = post(srv, "/tokenize", {"messages": msgs}).json()["tokens"]
    assert s.decode(got) == "System: Be brief.\n\nUser: Hi\nthere\n\nAssistant:"


def test_the_ids_it_gives_work_in_logit_bias(default_model, make_server):
    srv = make_server(default_model, model_name="m")
    (x,) = post(srv, "/tokenize", {"prompt": "x"}).json()["tokens"]
    r = client(srv).completions.create(model="m", prompt="Hello", max_tokens=5, temperature=0, logit_bias={str(x): 100})
    assert r.choices[0].text == "xxxxx"


def test_tokenize_errors(default_model, make_server):
    srv = make_server(default_model, model_name="m")
    for path, body, status, param in [
        ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, 400, "prompt"),
        ("/tokenize", {}, 400, "prompt"),
        ("/tokenize", {"prompt": "a", "model": "other"}, 404, "model"),
        ("/tokenize", {"prompt": 5}, 400, "prompt"),
        ("/detokenize", {"tokens": [1, 10**6]}, 400, "tokens"),
        ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
        ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
        ("/detokenize", {"tokens": [1], "model": "other"}, 404, "model"),
    ]:
        r = post(srv, path, body)
        assert r.status_code == status, (path, body, r.text)
        assert r.json()["error"]["param"] == param, (path, body, r.text)
