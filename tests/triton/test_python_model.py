"""Audit of the Triton paths: the Python-backend model.py on bad requests (run in-process with a stand-in
for Triton's ``triton_python_backend_utils``; the real server's view is in test_server.py), and
repositories for export kinds Triton would refuse to load (bf16 on CPU, a --max-batch above an engine's)."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("tritonclient.grpc", reason="tritonclient not installed (pip install 'rwkv-export[triton]')")
from google.protobuf import json_format, text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2  # noqa: E402

import rwkv_runtime  # noqa: E402
from rwkv_export.cli import main  # noqa: E402
from rwkv_export.errors import ExportError  # noqa: E402
from rwkv_export.targets.triton import write_repository  # noqa: E402

from .test_repository import stand_in_engine  # noqa: E402

INVALID_ARG, INTERNAL = 3, 1


class _Tensor:
    def __init__(self, name, array):
        self._name, self._a = name, np.asarray(array)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._a


class _Error:
    INTERNAL, INVALID_ARG = INTERNAL, INVALID_ARG

    def __init__(self, message, code=INTERNAL):
        self._m, self.code = message, code

    def message(self):
        return self._m


class _Response:
    def __init__(self, output_tensors=None, error=None):
        self.output_tensors, self.error = output_tensors, error


@pytest.fixture
def pb_utils(monkeypatch):
    """The few names of triton_python_backend_utils that model.py uses."""
    m = types.ModuleType("triton_python_backend_utils")
    m.Tensor, m.TritonError, m.InferenceResponse = _Tensor, _Error, _Response
    m.get_input_tensor_by_name = lambda request, name: request.get(name)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", m)
    return m


def load_model(model_dir):
    """model.py of a python-backend repository, initialized as Triton does (config as JSON)."""
    cfg = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    spec = importlib.util.spec_from_file_location(f"model_{model_dir.name}", model_dir / "1" / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = mod.TritonPythonModel()
    model.initialize(
        {
            "model_config": json_format.MessageToJson(cfg, preserving_proto_field_name=True),
            "model_repository": str(model_dir),
            "model_version": "1",
        }
    )
    return model


def req(tokens, corrid, start=False, end=False):
    """A request as Triton's sequence batcher hands it over: tokens [1, T] + the control inputs."""
    t = {
        "tokens": np.asarray(tokens, np.int64).reshape(1, -1),
        "START": np.array([[int(start)]], np.int32),
        "END": np.array([[int(end)]], np.int32),
        "CORRID": np.array([[corrid]], np.uint64),
    }
    return {k: _Tensor(k, v) for k, v in t.items()}


def logits(resp):
    assert resp.error is None, resp.error.message()
    return resp.output_tensors[0].as_numpy()


@pytest.fixture
def py_model(triton_exports, tmp_path, pb_utils):
    return load_model(write_repository(triton_exports["rwkv4"], tmp_path / "repo", "python", max_batch=4, name="py"))


def test_bad_requests_fail_alone_as_invalid_argument(py_model, triton_exports):
    s = rwkv_runtime.Session(triton_exports["rwkv4"])
    good = [req([65, 66], 1, start=True), req([67], 2, start=True)]
    bad = [
        req(np.zeros(0), 3, start=True),
        req([65, 256], 4, start=True),
        req([-1], 5, start=True),
        req([65], 6),
    ]  # empty, out of vocabulary, negative, never started
    out = py_model.execute(good[:1] + bad[:2] + good[1:] + bad[2:])
    np.testing.assert_allclose(logits(out[0])[0], s.prefill(np.array([[65, 66]]))[0][0], atol=1e-5)
    np.testing.assert_allclose(logits(out[3])[0], s.step(np.array([67]))[0][0], atol=1e-5)
    errors = [out[1].error, out[2].error, out[4].error, out[5].error]
    assert [e.code for e in errors] == [INVALID_ARG] * 4  # a client's mistake: HTTP 400, not 500
    assert [e.message() for e in errors] == [
        "tokens is empty",
        "token id 256 is outside [0, 256)",
        "token id -1 is outside [0, 256)",
        "sequence 6 has no state here: start it with sequence_start (or it was idle longer than "
        "max_sequence_idle_microseconds)",
    ]
    assert py_model.execute([]) == []


def test_failed_restart_does_not_continue_the_old_conversation(py_model):
    """START on an open id that fails (here: an out-of-vocabulary token) began a new sequence for Triton:
    the next request must not silently continue the previous conversation's state."""
    logits(py_model.execute([req([65, 66, 67], 7, start=True)])[0])
    assert py_model.execute([req([300], 7, start=True)])[0].error.code == INVALID_ARG
    (r,) = py_model.execute([req([68], 7)])
    assert r.error is not None and "has no state here" in r.error.message()
    # the same for a one-token START (the batched-step path), next to another sequence's good request
    logits(py_model.execute([req([65, 66], 8, start=True)])[0])
    assert py_model.execute([req([999], 8, start=True), req([65], 9, start=True)])[0].error is not None
    assert "has no state here" in py_model.execute([req([68], 8)])[0].error.message()


def test_a_sequence_with_a_request_waiting_is_not_reaped(py_model, triton_exports):
    """Triton calls a sequence idle only when no request of it is queued: a request that waited longer than
    the idle time (behind a long prefill) must still find its state; sequences without one are dropped."""
    s = rwkv_runtime.Session(triton_exports["rwkv4"])
    logits(py_model.execute([req([65, 66], 10, start=True), req([70, 71], 11, start=True)])[0])
    for k in (10, 11):
        py_model.states[k][1] -= py_model.idle_s + 1  # both idle for longer than the idle time
    (r,) = py_model.execute([req([67], 10)])
    np.testing.assert_allclose(logits(r)[0], s.prefill(np.array([[65, 66, 67]]))[0][0], atol=1e-5)
    assert 11 not in py_model.states and 10 in py_model.states


def test_an_unexpected_exception_is_one_line_for_that_request_only(py_model, monkeypatch):
    def boom(*a, **k):
        raise MemoryError("cannot allocate\nsecond line")

    monkeypatch.setattr(py_model.session, "prefill", boom)
    out = py_model.execute([req([65, 66], 12, start=True), req([65], 13, start=True)])
    assert out[0].error.code == INTERNAL and out[0].error.message() == "internal error (MemoryError: cannot allocate)"
    logits(out[1])  # the one-token step of another sequence in the same batch is answered


# -- repositories --------------------------------------------------------------------------------------------
def parse(model_dir):
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def bf16_export(rwkv4_ref, tmp_path_factory):
    from rwkv_export.export import ExportOptions, export

    return export(rwkv4_ref, tmp_path_factory.mktemp("bf16") / "b.onnx", ExportOptions(precision="bf16"))[0]


def test_bf16_export_gets_a_gpu_instance_or_a_clear_refusal(bf16_export, tmp_path):
    """onnxruntime's CPU provider has no bfloat16 MatMul: a KIND_CPU instance could never load the model."""
    d = write_repository(bf16_export, tmp_path / "repo", "onnxruntime", name="b")
    assert parse(d).instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    r = run_cli("triton", bf16_export, "-o", tmp_path / "repo", "--backend", "python", "--name", "bpy")
    assert r.exit_code == 1 and r.output.count("\n") == 1
    assert r.output.startswith("Error: b.onnx is a bfloat16 export: the Python backend runs rwkv_runtime on")
    assert not (tmp_path / "repo" / "bpy").exists()


def test_fp32_stays_on_cpu(triton_exports, tmp_path):
    d = write_repository(triton_exports["rwkv4"], tmp_path / "repo", "onnxruntime")
    assert parse(d).instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU


def engine_with_profile(graph, where, max_batch):
    """A stand-in engine whose sidecar records the optimization profile build-engine used."""
    eng = stand_in_engine(graph, where)
    side = json.loads((where / (eng.name + ".json")).read_text())
    man = rwkv_runtime.Session(graph).manifest
    side["profile"] = {man.tokens_input: [[1], [1], [max_batch]]}
    (where / (eng.name + ".json")).write_text(json.dumps(side))
    return eng


def test_max_batch_never_exceeds_the_engines(triton_exports, tmp_path):
    """Triton's TensorRT backend refuses max_batch_size above the engine's profile ("configuration
    specified max-batch 8 but TensorRT engine only supports max-batch 4")."""
    eng = engine_with_profile(triton_exports["rwkv4"], tmp_path, 4)
    r = run_cli("triton", eng, "-o", tmp_path / "repo", "--backend", "tensorrt")  # default: at most the engine's
    assert r.exit_code == 0, r.output
    cfg = parse(tmp_path / "repo" / "tiny4")
    assert cfg.max_batch_size == 4 and list(cfg.sequence_batching.oldest.preferred_batch_size) == [4]
    r = run_cli("triton", eng, "-o", tmp_path / "repo", "--backend", "tensorrt", "--max-batch", 16, "--name", "x")
    assert r.exit_code == 1 and r.output == (
        "Error: --max-batch 16 is larger than the engine's maximum batch 4 (rwkv-export build-engine --max-batch): "
        "pass --max-batch 4 or less, or rebuild the engine\n"
    )
    big = engine_with_profile(triton_exports["rwkv4"], tmp_path / "repo", 32)
    assert parse(write_repository(big, tmp_path / "r2", "tensorrt")).max_batch_size == 8  # the usual default


def test_max_sequences_bounds(triton_exports, tmp_path):
    """max_candidate_sequences is an int32 in Triton's schema: above it was an 'internal error'."""
    g = triton_exports["rwkv7"]
    r = run_cli("triton", g, "-o", tmp_path, "--max-sequences", 2**31)
    assert r.exit_code == 2 and "--max-sequences" in r.output and "Traceback" not in r.output
    assert run_cli("triton", g, "-o", tmp_path, "--max-sequences", 2**31 - 1, "--name", "m").exit_code == 0
    assert parse(tmp_path / "m").sequence_batching.oldest.max_candidate_sequences == 2**31 - 1
    with pytest.raises(ExportError, match=r"--max-sequences must be in \[1, 2147483647\]"):
        write_repository(g, tmp_path, max_sequences=2**40, name="n")


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"idle_s": 1e-7}, "the idle timeout must be in"),  # 0 microseconds: Triton would use its 1 s default
        ({"name": "a\nb"}, "not a usable model name"),
    ],
)
def test_api_extremes_are_refused(triton_exports, tmp_path, kw, message):
    with pytest.raises(ExportError, match=message):
        write_repository(triton_exports["rwkv7"], tmp_path / "repo", **kw)
    assert not (tmp_path / "repo").exists()


# -- a real tritonserver (slow; needs the local env, as test_server.py) ---------------------------------------
def _env():
    import os

    from ..conftest import REPO

    env = Path(os.environ.get("RWKV_TRITON_PYTHON_ENV") or REPO / "build" / "triton-env")
    if not (env / "bin" / "python3").exists():
        pytest.skip(f"no local Triton env at {env}: run deploy_examples/triton/make_stub_env.sh")
    return env


@pytest.mark.slow
def test_real_server_statuses_and_client_cleanup(triton_exports, tmp_path):
    """On tritonserver 2.51: model.py's refusals are HTTP 400 with the runtime's line; a failed restart is not
    continued; a client generator closed early ends its sequence, so with one sequence slot the next
    conversation starts at once instead of waiting out the idle timeout in Triton's backlog."""
    import tritonclient.http as h
    from local_server import LocalTriton  # noqa: E402  (loaded by path in conftest)
    from triton_client import TritonRWKV

    env = _env()
    write_repository(triton_exports["rwkv4"], tmp_path / "repo", "python", max_batch=1, max_sequences=1, name="one")
    greedy = rwkv_runtime.SamplingParams(temperature=0)
    with LocalTriton(tmp_path / "repo", python_env=env, max_lifetime=240) as t:
        m = TritonRWKV(t.http_url, "one")
        m.client = h.InferenceServerClient(t.http_url, network_timeout=30)  # bounded waits
        with pytest.raises(h.InferenceServerException) as e:
            m.feed([65, 999], 1, start=True, end=True)
        assert e.value.status() == "400" and "token id 999 is outside [0, 256)" in str(e.value)
        m.feed([65, 66], 2, start=True)
        with pytest.raises(h.InferenceServerException):
            m.feed([300], 2, start=True)  # a restart that fails ...
        with pytest.raises(h.InferenceServerException, match="has no state here"):
            m.feed([67], 2, start=False)  # ... is not continued from the old state
        m.feed([67], 2, start=True, end=True)  # frees the only slot
        gen = m.generate_tokens(m.tokenizer.encode("Hello"), 3, 20, greedy)
        next(gen)
        gen.close()  # the caller stops early: the client ends sequence 3
        t0 = time.monotonic()
        assert list(m.generate_tokens(m.tokenizer.encode("Hi"), 4, 3, greedy))  # not stuck behind sequence 3
        assert time.monotonic() - t0 < 20
