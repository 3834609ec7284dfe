"""The JavaScript runtime's generation core (js/src/generation.js, mirroring runtime/generation.py) gives
the Python core's answers on the default model: per-token log-probabilities (the token's and the top
alternatives, aligned with the text) and stop strings cut where Python cuts, on greedy and seeded
generations; a batch of prompts gives every row the tokens Python's generate_tokens gives it alone; one
failing row (its sampler, or its part of the model step) ends alone. Runs `node --test
test/generation.test.js` with RWKV_GEN_DIR set to the answers written here."""

from __future__ import annotations

import json

import pytest

from .conftest import counts_ok, failures, node_export, run_node_tests

pytestmark = pytest.mark.slow

PROMPT = list(b"Describe the structure of an atom.")
BATCH_PROMPTS = [PROMPT, list(b"Hello"), list(b"The atom"), list(b"def f(x):")]
BATCH_PARAMS = [  # one per prompt: greedy, seeded, penalties
    {"temperature": 0},
    {"temperature": 1.0, "top_p": 0.85, "seed": 7},
    {"temperature": 0.7, "top_p": 0.95, "top_k": 20, "presence_penalty": 0.4, "frequency_penalty": 0.3, "seed": 9},
    {"temperature": 1.2, "seed": 11},
]


def _core(session, params: dict, stops: list, k: int, n: int) -> dict:
    """One row on Python's generation core with text, stop strings and logprobs: what the engine runs."""
    import numpy as np

    from rwkv_runtime import SamplingParams
    from rwkv_runtime.generation import Batch, Row, TextStream
    from rwkv_runtime.sampling import Sampler

    logits, st = session.prefill(np.asarray([PROMPT]))
    row = Row(
        Sampler(SamplingParams(**params), session.vocab_size),
        max_new_tokens=n,
        text=TextStream(session.tokenizer, stops, True),
        logprobs=k,
        feed_last=True,
    )
    b = Batch(session)
    b.add(row, st, logits)
    text, entries, reason = "", [], None
    while b.rows:
        for out in b.step():
            assert out.error is None
            text += out.text
            entries += out.logprobs or []
            reason = out.reason or reason
    return {
        "params": params,
        "stops": stops,
        "k": k,
        "max": n,
        "text": text,
        "reason": reason,
        "tokens": row.tokens,
        "logprobs": [
            {"token": e.token, "logprob": e.logprob, "top": [list(t) for t in e.top], "text": text[e.start : e.end]}
            for e in entries
        ],
    }


@pytest.fixture(scope="module")
def gen_dir(tmp_path_factory):
    from rwkv_runtime import SamplingParams, Session

    d, model = node_export(tmp_path_factory, "js-gen")
    s = Session(model)
    greedy = "".join(s.generate(bytes(PROMPT).decode(), 40, temperature=0))
    # a stop string the greedy text first reaches mid-way
    stop = next(greedy[i : i + 3] for i in range(12, len(greedy) - 3) if greedy.find(greedy[i : i + 3]) == i)
    cases = [
        _core(s, {"temperature": 0}, [stop, "never there"], 5, 40),
        _core(s, {"temperature": 0}, [], 3, 40),  # no stop: runs to the length limit
        _core(s, {"temperature": 1.0, "top_p": 0.9, "seed": 5}, ["\n\n"], 4, 60),
    ]
    assert cases[0]["reason"] == "stop" and cases[1]["reason"] == "length"
    alone = [list(s.generate_tokens(p, 30, SamplingParams(**q))) for p, q in zip(BATCH_PROMPTS, BATCH_PARAMS)]
    (d / "gen.json").write_text(
        json.dumps(
            {
                "model": str(model),
                "prompt": PROMPT,
                "cases": cases,
                "batch": {"prompts": BATCH_PROMPTS, "params": BATCH_PARAMS, "max": 30, "tokens": alone},
            }
        )
    )
    return d


def test_js_generation_suite_passes(gen_dir):
    r = run_node_tests(gen_dir, ["test/generation.test.js"], env_extra={"RWKV_GEN_DIR": str(gen_dir)})
    out = r.stdout + r.stderr
    assert r.returncode == 0 and counts_ok(out), failures(out)
