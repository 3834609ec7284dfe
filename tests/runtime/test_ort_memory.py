"""How the runtime keeps onnxruntime's memory down after a prefill (issue #30): prefill runs shrink the
CPU arena when they end, and their state outputs live outside the arena so that the state a caller
keeps pins none of its regions; decode steps keep the arena (and onnxruntime's memory pattern)."""

from __future__ import annotations

import numpy as np

from rwkv_runtime import Session


def test_prefill_runs_shrink_the_arena_and_decode_steps_do_not(rwkv4_exports):
    s = Session(rwkv4_exports["plain"])
    ro = s.backend._prefill_run_options
    assert ro is not None and ro.get_run_config_entry("memory.enable_memory_arena_shrinkage") == "cpu:0"
    calls = []
    execute = s.backend._execute
    s.backend._execute = lambda sess, io, run_options=None: (calls.append(run_options), execute(sess, io, run_options))
    _, st = s.prefill(np.array([[1, 2, 3, 4, 5]]))
    s.step(np.array([6]), st)
    assert calls == [ro, None]
    assert s.backend.session("sequence").get_session_options().enable_mem_pattern is True


def test_prefill_state_outside_the_arena_is_the_same_state(rwkv4_exports):
    """The prefill's state outputs (pre-allocated OrtValues now) carry on exactly: a prefill of 2 rows
    and 3 chunks, then steps, against stepping every token one by one."""
    s = Session(rwkv4_exports["plain"], prefill_chunk=3)
    ids = np.array([[5, 9, 2, 7, 1, 3, 8], [4, 4, 6, 1, 0, 2, 9]])
    logits, st = s.prefill(ids)
    ref = s.new_state(2)
    for t in range(ids.shape[1]):
        ref_logits, ref = s.step(ids[:, t], ref)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
    a, _ = s.step(np.array([3, 3]), st)
    b, _ = s.step(np.array([3, 3]), ref)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_callers_session_options_without_an_arena_still_prefill(rwkv4_exports):
    """onnxruntime fails a run that asks to shrink an arena the session lacks: a caller's options
    (here the arena off) get no shrinking, and prefill works as before."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_cpu_mem_arena = False
    s = Session(rwkv4_exports["plain"], session_options=so)
    assert s.backend._prefill_run_options is None
    logits, _ = s.prefill(np.array([[1, 2, 3]]))
    ref, _ = Session(rwkv4_exports["plain"]).prefill(np.array([[1, 2, 3]]))
    np.testing.assert_allclose(logits, ref, rtol=1e-6, atol=1e-6)
