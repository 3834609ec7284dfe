"""A REAL tritonserver (the nvidia-pytriton wheel's 2.51 binary, CPU) serving `rwkv-export triton` repositories.

- python backend: 4 concurrent conversations through tritonclient's sequence API (HTTP and gRPC) each
  generate exactly what Session.generate produces alone (greedy), and Triton batched their steps;
- onnxruntime-backend configs (no onnxruntime backend in the wheel): the same config with the backend
  swapped for a stub python model is loaded by Triton, which reads our initial_state data files and hands
  them to the stub on a sequence start; the stub echoes what it got; broken ones are rejected.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import rwkv_runtime
from rwkv_export.targets.triton import write_repository

from ..conftest import REPO

pytestmark = pytest.mark.slow
pytest.importorskip("tritonclient.grpc", reason="tritonclient not installed (pip install 'rwkv-export[triton]')")

ENV = Path(os.environ.get("RWKV_TRITON_PYTHON_ENV") or REPO / "build" / "triton-env")
if not (ENV / "bin" / "python3").exists():
    pytest.skip(
        f"no local Triton env at {ENV} (tritonserver + stub env): run deploy_examples/triton/make_stub_env.sh",
        allow_module_level=True,
    )

from local_server import LocalTriton  # noqa: E402  (loaded by path in conftest)
from triton_client import TritonRWKV  # noqa: E402

PROMPTS = ["The ", "Hello world, this is", "In the beginning", "Once upon a time there was a"]
NEW = 24


def test_python_backend_concurrent_sequences_match_session(triton_exports, tmp_path):
    g = triton_exports["rwkv4"]
    write_repository(g, tmp_path / "repo", "python", max_batch=4, name="tiny4")
    write_repository(g, tmp_path / "repo", "python", max_batch=4, name="idle1", idle_s=1.0)  # Triton's default
    write_repository(triton_exports["tuned6"], tmp_path / "repo", "python", max_batch=4, name="tuned6")
    tuned = rwkv_runtime.Session(triton_exports["tuned6"])
    prompt = np.array([tuned.encode(PROMPTS[2])])
    want_tuned = tuned.prefill(prompt)[0][0]
    zeros = tuned.state_from_numpy({k: np.zeros_like(v) for k, v in tuned.new_state(1).numpy().items()})
    untuned = tuned.prefill(prompt, zeros)[0][0]
    assert np.abs(want_tuned - untuned).max() > 1e-2  # the learned state matters for this prompt
    s = rwkv_runtime.Session(g)
    greedy = rwkv_runtime.SamplingParams(temperature=0)
    want = [list(s.generate_tokens(s.encode(p), NEW, greedy)) for p in PROMPTS]
    want_text = "".join(s.generate(PROMPTS[1], NEW, temperature=0))
    got, errors = [None] * 4, []
    with LocalTriton(tmp_path / "repo", python_env=ENV, max_lifetime=300) as t:
        start = threading.Barrier(4)

        def run(i):
            try:  # tritonclient's HTTP client (gevent) must be made in the thread that uses it
                m = TritonRWKV(t.http_url if i % 2 else t.grpc_url, "tiny4", "http" if i % 2 else "grpc")
                start.wait(30)
                got[i] = list(m.generate_tokens(m.tokenizer.encode(PROMPTS[i]), 1000 + i, NEW, greedy))
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(f"{i}: {e}")

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        assert not errors and got == want
        # the text streamed by the client is the session's text
        m = TritonRWKV(t.http_url, "tiny4")
        assert "".join(m.generate(PROMPTS[1], 77, NEW, greedy)) == want_text
        # Triton handed model.py requests of different sequences together
        stats = m.client.get_inference_statistics("tiny4")["model_stats"][0]
        assert int(stats["execution_count"]) < int(stats["inference_count"])
        # END closed the sequence: continuing it is refused (by Triton's batcher), not a silent fresh start
        with pytest.raises(Exception, match="must specify the START flag"):
            m.feed([65], 1000, start=False)
        # a state-tuned export starts every sequence from its learned state
        mt = TritonRWKV(t.grpc_url, "tuned6", "grpc")
        np.testing.assert_allclose(mt.feed(prompt[0], 9, start=True, end=True), want_tuned, atol=1e-5)
        # a bad request is refused alone, with the runtime's message
        with pytest.raises(Exception, match=r"token id 999 is outside \[0, 256\)"):
            m.feed([65, 999], 5, start=True, end=True)
        # with Triton's default idle time (1 s) a conversation whose user pauses for 2 s is gone
        short = TritonRWKV(t.http_url, "idle1")
        short.feed(short.tokenizer.encode("Hello"), 7, start=True)
        short.feed([65], 7, start=False)  # within the idle time: fine
        time.sleep(2.5)
        with pytest.raises(Exception, match="must specify the START flag"):
            short.feed([66], 7, start=False)


STUB = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Echo what Triton gives a sequence's first request: (sum, min, max) of each state input, by name."""

    def execute(self, requests):
        out = []
        for r in requests:
            names = sorted(t.name() for t in r.inputs() if t.name().startswith("state."))
            v = np.zeros((1, VOCAB), np.float32)
            for i, n in enumerate(names):
                a = pb_utils.get_input_tensor_by_name(r, n).as_numpy().astype(np.float64)
                v[0, 3 * i:3 * i + 3] = (a.sum(), a.min(), a.max())
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("logits", v)]))
        return out
'''


def as_stub(model_dir: Path, vocab: int) -> None:
    """The onnxruntime config with its backend swapped for the echo stub (everything else unchanged)."""
    (model_dir / "1" / "model.onnx").unlink()
    text = (model_dir / "config.pbtxt").read_text()
    assert text.count('backend: "onnxruntime"') == 1
    (model_dir / "config.pbtxt").write_text(text.replace('backend: "onnxruntime"', 'backend: "python"'))
    (model_dir / "1" / "model.py").write_text(STUB.replace("VOCAB", str(vocab)))


def test_onnxruntime_state_blocks_load_in_triton(triton_exports, tmp_path):
    import tritonclient.http as h

    repo = tmp_path / "repo"
    for key in ("rwkv4", "rwkv7", "tuned6"):
        d = write_repository(triton_exports[key], repo, "onnxruntime", max_batch=2, name=key)
        as_stub(d, rwkv_runtime.Session(triton_exports[key]).vocab_size)
    with LocalTriton(repo, python_env=ENV, max_lifetime=300) as t:
        c = h.InferenceServerClient(t.http_url)
        for i, key in enumerate(("rwkv4", "rwkv7", "tuned6")):
            assert c.is_model_ready(key)
            x = h.InferInput("tokens", [1, 1], "INT64")
            x.set_data_from_numpy(np.array([[1]], np.int64))
            echo = c.infer(key, [x], sequence_id=50 + i, sequence_start=True, sequence_end=True).as_numpy("logits")[0]
            start = rwkv_runtime.Session(triton_exports[key]).new_state(1).numpy()  # the runtime's own start
            want = np.concatenate([[v.astype(np.float64).sum(), v.min(), v.max()] for _, v in sorted(start.items())])
            np.testing.assert_allclose(echo[: want.size], want, rtol=1e-5, atol=1e-6)
            assert np.abs(want).max() > 0 or key == "rwkv7"  # rwkv4's -1e30, tuned6's learned state


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing", "failed to open text file for read"),
        ("short", "initial_state setting expects"),
        ("dtype", "does not match the state data type"),
        ("dims", "'initial_state' dim for input name 'state.0.wkv_pp' doesn't match"),
    ],
)
def test_broken_state_config_is_rejected_by_triton(triton_exports, tmp_path, damage, message):
    d = write_repository(triton_exports["rwkv4"], tmp_path / "repo", "onnxruntime", max_batch=2, name="bad")
    as_stub(d, 256)
    f = d / "initial_state" / "state.0.wkv_pp"
    if damage == "missing":
        f.unlink()
    elif damage == "short":
        f.write_bytes(f.read_bytes()[:-4])
    else:  # the initial_state of state.0.wkv_pp disagrees with its state entry: FP16 for FP32, [32] for [64]
        old, new = {"dtype": ("data_type: TYPE_FP32", "data_type: TYPE_FP16"), "dims": ("dims: 64", "dims: 32")}[damage]
        text = (d / "config.pbtxt").read_text()
        j = text.rindex(old, 0, text.index('data_file: "state.0.wkv_pp"'))
        (d / "config.pbtxt").write_text(text[:j] + new + text[j + len(old) :])
    with pytest.raises(RuntimeError, match=message):
        with LocalTriton(tmp_path / "repo", python_env=ENV, max_lifetime=120):
            pass


class _HashProxy:
    """A minimal HTTP load balancer (127.0.0.1): routes by a hash of the x-sequence-id header, as
    docs/triton.md's scale-out section describes; requests without it go to the first server."""

    def __init__(self, backends: list):
        import http.client
        import zlib
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.hits = {b: set() for b in backends}
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # tritonclient keeps connections alive

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                sid = self.headers.get("x-sequence-id")
                backend = backends[zlib.crc32(sid.encode()) % len(backends)] if sid else backends[0]
                if sid:
                    proxy.hits[backend].add(sid)
                conn = http.client.HTTPConnection(backend, timeout=60)
                keep = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                conn.request(self.command, self.path, body, keep)
                r = conn.getresponse()
                data = r.read()
                self.send_response(r.status)
                for k, v in r.getheaders():
                    if k.lower() not in ("content-length", "connection", "transfer-encoding"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_POST = _forward

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_scale_out_behind_a_hashing_balancer(triton_exports, tmp_path):
    """Two servers, one balancer hashing the correlation id: every conversation is served whole by one server."""
    g = triton_exports["rwkv4"]
    write_repository(g, tmp_path / "repo", "python", max_batch=4, name="tiny4")
    s = rwkv_runtime.Session(g)
    greedy = rwkv_runtime.SamplingParams(temperature=0)
    ids = [11, 12, 13, 14, 15, 16]
    want = [list(s.generate_tokens(s.encode(PROMPTS[i % 4]), 8, greedy)) for i in range(len(ids))]
    with (
        LocalTriton(tmp_path / "repo", python_env=ENV, max_lifetime=300) as a,
        LocalTriton(tmp_path / "repo", python_env=ENV, max_lifetime=300) as b,
    ):
        lb = _HashProxy([a.http_url, b.http_url])
        try:
            m = TritonRWKV(lb.url, "tiny4")
            got = [
                list(m.generate_tokens(m.tokenizer.encode(PROMPTS[i % 4]), sid, 8, greedy)) for i, sid in enumerate(ids)
            ]
        finally:
            lb.close()
    assert got == want
    assert all(lb.hits.values())  # both servers served conversations (and each one whole: else START errors)
