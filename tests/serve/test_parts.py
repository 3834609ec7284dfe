"""The server's parts on their own: the prefix-state cache, portable conversation states, the chat
template, the entry points (CLI, ``python -m``), and that serving imports no torch."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import zipfile

import pytest

from .conftest import need_serve_deps

need_serve_deps()

import numpy as np  # noqa: E402 - after the skip check

from rwkv_runtime import RuntimeUserError, Session  # noqa: E402 - after the skip check
from rwkv_runtime.server import ChatTemplate, statefile  # noqa: E402 - after the skip check
from rwkv_runtime.server.cache import PrefixCache  # noqa: E402 - after the skip check

from .conftest import REPO, server_process  # noqa: E402 - after the skip check


def _arrays(v: float, n: int = 100) -> dict:
    return {"a": np.full((1, n), v, np.float32)}


def test_cache_longest_prefix_and_lru_by_bytes():
    per = 100 * 4 + 8 * 4  # state + logits bytes
    c = PrefixCache(max_bytes=3 * per, min_tokens=2)
    c.put("", [1, 2], _arrays(1), np.zeros(8, np.float32))
    c.put("", [1, 2, 3, 4], _arrays(2), np.zeros(8, np.float32))
    c.put("", [9], _arrays(3), np.zeros(8, np.float32))  # shorter than min_tokens: not kept
    assert len(c) == 2 and c.bytes == 2 * per
    e = c.lookup("", [1, 2, 3, 4, 5])
    assert e.length == 4 and e.arrays["a"][0, 0] == 2
    assert c.lookup("", [1, 2, 3]).length == 2
    assert c.lookup("", [5, 1, 2]) is None
    assert c.lookup("other-base", [1, 2, 3, 4]) is None  # a prefix after another starting state
    assert (c.hits, c.misses) == (2, 2)
    c.lookup("", [1, 2])  # [1, 2] is now the most recently used ...
    c.put("", [7, 7], _arrays(4), np.zeros(8, np.float32))
    c.put("", [8, 8], _arrays(5), np.zeros(8, np.float32))  # ... so [1, 2, 3, 4] is evicted first
    assert c.bytes == 3 * per and len(c) == 3
    assert c.lookup("", [1, 2, 3, 4]).length == 2
    assert c.peek_length("", [8, 8, 1]) == 2 and c.peek_length("", [3]) == 0
    # the cache owns its arrays: the caller's later writes do not reach it
    a = _arrays(6)
    c.put("", [6, 6], a, np.zeros(8, np.float32))
    a["a"][:] = -1
    assert c.lookup("", [6, 6]).arrays["a"][0, 0] == 6
    assert PrefixCache(0).put("", [1, 2], _arrays(1), np.zeros(8)) is None and len(PrefixCache(0)) == 0


def test_state_blob_round_trip_and_refusals():
    arrays = {"s.0": np.arange(12, dtype=np.float32).reshape(1, 12)}
    blob = statefile.encode(arrays, "export-A", 42)
    got, meta = statefile.decode(blob, "export-A", 1 << 20)
    assert np.array_equal(got["s.0"], arrays["s.0"]) and meta["tokens"] == 42 and meta["version"] == 1
    with pytest.raises(RuntimeUserError, match="another model export"):
        statefile.decode(blob, "export-B", 1 << 20)
    with pytest.raises(RuntimeUserError, match="larger than"):
        statefile.decode(blob, "export-A", 64)
    for bad in ("", "not base64!", base64.b64encode(b"plain bytes").decode()):
        with pytest.raises(RuntimeUserError):
            statefile.decode(bad, "export-A", 1 << 20)
    # an npz without our header, and one whose header is from a future version
    buf = io.BytesIO()
    np.savez(buf, x=np.zeros(3))
    with pytest.raises(RuntimeUserError, match="no rwkv state header"):
        statefile.decode(base64.b64encode(buf.getvalue()).decode(), "export-A", 1 << 20)
    meta = json.dumps({"format": statefile.FORMAT, "version": 99, "export_id": "export-A"}).encode()
    buf = io.BytesIO()
    np.savez(buf, __meta__=np.frombuffer(meta, np.uint8))
    with pytest.raises(RuntimeUserError, match="version 99"):
        statefile.decode(base64.b64encode(buf.getvalue()).decode(), "export-A", 1 << 20)
    # a small zip that inflates hugely is refused before it is inflated
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("big.npy", b"\0" * (50 << 20))
    with pytest.raises(RuntimeUserError, match="larger than"):
        statefile.decode(base64.b64encode(buf.getvalue()).decode(), "export-A", 1 << 20)


def test_state_binding_uses_the_export_id(default_model, v7_model):
    a, b = Session(default_model).manifest, Session(v7_model).manifest
    assert statefile.model_binding(a) != statefile.model_binding(b)
    if a.export_id:
        assert statefile.model_binding(a) == a.export_id


def test_chat_template():
    t = ChatTemplate()
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": [{"type": "text", "text": "a\n\n\nb "}]}]
    assert t.render_dicts(msgs) == "System: S\n\nUser: a\nb\n\nAssistant:"
    t = ChatTemplate.from_json('{"user": "Q", "assistant": "A", "separator": "\\n", "stop": ["\\nQ:"]}')
    assert t.render_dicts([{"role": "user", "content": "hi"}]) == "Q: hi\nA:" and t.stop == ("\nQ:",)
    for bad in ("[]", "{not json", '{"user": 3}', '{"colour": "red"}'):
        with pytest.raises(RuntimeUserError):
            ChatTemplate.from_json(bad)


def _run(*args, env_extra=None):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, cwd=REPO)


def test_serving_needs_no_torch(default_model):
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now fails
        "from rwkv_runtime.server import ServerOptions, build_app\n"
        f"app, engine = build_app(ServerOptions({str(default_model)!r}))\n"
        "print(sorted(r.path for r in app.routes if r.path.startswith('/v1'))[:2])"
    )
    r = _run("-c", code)
    assert r.returncode == 0, r.stderr
    assert "/v1/chat/completions" in r.stdout


def test_entry_points_give_one_line_errors(tmp_path):
    r = _run("-m", "rwkv_runtime.server", str(tmp_path / "missing.onnx"))
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [f"Error: {tmp_path / 'missing.onnx'}: no such file"]
    r = _run("-c", "from rwkv_export.cli import main; main()", "serve", str(tmp_path / "missing.onnx"))
    assert r.returncode == 1 and r.stderr.strip() == f"Error: {tmp_path / 'missing.onnx'}: no such file"
    r = _run("-m", "rwkv_runtime.server", "x.onnx", "--max-batch", "0")
    assert r.returncode == 1 and r.stderr.strip() == "Error: --max-batch must be >= 1"


def test_sigterm_drains_in_flight_streams_then_exits(default_model):
    """The real process: SIGTERM while a stream runs -> the stream ends normally, the process exits 0,
    and the request's structured log line is written."""
    import signal

    import httpx

    argv = ["-m", "rwkv_runtime.server", str(default_model), "--port", "0", "--model-name", "m"]
    with server_process([*argv, "--drain-seconds", "20"], cwd=REPO) as (p, url, rest, reader):
        body = {"model": "m", "prompt": "Hi", "max_tokens": 400, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            it = r.iter_lines()
            next(it)
            p.send_signal(signal.SIGTERM)
            events = [ln for ln in it if ln.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert p.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after its clean shutdown
        reader.join(10)
        logs = [json.loads(ln) for ln in rest if ln.startswith("{")]
        assert any(e.get("event") == "request_done" and e.get("completion_tokens") == 400 for e in logs), rest


def test_stop_strings_match_a_plain_search_however_the_text_is_split():
    """The generation core's hold-back of text that may begin a stop string (``StopMatcher``, which the
    engine's rows use), against str.find on the text generated so far after each piece (generation stops at
    the piece that completes a stop string), for generated texts, splits into pieces (tokens) and stop lists."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    from rwkv_runtime.generation import StopMatcher

    @hypothesis.settings(max_examples=600, deadline=None)
    @hypothesis.given(
        st.lists(st.text("ab\n", max_size=4), max_size=12),
        st.lists(st.text("ab\n", min_size=1, max_size=6), min_size=1, max_size=3),
    )
    def check(pieces, stops):
        matcher = StopMatcher(stops)
        out, stopped = "", False
        for p in pieces:
            text, stopped = matcher.push(p)
            out += text
            if stopped:
                break
        if not stopped:
            out += matcher.release()  # released at the end
        # the truth: generation stops after the first piece whose arrival completes a stop string; the
        # text ends where the earliest-starting stop string in the text so far begins
        full, expect, hit = "", None, False
        for p in pieces:
            full += p
            found = [i for i in (full.find(s) for s in stops) if i >= 0]
            if found:
                expect, hit = full[: min(found)], True
                break
        assert stopped == hit
        assert out == (expect if hit else full)

    check()
