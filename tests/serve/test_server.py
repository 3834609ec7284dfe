"""The OpenAI-compatible server, driven by the official `openai` client against a real server on
127.0.0.1. Truth: ``Session.generate`` (greedy, or seeded sampling) run alone in this process."""

from __future__ import annotations

import asyncio
import functools
import threading
import time

import pytest

from .conftest import need_serve_deps

need_serve_deps()

import httpx  # noqa: E402 - after the skip check
import numpy as np  # noqa: E402 - after the skip check
import openai  # noqa: E402 - after the skip check

from rwkv_runtime import SamplingParams, Session  # noqa: E402 - after the skip check

from .conftest import client, metric  # noqa: E402 - after the skip check


@functools.lru_cache(maxsize=4)
def _session(model) -> Session:
    return Session(model)


def solo(model, prompt, n, state=None, **sampling):
    """Text pieces Session.generate yields for ``prompt`` alone (greedy unless told otherwise)."""
    s = _session(model)
    sampling.setdefault("temperature", 0.0)
    return list(s.generate(prompt, n, SamplingParams(**sampling), state=state))


@pytest.mark.parametrize("which", ["default_model", "v7_model"])
def test_greedy_equals_session_generate(which, request, make_server):
    model = request.getfixturevalue(which)
    srv = make_server(model, model_name="m")
    c = client(srv)
    prompt = "The quick brown fox"
    want = solo(model, prompt, 40)
    r = c.completions.create(model="m", prompt=prompt, max_tokens=40, temperature=0)
    assert r.choices[0].text == "".join(want)
    assert r.choices[0].finish_reason == "length"
    n_prompt = len(Session(model).encode(prompt))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, 40, n_prompt + 40)
    # streaming: the same pieces, one chunk per token, then a finish chunk and [DONE]
    chunks = list(
        c.completions.create(
            model="m", prompt=prompt, max_tokens=40, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    pieces = [ch.choices[0].text for ch in chunks if ch.choices and ch.choices[0].text]
    assert pieces == want
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 40 and chunks[-1].usage.prompt_tokens == n_prompt
    # the whole prompt came from the prefix cache this time (the state after it was kept), same tokens
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == n_prompt


def test_seeded_sampling_and_n(default_model, make_server):
    srv = make_server(default_model, model_name="m")
    r = client(srv).completions.create(
        model="m",
        prompt="Once upon a time",
        max_tokens=30,
        temperature=0.9,
        top_p=0.9,
        presence_penalty=0.3,
        frequency_penalty=0.2,
        seed=7,
        n=2,
        extra_body={"top_k": 20},
    )
    assert [ch.index for ch in r.choices] == [0, 1]
    for j, ch in enumerate(r.choices):  # choice j is sampled with seed + j
        want = solo(
            default_model,
            "Once upon a time",
            30,
            temperature=0.9,
            top_p=0.9,
            top_k=20,
            presence_penalty=0.3,
            frequency_penalty=0.2,
            seed=7 + j,
        )
        assert ch.text == "".join(want)
    assert r.usage.completion_tokens == 60 and r.usage.prompt_tokens == len("Once upon a time")


def test_stop_strings_across_tokens(default_model, make_server):
    srv = make_server(default_model, model_name="m")
    c = client(srv)
    full = "".join(solo(default_model, "Hello", 40))  # byte tokenizer: each character is its own token
    stop = full[10:14]  # 4 tokens long: it can only be seen across token boundaries
    cut = full[: full.index(stop)]
    r = c.completions.create(model="m", prompt="Hello", max_tokens=40, temperature=0, stop=[stop, "zzzz"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (cut, "stop")
    assert r.usage.completion_tokens == full.index(stop) + len(stop)  # the stop string's tokens were generated
    chunks = list(c.completions.create(model="m", prompt="Hello", max_tokens=40, temperature=0, stop=stop, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"
    # a stop string that never completes: everything held back is released at the end
    r = c.completions.create(model="m", prompt="Hello", max_tokens=12, temperature=0, stop=[full[11:13] + "\x01"])
    assert r.choices[0].text == full[:12]


def test_chat_template_and_default_stop(default_model, make_server):
    srv = make_server(default_model, model_name="m")
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi\n\nthere"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What is a string?"},
    ]
    rendered = "System: Be brief.\n\nUser: Hi\nthere\n\nAssistant: Hello.\n\nUser: What is a string?\n\nAssistant:"
    full = "".join(solo(default_model, rendered, 60))
    want = full.split("\n\nUser:")[0]
    r = client(srv).chat.completions.create(model="m", messages=msgs, max_tokens=60, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(rendered.encode())
    chunks = list(
        client(srv).chat.completions.create(model="m", messages=msgs, max_tokens=60, temperature=0, stream=True)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want


def test_error_statuses(default_model, make_server):
    srv = make_server(default_model, model_name="m", max_prompt_tokens=50, max_batch=1, max_queue=1, max_tokens=100000)
    c = client(srv)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="m", prompt="x", temperature=5)
    assert e.value.status_code == 400 and e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="m", prompt=[999], max_tokens=2)  # token id outside the vocabulary
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="m", prompt="x", max_tokens=200000)  # over the server's ceiling
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="gpt-4", prompt="x")
    assert e.value.status_code == 404 and e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.APIStatusError) as e:
        c.completions.create(model="m", prompt="y" * 51)
    assert e.value.status_code == 413 and e.value.body["code"] == "context_length_exceeded"
    r = httpx.post(srv.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(srv.url + "/v1/nothing-here", json={})
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(
        srv.url + "/v1/chat/completions", json={"model": "m", "messages": [{"role": "robot", "content": "x"}]}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    # 429: one slot busy with a long stream, one request queued, the next one refused
    busy = c.completions.create(model="m", prompt="a", max_tokens=100000, temperature=0, stream=True)
    next(iter(busy))
    queued = threading.Thread(
        target=lambda: _swallow(lambda: c.completions.create(model="m", prompt="b", max_tokens=1))
    )
    queued.start()
    _wait(lambda: metric(srv, "rwkv_queue_length") == 1)
    with pytest.raises(openai.RateLimitError) as e:
        c.completions.create(model="m", prompt="c", max_tokens=1)
    assert e.value.status_code == 429 and e.value.body["type"] == "rate_limit_error"
    busy.close()
    queued.join(30)
    # 503: shutting down (new requests refused, /health says so)
    srv.engine.begin_shutdown()
    with pytest.raises(openai.InternalServerError) as e:
        c.completions.create(model="m", prompt="x", max_tokens=2)
    assert e.value.status_code == 503
    assert httpx.get(srv.url + "/health").status_code == 503


def _swallow(fn):
    try:
        fn()
    except openai.APIError:
        pass


def _wait(cond, timeout=20.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.05)


@pytest.mark.slow
def test_sixteen_concurrent_streams_each_get_their_solo_text(default_model, make_server):
    srv = make_server(default_model, model_name="m")
    prompts = [f"{w} number {i} is" for i, w in enumerate(["The", "A", "Some", "Every"] * 4)]
    want = ["".join(solo(default_model, p, 48)) for p in prompts]

    async def one(c, p):
        stream = await c.completions.create(model="m", prompt=p, max_tokens=48, temperature=0, stream=True)
        return "".join([ch.choices[0].text async for ch in stream])

    async def all_of_them():
        c = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        try:
            return await asyncio.gather(*(one(c, p) for p in prompts))
        finally:
            await c.close()

    got = asyncio.run(all_of_them())
    assert got == want
    # they really were batched: decode steps ran with more than 8 sequences at once
    assert metric(srv, "rwkv_batch_size_count") - metric(srv, "rwkv_batch_size_bucket", 'le="8.0"') > 0


def test_prefix_cache_saves_prefill_work(default_model, make_server):
    srv = make_server(default_model, model_name="m", prefill_chunk=32)
    c = client(srv)
    system = "You are a helpful assistant who answers in full sentences. " * 4  # 240 tokens
    first, second = system + "Question one?", system + "Another question here?"
    c.completions.create(model="m", prompt=first, max_tokens=4, temperature=0)
    before = metric(srv, "rwkv_prefill_tokens_total")
    hits = metric(srv, "rwkv_prefix_cache_hits_total")
    r = c.completions.create(model="m", prompt=second, max_tokens=20, temperature=0)
    done = metric(srv, "rwkv_prefill_tokens_total") - before
    assert metric(srv, "rwkv_prefix_cache_hits_total") == hits + 1
    assert done == len(second) - 224  # the last chunk boundary inside the shared prefix (7 x 32) was reused
    assert r.usage.prompt_tokens_details.cached_tokens == 224
    assert r.choices[0].text == "".join(solo(default_model, second, 20))


def test_disconnect_frees_the_slot(default_model, make_server):
    srv = make_server(default_model, model_name="m", max_tokens=1000000)
    with httpx.Client(timeout=30) as h:
        with h.stream(
            "POST",
            srv.url + "/v1/completions",
            json={"model": "m", "prompt": "Hi", "stream": True, "max_tokens": 1000000, "temperature": 0},
        ) as r:
            lines = r.iter_lines()
            for _ in range(10):
                next(lines)
            assert metric(srv, "rwkv_running_sequences") == 1
    # the client is gone: its sequence leaves the batch (a million tokens would take many minutes)
    _wait(lambda: metric(srv, "rwkv_running_sequences") == 0, timeout=10)
    assert metric(srv, "rwkv_sequences_finished_total", 'reason="cancelled"') == 1
    assert metric(srv, "rwkv_generation_tokens_total") < 100000


def test_conversation_state_export_and_resume(default_model, v7_model, make_server):
    a = make_server(default_model, model_name="m")
    b = make_server(default_model, model_name="m")  # another replica of the same export
    r1 = client(a).completions.create(
        model="m", prompt="Hello there", max_tokens=12, temperature=0, extra_body={"return_state": True}
    )
    blob = r1.choices[0].model_extra["state"]
    r2 = client(b).completions.create(
        model="m", prompt=" and then", max_tokens=20, temperature=0, extra_body={"state": blob}
    )
    # truth: one process that saw the prompt, the reply, then the continuation
    s = Session(default_model)
    _, st = s.prefill(np.array([s.encode("Hello there" + r1.choices[0].text)]))
    assert r2.choices[0].text == "".join(solo(default_model, " and then", 20, state=st))
    assert r2.usage.prompt_tokens == len(" and then")
    # refused: another export's state, a damaged blob, not base64
    v7 = make_server(v7_model, model_name="m")
    for bad in (blob, blob[:-40] + "A" * 40, "%%%"):
        with pytest.raises(openai.BadRequestError) as e:
            client(v7).completions.create(model="m", prompt="x", max_tokens=2, extra_body={"state": bad})
        assert e.value.body["param"] == "state"


def test_graceful_shutdown_finishes_in_flight_streams(default_model, make_server):
    srv = make_server(default_model, model_name="m")
    c = client(srv)
    stream = c.completions.create(model="m", prompt="Hi", max_tokens=300, temperature=0, stream=True)
    it = iter(stream)
    first = next(it)
    srv.engine.begin_shutdown()
    with pytest.raises(openai.InternalServerError):
        c.completions.create(model="m", prompt="x", max_tokens=2)
    rest = list(it)
    assert rest[-1].choices[0].finish_reason == "length"
    assert first.choices[0].text + "".join(ch.choices[0].text for ch in rest) == "".join(solo(default_model, "Hi", 300))


def test_models_health_metrics(default_model, make_server):
    srv = make_server(default_model, model_name="m")
    c = client(srv)
    assert [m.id for m in c.models.list().data] == ["m"]
    assert c.models.retrieve("m").id == "m"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("other")
    assert httpx.get(srv.url + "/health").json()["status"] == "ok"
    c.completions.create(model="m", prompt="Hi", max_tokens=3, temperature=0)
    assert metric(srv, "rwkv_requests_total", 'endpoint="/v1/completions",status="200"') == 1
    assert metric(srv, "rwkv_generation_tokens_total") == 3
    assert metric(srv, "rwkv_time_to_first_token_seconds_count") == 1


def test_long_prompt_is_prefilled_between_decode_steps(default_model, make_server):
    """A 1024-token prompt arriving while a stream runs is prefilled 32 tokens per scheduler iteration,
    each followed by a decode step of the running stream (from the metrics' counts, not timed)."""
    srv = make_server(default_model, model_name="m", prefill_chunk=32, prefill_budget=32, max_tokens=1000000)
    c = client(srv)
    running = c.completions.create(model="m", prompt="Hi", max_tokens=1000000, temperature=0, stream=True)
    it = iter(running)
    next(it)
    steps = metric(srv, "rwkv_decode_steps_total")
    r = c.completions.create(model="m", prompt="abcdefgh" * 128, max_tokens=1, temperature=0)
    assert r.usage.prompt_tokens == 1024
    assert metric(srv, "rwkv_decode_steps_total") - steps >= 1024 // 32
    # never more than one chunk between two of the running stream's steps
    stalls = metric(srv, "rwkv_prefill_tokens_between_steps_count")
    assert stalls >= 1024 // 32
    assert metric(srv, "rwkv_prefill_tokens_between_steps_bucket", 'le="32.0"') == stalls
    assert metric(srv, "rwkv_prefill_tokens_between_steps_sum") == 1024
    running.close()
    _wait(lambda: metric(srv, "rwkv_running_sequences") == 0)


def test_request_timeout_ends_a_generation(default_model, make_server):
    srv = make_server(default_model, model_name="m", request_timeout=0.5, max_tokens=10**7)
    r = client(srv).completions.create(model="m", prompt="Hi", max_tokens=10**7, temperature=0)
    assert r.choices[0].finish_reason == "timeout"
    assert 0 < r.usage.completion_tokens < 10**7
    assert metric(srv, "rwkv_sequences_finished_total", 'reason="timeout"') == 1
