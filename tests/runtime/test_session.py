"""Session: providers, per-call statistics, prompts that are not valid UTF-8, the decode graph choice,
the bound-once step loop, the Backend protocol, and no exporter import in the runtime."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest

from rwkv_runtime import Backend, RuntimeUserError, SamplingParams, Session

from ..helpers import step_all


def test_missing_execution_provider_lists_the_available_ones(rwkv4_exports):
    import onnxruntime as ort

    available = ort.get_available_providers()
    missing = "CUDAExecutionProvider" if "CUDAExecutionProvider" not in available else "NoSuchExecutionProvider"
    with pytest.raises(RuntimeUserError, match=f"no {missing}") as e:
        Session(rwkv4_exports["plain"], providers=[missing])
    assert all(p in str(e.value) for p in available)


def test_each_generate_call_has_its_own_stats(tiny_session):
    s = tiny_session
    a = s.generate([1, 2, 3], 5, temperature=0)
    b = s.generate([4, 5, 6, 7], 3, temperature=0)
    assert not hasattr(s, "stats")  # no session-wide statistics: each call has its own
    # interleave the two streams
    for _ in range(3):
        next(a, None)
        next(b, None)
    list(a), list(b)
    assert (a.stats["prompt_tokens"], a.stats["new_tokens"]) == (3, 5)
    assert (b.stats["prompt_tokens"], b.stats["new_tokens"]) == (4, 3)


def test_concurrent_generate_in_threads_keeps_stats_apart(tiny_session):
    s = tiny_session
    out = {}

    def run(name, n):
        g = s.generate([1, 2], n, temperature=0)
        text = "".join(g)
        out[name] = (g.stats["new_tokens"], text)

    threads = [threading.Thread(target=run, args=(f"t{n}", n)) for n in (4, 9, 13)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {k: v[0] for k, v in out.items()} == {"t4": 4, "t9": 9, "t13": 13}
    # greedy: every thread's text is a prefix of the longest one (no state mixed between threads)
    longest = out["t13"][1]
    assert all(longest.startswith(v[1]) for v in out.values())


def test_byte_tokenizer_round_trips_bytes_from_argv(tiny_session):
    raw = b"caf\xe9 \xff ok"  # not UTF-8: as Python decodes argv (surrogateescape)
    text = raw.decode("utf-8", errors="surrogateescape")
    assert tiny_session.encode(text) == list(raw)


def test_lone_surrogate_from_the_api_is_a_clear_error(tiny_session):
    with pytest.raises(RuntimeUserError, match="surrogate"):
        tiny_session.encode("a\ud800b")
    with pytest.raises(RuntimeUserError, match="surrogate"):
        list(tiny_session.generate("a\ud800b", 2))


def test_world_and_hf_tokenizers_refuse_lone_surrogates():
    from rwkv_runtime.tokenizers import _refuse_surrogates

    with pytest.raises(RuntimeUserError, match="surrogate"):
        _refuse_surrogates("x\udc80")
    assert _refuse_surrogates("héllo") == "héllo"


def test_decode_graph_step_and_default_agree(rwkv4_exports, tiny_session):
    """The default decodes through the sequence graph (weights once); the step graph gives the same logits."""
    assert tiny_session.backend.decode_kind == "sequence"
    step_graph = Session(rwkv4_exports["plain"], decode_graph="step")
    assert step_graph.backend.decode_kind == "step"
    toks = [5, 17, 99, 3, 42, 7]
    a, _ = step_all(tiny_session, toks)
    b, _ = step_all(step_graph, toks)
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)
    assert list(tiny_session.backend._sessions) == ["sequence"]  # one onnxruntime session, not two
    with pytest.raises(RuntimeUserError, match="decode_graph"):
        Session(rwkv4_exports["plain"], decode_graph="fast")


def test_step_loop_binds_its_buffers_once(rwkv4_exports, monkeypatch):
    """The usual loop ping-pongs between two pre-bound buffer sets: no rebinding after the first steps."""
    import onnxruntime as ort

    calls = []
    real = ort.IOBinding.bind_ortvalue_input
    monkeypatch.setattr(ort.IOBinding, "bind_ortvalue_input", lambda self, *a: (calls.append(a[0]), real(self, *a))[1])
    s = Session(rwkv4_exports["plain"])
    n_state = len(s.manifest.state)
    st = s.new_state()
    for t in range(20):
        _, st = s.step([t], st)
    # first step binds the fresh state into set A; second binds A into B; third binds B into A; then none
    assert len(calls) <= 3 * n_state + 2


def test_backend_protocol_and_no_exporter_import(rwkv4_exports, tiny_session):
    assert isinstance(tiny_session.backend, Backend)
    code = (
        "import sys, rwkv_runtime; from rwkv_runtime import ort_backend, artifact, session, state, batch, bench;"
        "assert not [m for m in sys.modules if m.startswith(('rwkv_export', 'torch', 'onnx.'))], sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.step([[1, 2], [3]]),
        lambda s: s.prefill([[1, 2], [3]]),
        lambda s: s.prefill([[1]], chunk_size=0),
        lambda s: s.prefill([[1]], chunk_size=1.5),
        lambda s: s.new_state(0),
        lambda s: s.new_state(True),
        lambda s: list(s.generate([], 2)),
        lambda s: list(s.generate([1], -1)),
        lambda s: list(s.generate([1], 2, SamplingParams(), temperature=0)),
        lambda s: list(s.generate([1], 2, bogus=1)),
        lambda s: s.generate(5, 2),
        lambda s: s.state_from_numpy([1, 2]),
        lambda s: s.new_state()["nope"],
        lambda s: s.prefill_many([[1], []]),
        lambda s: s.prefill_many([[1], [2]], s.new_state(3)),
    ],
)
def test_misuse_is_one_clear_error(tiny_session, call):
    with pytest.raises(RuntimeUserError):
        call(tiny_session)


def test_buffer_sets_are_kept_for_a_few_batch_sizes_only(rwkv4_exports):
    from rwkv_runtime.ort_backend import _BATCH_SIZES_KEPT

    s = Session(rwkv4_exports["plain"])
    kept, snaps = {}, {}
    for b in range(1, 9):
        logits, kept[b] = s.step(np.arange(b) % s.vocab_size)
        snaps[b] = kept[b].numpy()
        ref, _ = Session(rwkv4_exports["plain"]).step(np.arange(b) % s.vocab_size)
        np.testing.assert_allclose(logits, ref, atol=1e-6)
    assert len(s.backend._sets) <= _BATCH_SIZES_KEPT
    for b, st_ in kept.items():  # states still held are intact after their sets were forgotten
        _, again = s.step(np.zeros(b, np.int64), s.new_state(b))  # more traffic at every size
        for k, v in snaps[b].items():
            np.testing.assert_array_equal(st_[k], v)
