"""Per-request failure in the server (issue #24): one sequence whose sampling raises inside the scheduler
fails that request alone (500, logged with its traceback); the requests running beside it complete with
the same text as when each runs alone. (It used to fail every running and queued request with 500.)"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from .conftest import need_serve_deps

need_serve_deps()

import openai  # noqa: E402 - after the skip check

from rwkv_runtime.sampling import Sampler  # noqa: E402 - after the skip check

from .conftest import client  # noqa: E402 - after the skip check

OTHERS = [
    dict(prompt="def main():\n", temperature=0.0),
    dict(prompt="import os\n", temperature=1.0, top_p=0.9, seed=5),
    dict(prompt="class Point:\n", temperature=0.7, seed=9),
]
POISON = dict(prompt="x = ", temperature=1.0, seed=666)


def _complete(c, kw, n=48):
    return c.completions.create(model="m", max_tokens=n, **kw).choices[0].text


@pytest.mark.slow
def test_a_failing_sequence_fails_alone(default_model, make_server, monkeypatch, caplog):
    srv = make_server(default_model, model_name="m")
    c = client(srv)
    alone = [_complete(c, kw) for kw in OTHERS]
    seen, real = set(), Sampler.__call__

    def call(self, logits, *a, **k):
        if self.params.seed == 666 and {5, 9} <= seen:  # fail once the sampled others are running beside it
            raise ValueError("injected sampler failure")
        seen.add(self.params.seed)
        return real(self, logits, *a, **k)

    monkeypatch.setattr(Sampler, "__call__", call)
    go = threading.Barrier(len(OTHERS) + 1)

    def run(kw):
        go.wait()
        try:
            return _complete(c, kw, 48 if kw is not POISON else 400)
        except openai.APIStatusError as e:
            return e

    with caplog.at_level(logging.ERROR), ThreadPoolExecutor(len(OTHERS) + 1) as pool:
        got = list(pool.map(run, OTHERS + [POISON]))
    assert isinstance(got[-1], openai.InternalServerError), got[-1]
    assert "injected sampler failure" in got[-1].message
    assert got[:-1] == alone
    assert "injected sampler failure" in caplog.text and "Traceback" in caplog.text
    assert _complete(c, OTHERS[0]) == alone[0]  # the server carries on
