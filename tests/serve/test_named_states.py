"""serve --state NAME=FILE: named initial states chosen by ``model: MODEL:NAME``, each request's output
equal to ``Session(model, initial_state=FILE)``'s, listed in /v1/models, unknown names a 404 in
OpenAI's shape, and a prefix cache keyed by the state (the same prompt from two states never shares
a cached prefix)."""

from __future__ import annotations

import contextlib

import httpx
import numpy as np
import pytest

from .conftest import V7, client, metric, need_serve_deps

need_serve_deps()

PROMPT = [72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 32, 84, 104, 101]  # "Hello, world! The"
N_GEN = 6


@pytest.fixture(scope="module")
def states(v7_model, tmp_path_factory):
    """Three starting points: a state-tuning .pth (converted as `rwkv-export serve` converts it), its
    convert-state .npz, and a conversation state saved by Session.save_state."""
    import rwkv_runtime
    from rwkv_export.export import state_tuning_to_npz

    from ..helpers import random_state_tuning

    d = tmp_path_factory.mktemp("named")
    random_state_tuning(V7, d / "tuned.pth", seed=3, scale=0.5)
    state_tuning_to_npz(V7, d / "tuned.pth", d / "tuned.npz")
    s = rwkv_runtime.Session(v7_model)
    _, st = s.prefill([list(b"Once upon a time, in a land far away")])
    s.save_state(st, d / "story.npz")
    return {"tuned": d / "tuned.npz", "story": d / "story.npz", "pth": d / "tuned.pth"}


def truth(model, initial, prompt=PROMPT, n=N_GEN):
    """Greedy tokens and their log-probabilities from Session(model, initial_state=initial)."""
    import rwkv_runtime

    s = rwkv_runtime.Session(model, initial_state=initial) if initial is not None else rwkv_runtime.Session(model)
    st = s.new_state(1)
    logits = None
    for t in prompt:
        logits, st = s.step(np.array([t]), st)
    toks, lps = [], []
    for _ in range(n):
        x = logits[0].astype(np.float64)
        lp = x - x.max() - np.log(np.exp(x - x.max()).sum())
        t = int(np.argmax(x))
        toks.append(t)
        lps.append(float(lp[t]))
        logits, st = s.step(np.array([t]), st)
    return toks, lps


@pytest.fixture
def server(v7_model, states):
    from rwkv_runtime.server import ServerOptions, ServerThread, build_app

    with contextlib.ExitStack() as stack:

        def make(**kw):
            opts = ServerOptions(
                str(v7_model), "m", states=(f"tuned={states['tuned']}", f"story={states['story']}"), **kw
            )
            app, eng = build_app(opts)
            return stack.enter_context(ServerThread(app, eng))

        yield make


def gen(srv, model, prompt=PROMPT):
    r = client(srv).completions.create(model=model, prompt=prompt, max_tokens=N_GEN, temperature=0, logprobs=0)
    return r.choices[0].logprobs.token_logprobs


@pytest.mark.parametrize("name", ["tuned", "story"])
def test_named_state_output_equals_session_initial_state(server, v7_model, states, name):
    srv = server()
    _, want = truth(v7_model, states[name])
    np.testing.assert_allclose(gen(srv, f"m:{name}"), want, atol=1e-4, rtol=0)
    _, plain = truth(v7_model, None)
    np.testing.assert_allclose(gen(srv, "m"), plain, atol=1e-4, rtol=0)
    assert np.abs(np.array(want) - np.array(plain)).max() > 1e-3  # the state really changes the output


def test_models_lists_named_states(server):
    srv = server()
    ids = [m.id for m in client(srv).models.list().data]
    assert ids == ["m", "m:tuned", "m:story"]
    card = httpx.get(srv.url + "/v1/models/m:story", timeout=10).json()
    assert card["id"] == "m:story" and card["parent"] == "m" and card["initial_state"] == "story"


@pytest.mark.parametrize("model", ["m:nope", "other:tuned", "m:", "tuned"])
def test_unknown_named_state_is_404(server, model):
    srv = server()
    for path, body in (
        ("/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 1}),
        ("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "hi"}]}),
    ):
        r = httpx.post(srv.url + path, json=body, timeout=30)
        assert r.status_code == 404, r.text
        err = r.json()["error"]
        assert err["code"] == "model_not_found" and err["param"] == "model" and model in err["message"]
    r = httpx.get(srv.url + f"/v1/models/{model}", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_prefix_cache_keyed_by_state(server, v7_model, states):
    """The same prompt from the model's start, then from two named states: every prompt is cached (chunk
    ends and prompt ends), so a cache keyed by tokens alone would answer the second and third from the
    first's state. Each must equal its own truth; a repeat from the same state is a cache hit."""
    srv = server(engine=__import__("rwkv_runtime.server", fromlist=["EngineConfig"]).EngineConfig(prefill_chunk=4))
    _, plain = truth(v7_model, None)
    _, tuned = truth(v7_model, states["tuned"])
    _, story = truth(v7_model, states["story"])
    np.testing.assert_allclose(gen(srv, "m"), plain, atol=1e-4, rtol=0)
    hits = metric(srv, "rwkv_prefix_cache_hits_total")
    np.testing.assert_allclose(gen(srv, "m:tuned"), tuned, atol=1e-4, rtol=0)
    np.testing.assert_allclose(gen(srv, "m:story"), story, atol=1e-4, rtol=0)
    assert metric(srv, "rwkv_prefix_cache_hits_total") == hits  # no state reused another's prefix
    np.testing.assert_allclose(gen(srv, "m:tuned"), tuned, atol=1e-4, rtol=0)
    assert metric(srv, "rwkv_prefix_cache_hits_total") == hits + 1  # its own prefix: reused


def test_prompt_scoring_starts_from_named_state(server, v7_model, states):
    """echo + logprobs (the prompt's own log-probabilities) is computed from the named state too."""
    import rwkv_runtime

    srv = server()
    r = client(srv).completions.create(model="m:tuned", prompt=PROMPT, max_tokens=0, echo=True, logprobs=0)
    got = r.choices[0].logprobs.token_logprobs[1:]
    s = rwkv_runtime.Session(v7_model, initial_state=states["tuned"])
    st, want = s.new_state(1), []
    for i, t in enumerate(PROMPT[:-1]):
        logits, st = s.step(np.array([t]), st)
        x = logits[0].astype(np.float64)
        want.append(float(x[PROMPT[i + 1]] - x.max() - np.log(np.exp(x - x.max()).sum())))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_pth_state_converted_by_rwkv_export_serve(v7_model, states):
    """A state-tuning .pth: the torch-free server refuses it with the command that converts it; the
    `rwkv-export serve` path converts it to the same start as convert-state's .npz."""
    from rwkv_export.targets.serve_cli import _convert_states
    from rwkv_runtime import RuntimeUserError
    from rwkv_runtime.server import ServerOptions, ServerThread, build_app

    opts = ServerOptions(str(v7_model), "m", states=(f"tuned={states['pth']}",))
    with pytest.raises(RuntimeUserError, match="needs torch to read.*convert-state"):
        build_app(opts)
    app, eng = build_app(_convert_states(v7_model, opts))
    with ServerThread(app, eng) as srv:
        _, want = truth(v7_model, states["tuned"])
        np.testing.assert_allclose(gen(srv, "m:tuned"), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "spec,message",
    [
        ("noequals", "expected NAME=FILE"),
        ("bad name=x.npz", "NAME must be"),
        ("a=missing.npz", "no such file"),
    ],
)
def test_state_option_errors(v7_model, spec, message):
    from rwkv_runtime import RuntimeUserError
    from rwkv_runtime.server import ServerOptions, build_app

    with pytest.raises(RuntimeUserError, match=message):
        build_app(ServerOptions(str(v7_model), "m", states=(spec,)))


def test_state_flag_in_both_clis(v7_model, states):
    """--state is generated from ServerOptions for both command lines (repeatable)."""
    from rwkv_runtime.server.options import cli_options, from_cli

    o = next(o for o in cli_options() if o.name == "states")
    assert o.flag_name == "--state" and o.flag.multiple
    opts = from_cli(str(v7_model), {"state": [f"a={states['tuned']}", f"b={states['story']}"]})
    assert opts.states == (f"a={states['tuned']}", f"b={states['story']}")
