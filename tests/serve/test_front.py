"""The server's front (issue #24): API keys, shutdown under SIGTERM, strict request types, bounded stop
strings, damaged conversation states, the chat render of history, metrics labels, structured logs with
their stacks, and the options both CLIs are generated from. Real servers on 127.0.0.1 only."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import logging
import signal
import subprocess
import sys
import threading
import time
import zipfile

import pytest

from .conftest import need_serve_deps

need_serve_deps()

import httpx  # noqa: E402 - after the skip check
import numpy as np  # noqa: E402 - after the skip check
import openai  # noqa: E402 - after the skip check

from .conftest import client, metric, server_process  # noqa: E402 - after the skip check


def _keyed_server(model, key, stack):
    from rwkv_runtime.server import ServerOptions, ServerThread, build_app

    app, eng = build_app(ServerOptions(str(model), "m", api_key=key))
    return stack.enter_context(ServerThread(app, eng))


# -- API key --------------------------------------------------------------------------------------
def test_api_key_is_required_as_a_bearer_token(default_model):
    import contextlib

    with contextlib.ExitStack() as stack:
        srv = _keyed_server(default_model, "s3cret", stack)
        ok = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0, timeout=60)
        assert ok.completions.create(model="m", prompt="Hi", max_tokens=2).usage.completion_tokens == 2
        for wrong in ("s3cre", "s3cret2", "S3CRET"):
            bad = openai.OpenAI(base_url=srv.url + "/v1", api_key=wrong, max_retries=0, timeout=60)
            with pytest.raises(openai.AuthenticationError) as e:
                bad.completions.create(model="m", prompt="Hi", max_tokens=2)
            assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
            with pytest.raises(openai.AuthenticationError):
                bad.models.list()
        # no header at all; another scheme; the tokenizer endpoints are not open either
        r = httpx.post(
            srv.url + "/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "x"}]},
            timeout=10,
        )
        assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert r.headers["www-authenticate"] == "Bearer"
        assert (
            httpx.get(srv.url + "/v1/models", headers={"Authorization": "Basic s3cret"}, timeout=10).status_code == 401
        )
        assert httpx.post(srv.url + "/tokenize", json={"prompt": "x"}, timeout=10).status_code == 401
        # health and metrics stay open (load balancers and Prometheus carry no key)
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 200
        assert httpx.get(srv.url + "/metrics", timeout=10).status_code == 200
        assert metric(srv, "rwkv_requests_total", 'endpoint="/v1/completions",status="401"') == 3


def test_api_key_from_the_environment_and_both_clis(monkeypatch):
    from click.testing import CliRunner  # noqa: F401 - click is there (the CLI parses)

    from rwkv_export.targets.serve_cli import serve_command
    from rwkv_runtime.server.__main__ import options_from, parser

    monkeypatch.delenv("RWKV_API_KEY", raising=False)
    assert options_from(parser().parse_args(["m.onnx"])).api_key is None
    assert options_from(parser().parse_args(["m.onnx", "--api-key", "a"])).api_key == "a"
    monkeypatch.setenv("RWKV_API_KEY", "from-env")
    assert options_from(parser().parse_args(["m.onnx"])).api_key == "from-env"
    assert options_from(parser().parse_args(["m.onnx", "--api-key", "flag"])).api_key == "flag"
    ctx = serve_command.make_context("serve", ["m.onnx"])
    from rwkv_runtime.server.options import from_cli

    assert from_cli("m.onnx", {k: v for k, v in ctx.params.items() if k != "model"}).api_key == "from-env"


def test_a_non_loopback_host_without_a_key_warns(default_model):
    from rwkv_runtime.server.runner import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert is_loopback("0.0.0.0") is False and is_loopback("192.0.2.1") is False
    assert is_loopback("no-such-host.invalid") is None
    # 192.0.2.1 (TEST-NET-1) is on no interface here: the warning comes, then the bind fails (nothing listens)
    res = subprocess.run(
        [sys.executable, "-m", "rwkv_runtime.server", str(default_model), "--host", "192.0.2.1", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert res.returncode == 1
    assert "no API key" in res.stderr and "--api-key" in res.stderr, res.stderr
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "rwkv_runtime.server",
            str(default_model),
            "--host",
            "192.0.2.1",
            "--port",
            "0",
            "--api-key",
            "k",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert res.returncode == 1 and "no API key" not in res.stderr and res.stderr.startswith("Error:"), res.stderr


def _env():
    import os

    return {k: v for k, v in os.environ.items() if k != "RWKV_API_KEY"}


# -- SIGTERM --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigterm_drains_streams_to_done_and_refuses_new_work_with_503(default_model):
    """Streams outliving --drain-seconds used to end as a broken chunked body (no error, no [DONE]) with a
    CancelledError traceback each, and requests during the drain got connection refused."""
    argv = ["-m", "rwkv_runtime.server", str(default_model), "--port", "0", "--model-name", "m"]
    argv += ["--drain-seconds", "2", "--max-tokens", "1000000"]
    with server_process(argv, env=_env()) as (p, url, rest, reader):
        body = {"model": "m", "prompt": "Hello", "max_tokens": 1000000, "stream": True, "temperature": 0}
        streams = [httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) for _ in range(2)]
        events: list = [[], []]
        lines = []
        for s in streams:
            r = s.__enter__()
            lines.append(r.iter_lines())
        for i, it in enumerate(lines):
            while len(events[i]) < 3:
                ln = next(it)
                if ln:
                    events[i].append(ln)
        p.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        # during the drain: new work is refused with 503 in OpenAI's shape (the socket still listens)
        r = httpx.post(url + "/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 2}, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
        assert httpx.get(url + "/health", timeout=10).status_code == 503
        for i, it in enumerate(lines):
            events[i] += [ln for ln in it if ln]  # ends (no exception: the body is complete)
        for s in streams:
            s.__exit__(None, None, None)
        for ev in events:
            assert ev[-1] == "data: [DONE]"
            err = json.loads(ev[-2][len("data: ") :])
            assert err["error"]["type"] == "service_unavailable" and "shut down" in err["error"]["message"]
        assert p.wait(30) == -signal.SIGTERM
        reader.join(10)
        log = "".join(rest)
        assert "Traceback" not in log and "CancelledError" not in log, log


def test_requests_that_finish_within_the_drain_complete_normally(default_model):
    from rwkv_runtime.server import ServerOptions, ServerThread, build_app

    app, eng = build_app(ServerOptions(str(default_model), "m"))
    srv = ServerThread(app, eng, drain_seconds=20).__enter__()
    out = {}

    def one():
        out["r"] = client(srv).completions.create(model="m", prompt="Hi", max_tokens=200, temperature=0, stream=True)
        out["chunks"] = list(out["r"])

    t = threading.Thread(target=one)
    t.start()
    while not eng.active():
        time.sleep(0.01)
    t0 = time.monotonic()
    srv.stop()
    t.join(10)
    assert time.monotonic() - t0 < 15
    assert out["chunks"][-1].choices[0].finish_reason == "length"
    assert sum(len(c.choices[0].text) > 0 for c in out["chunks"]) > 0


# -- logs -----------------------------------------------------------------------------------------
def test_json_logs_keep_the_traceback():
    from rwkv_runtime.server.app import json_log_formatter

    try:
        raise ValueError("boom in the scheduler")
    except ValueError:
        rec = logging.LogRecord(
            "rwkv_runtime.server", logging.ERROR, __file__, 1, "scheduler iteration failed", None, sys.exc_info()
        )
    out = json.loads(json_log_formatter().format(rec))
    assert out["message"] == "scheduler iteration failed" and out["level"] == "error"
    assert "Traceback" in out["exc_info"] and "ValueError: boom in the scheduler" in out["exc_info"]


# -- request validation ---------------------------------------------------------------------------
def test_wrong_types_are_400_naming_the_field(default_model, make_server):
    srv = make_server(default_model, model_name="m")
    base = {"model": "m", "prompt": "Hi", "max_tokens": 2}
    for field, value in [
        ("max_tokens", True),
        ("max_tokens", "4"),
        ("max_tokens", 2.0),
        ("stream", "yes"),
        ("stream", 1),
        ("n", "2"),
        ("temperature", "0.5"),
        ("temperature", True),
        ("seed", "1"),
        ("return_state", "true"),
        ("echo", 1),
    ]:
        r = httpx.post(srv.url + "/v1/completions", json={**base, field: value}, timeout=30)
        assert r.status_code == 400, (field, value, r.text)
        assert r.json()["error"]["param"] == field, (field, value, r.text)
    r = httpx.post(
        srv.url + "/v1/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": "3"},
        timeout=30,
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_completion_tokens"
    r = httpx.post(srv.url + "/detokenize", json={"tokens": ["1"]}, timeout=30)
    assert r.status_code == 400
    # an integer where a float is expected is still a number
    r = httpx.post(srv.url + "/v1/completions", json={**base, "temperature": 0, "top_p": 1}, timeout=30)
    assert r.status_code == 200, r.text


def test_stop_strings_are_bounded_in_total_length(default_model, make_server):
    MAX_STOP_CHARS, MAX_STOPS = 1024, 64  # the documented limits (docs/serving.md)
    srv = make_server(default_model, model_name="m")
    c = client(srv)
    for stop in ("\x01" * (MAX_STOP_CHARS + 1), ["\x01" * 600, "\x02" * 600]):
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model="m", prompt="Hi", max_tokens=2, stop=stop)
        assert e.value.body["param"] == "stop" and str(MAX_STOP_CHARS) in e.value.body["message"]
    each = MAX_STOP_CHARS // MAX_STOPS
    r = c.completions.create(model="m", prompt="Hi", max_tokens=2, stop=["\x01" * each] * MAX_STOPS)
    assert r.usage.completion_tokens == 2


def test_tokenizer_endpoints_have_their_own_metrics_labels(default_model, make_server):
    srv = make_server(default_model, model_name="m")
    assert httpx.post(srv.url + "/tokenize", json={"prompt": "Hi"}, timeout=10).status_code == 200
    assert httpx.post(srv.url + "/detokenize", json={"tokens": [72]}, timeout=10).status_code == 200
    assert httpx.post(srv.url + "/detokenize", json={"tokens": [72]}, timeout=10).status_code == 200
    assert metric(srv, "rwkv_requests_total", 'endpoint="/tokenize",status="200"') == 1
    assert metric(srv, "rwkv_requests_total", 'endpoint="/detokenize",status="200"') == 2
    assert metric(srv, "rwkv_requests_total", 'endpoint="other",status="200"') == 0


# -- conversation states --------------------------------------------------------------------------
def _state_arrays(srv) -> dict:
    r = client(srv).completions.create(
        model="m", prompt="Hi", max_tokens=2, temperature=0, extra_body={"return_state": True}
    )
    with np.load(io.BytesIO(base64.b64decode(r.choices[0].model_extra["state"]))) as z:
        return {k: z[k] for k in z.files}


def _npz(members: dict) -> str:
    """base64 of a zip of raw .npy members (bytes), as np.savez lays them out."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name + ".npy", data)
    return base64.b64encode(buf.getvalue()).decode()


def _npy(a: np.ndarray) -> bytes:
    b = io.BytesIO()
    np.save(b, a)
    return b.getvalue()


def test_damaged_state_headers_are_400(default_model, make_server):
    srv = make_server(default_model, model_name="m")
    arrays = _state_arrays(srv)
    meta = json.loads(bytes(arrays.pop("__meta__")).decode())
    c = client(srv)

    def refused(blob, *words):
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model="m", prompt="x", max_tokens=2, extra_body={"state": blob})
        assert e.value.body["param"] == "state", e.value.body
        for w in words:
            assert w in e.value.body["message"], e.value.body
        return e.value.body["message"]

    def with_meta(m, arrs=arrays):
        members = {k: _npy(v) for k, v in arrs.items()}
        members["__meta__"] = _npy(np.frombuffer(json.dumps(m).encode(), dtype=np.uint8))
        return _npz(members)

    for tokens in ("12", None, 1.5, -1, True):
        refused(with_meta({**meta, "tokens": tokens}), "tokens")
    # a header declaring 2**40 elements over a few bytes of data: refused before numpy allocates them
    name = sorted(arrays)[0]
    f = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        f, {"descr": np.lib.format.dtype_to_descr(arrays[name].dtype), "fortran_order": False, "shape": (2**40,)}
    )
    members = {k: _npy(v) for k, v in arrays.items()}
    members[name] = f.getvalue() + b"\0" * 8
    members["__meta__"] = _npy(np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    refused(_npz(members), "declares")
    # batch 2 in one tensor only: the message names that tensor, not the next one
    first, second = sorted(arrays)[:2]
    msg = refused(with_meta(meta, {**arrays, first: np.concatenate([arrays[first]] * 2)}), "batch 1")
    assert repr(first) in msg and repr(second) not in msg
    assert httpx.get(srv.url + "/health", timeout=10).status_code == 200


# -- the chat render of history --------------------------------------------------------------------
def test_history_renders_as_the_model_produced_it():
    from rwkv_runtime.server import ChatTemplate
    from rwkv_runtime.server.protocol import ChatMessage

    t = ChatTemplate()
    for reply in ("\nHi.\n\nA list:\n\n- one ", " Hello", "  two spaces", "", "Hand-written"):
        history = [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi\n\nthere "},
            {"role": "assistant", "content": reply},
            {"role": "user", "content": "And?"},
        ]
        prefix = t.render_dicts(history[:2])
        full = t.render_dicts(history)
        shown = reply if reply[:1] in ("", " ", "\n") else " " + reply
        # the model saw the prefix and produced the reply: the next turn's prompt starts with both, byte for byte
        assert full.startswith(prefix + shown)
        # with a state of that conversation, the new turn renders as the rest of the full render
        cont = t.render([ChatMessage(**history[3])], continuation=True)
        assert full == prefix + shown + cont
    assert t.render_dicts([{"role": "user", "content": "a\n\n\nb "}]) == "User: a\nb\n\nAssistant:"


def test_a_reply_starting_with_a_newline_hits_the_prefix_cache_next_turn(default_model, make_server):
    """The chat template stripped assistant history: a reply beginning with a newline never matched the
    state cached after it, so the next turn prefilled the conversation again."""
    from rwkv_runtime import Session
    from rwkv_runtime.server import ChatTemplate

    srv = make_server(default_model, model_name="m", prefill_chunk=16, cache_min_tokens=1)
    c = client(srv)
    msgs = [{"role": "user", "content": "Write a short list of words"}, {"role": "assistant", "content": "\nOne\nTwo"}]
    prompt_then_reply = ChatTemplate().render_dicts(msgs[:1]) + msgs[1]["content"]
    # leave in the cache the state after prompt + reply, as a finished turn does
    c.completions.create(model="m", prompt=prompt_then_reply, max_tokens=1, temperature=0)
    nxt = c.chat.completions.create(
        model="m", messages=msgs + [{"role": "user", "content": "More"}], max_tokens=1, temperature=0
    )
    n = len(Session(default_model).encode(prompt_then_reply))
    assert nxt.usage.prompt_tokens_details.cached_tokens == n, nxt.usage


# -- options declared once ------------------------------------------------------------------------
OLD_FLAGS = [
    "--host",
    "--port",
    "--model-name",
    "--threads",
    "--max-batch",
    "--max-queue",
    "--prefill-chunk",
    "--prefill-budget",
    "--max-prompt-tokens",
    "--max-tokens",
    "--default-max-tokens",
    "--request-timeout",
    "--cache-mb",
    "--chat-template",
    "--stop-token",
    "--drain-seconds",
    "--decode-graph",
    "--log-level",
]


def test_both_clis_are_generated_from_the_options(monkeypatch):
    from rwkv_export.targets.serve_cli import serve_command
    from rwkv_runtime.server import EngineConfig, ServerOptions
    from rwkv_runtime.server.__main__ import options_from, parser
    from rwkv_runtime.server.options import ENGINE_FLAGS, cli_options, from_cli

    monkeypatch.delenv("RWKV_API_KEY", raising=False)
    flags = [o.flag_name for o in cli_options()]
    assert set(OLD_FLAGS) | {"--api-key", "--state"} == set(flags) and len(flags) == len(set(flags))
    argp = {a for act in parser()._actions for a in act.option_strings}
    clk = {a for p in serve_command.params for a in getattr(p, "opts", ())}
    assert set(flags) <= argp and set(flags) <= clk
    assert set(ENGINE_FLAGS) <= {f.name for f in dataclasses.fields(EngineConfig)}
    # no flag given: both CLIs give exactly the dataclasses' defaults
    want = ServerOptions("m.onnx")
    assert options_from(parser().parse_args(["m.onnx"])) == want
    ctx = serve_command.make_context("serve", ["m.onnx"])
    assert from_cli("m.onnx", {k: v for k, v in ctx.params.items() if k != "model"}) == want
    # every flag reaches its field, through both
    args = [
        "--host",
        "::1",
        "--port",
        "0",
        "--model-name",
        "x",
        "--threads",
        "2",
        "--max-batch",
        "3",
        "--max-queue",
        "4",
        "--prefill-chunk",
        "5",
        "--prefill-budget",
        "6",
        "--max-prompt-tokens",
        "7",
        "--max-tokens",
        "8",
        "--default-max-tokens",
        "9",
        "--request-timeout",
        "1.5",
        "--cache-mb",
        "0.5",
        "--chat-template",
        "t.json",
        "--stop-token",
        "1",
        "--stop-token",
        "2",
        "--drain-seconds",
        "0",
        "--decode-graph",
        "step",
        "--log-level",
        "debug",
        "--api-key",
        "k",
    ]
    want = ServerOptions(
        "m.onnx",
        "x",
        2,
        None,
        EngineConfig(
            max_batch=3,
            max_queue=4,
            prefill_chunk=5,
            prefill_budget=6,
            max_prompt_tokens=7,
            max_tokens=8,
            request_timeout=1.5,
            cache_bytes=2**19,
        ),
        "t.json",
        9,
        (1, 2),
        0.0,
        decode_graph="step",
        api_key="k",
        host="::1",
        port=0,
        log_level="debug",
    )
    assert options_from(parser().parse_args(["m.onnx", *args])) == want
    ctx = serve_command.make_context("serve", ["m.onnx", *args])
    assert from_cli("m.onnx", {k: v for k, v in ctx.params.items() if k != "model"}) == want


@pytest.mark.parametrize(
    "args, words",
    [
        (["--max-batch", "0"], "--max-batch must be >= 1"),
        (["--request-timeout", "0"], "--request-timeout must be > 0"),
        (["--cache-mb", "-1"], "--cache-mb must be >= 0"),
        (["--port", "70000"], "--port must be <= 65535"),
    ],
)
def test_the_module_cli_checks_bounds_as_one_error_line(default_model, args, words):
    res = subprocess.run(
        [sys.executable, "-m", "rwkv_runtime.server", str(default_model), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert res.returncode == 1 and res.stderr.strip().splitlines() == [f"Error: {words}"], res.stderr
