"""SIGTERM while `rwkv-export serve` scores a long prompt (prompt_logprobs / echo+logprobs): the request is
answered, not cut. Was: the drain did not wait for prompt scoring (it runs outside the engine), uvicorn's
graceful timeout cancelled the request mid-scoring, the client got a plain-text 500 and the log a
CancelledError traceback. Now a drain gives scoring requests its grace; past it they are abandoned
between two model runs and answered 503 in OpenAI's error shape, and the process exits at once."""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest

from .conftest import need_serve_deps, server_process

need_serve_deps()

import httpx  # noqa: E402

pytestmark = pytest.mark.slow

LONG = "The quick brown fox. " * 4000  # 84 000 byte tokens: scored one step a token, ~20 s on this model


def test_sigterm_during_long_prompt_scoring_answers_503_and_exits(default_model):
    env = {k: v for k, v in __import__("os").environ.items() if k != "RWKV_API_KEY"}
    argv = ["-c", "from rwkv_export.cli import main; main()", "serve", str(default_model), "--port", "0"]
    argv += ["--model-name", "m", "--drain-seconds", "1", "--max-prompt-tokens", "200000"]
    with server_process(argv, env=env) as (p, url, rest, _):
        answers: dict = {}

        def ask(name, body):
            try:
                r = httpx.post(url + "/v1/completions", json=body, timeout=120)
                answers[name] = (r.status_code, r.text)
            except httpx.HTTPError as e:  # a cut connection is the failure this test is about
                answers[name] = (None, repr(e))

        base = {"model": "m", "prompt": LONG, "max_tokens": 0, "prompt_logprobs": 5}
        clients = [
            threading.Thread(target=ask, args=(n, {**base, **extra}))
            for n, extra in (
                ("plain", {}),
                ("stream", {"stream": True}),
                ("echo", {"echo": True, "logprobs": 2, "max_tokens": 3}),
            )
        ]
        for c in clients:
            c.start()
        time.sleep(1.5)  # all three accepted; the first is scoring, the others wait for the scoring lock
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        for c in clients:
            c.join(60)
        assert p.wait(30) == -signal.SIGTERM
        took = time.monotonic() - t0
        for name, (status, text) in answers.items():
            assert status == 503, (name, status, text[:300])
            err = json.loads(text)["error"]
            assert err["type"] == "service_unavailable" and "shut down" in err["message"], (name, err)
        assert took < 10, took  # the drain's 1 s, not the ~20 s the scoring would have taken
        log = "".join(rest)
        assert "Traceback" not in log and "CancelledError" not in log, log
