"""The onnxruntime session options the runtime picks for memory (issue #30): no memory pattern for the
sequence graph (a pattern per input shape stayed resident after a long prefill), the step graph's
unchanged, and a caller's own SessionOptions used as given."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from rwkv_runtime import Session


def test_sequence_session_has_no_memory_pattern(rwkv4_exports):
    s = Session(rwkv4_exports["plain"], decode_graph="step")
    be = s.backend
    assert be.session("sequence").get_session_options().enable_mem_pattern is False
    assert be.session("step").get_session_options().enable_mem_pattern is True
    # still the same results: a prefill and a decode step through the sequence graph
    logits, st = s.prefill(np.array([[1, 2, 3, 4]]))
    seq = Session(rwkv4_exports["plain"], decode_graph="sequence")
    logits2, st2 = seq.prefill(np.array([[1, 2, 3, 4]]))
    np.testing.assert_allclose(logits, logits2, rtol=1e-6, atol=1e-6)
    a, _ = s.step(np.array([5]), st)
    b, _ = seq.step(np.array([5]), st2)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_callers_session_options_are_kept(rwkv4_exports):
    so = ort.SessionOptions()
    so.enable_mem_pattern = True
    s = Session(rwkv4_exports["plain"], session_options=so)
    assert s.backend.session("sequence").get_session_options().enable_mem_pattern is True
