"""Prefill (the sequence graph) equals stepping token by token; batches equal one-by-one runs."""

import numpy as np
import pytest

import rwkv_runtime
from rwkv_runtime import BatchGenerator, SamplingParams

from ..helpers import step_all

RNG = np.random.default_rng(1234)
TOKENS = RNG.integers(0, 256, size=512).tolist()


@pytest.fixture(scope="module")
def session(rwkv4_exports):
    return rwkv_runtime.Session(rwkv4_exports["plain"])


@pytest.fixture(scope="module")
def stepped(session):
    """Logits and states after each prefix length of TOKENS, by single steps."""
    out, st, states = [], None, {}
    for i, t in enumerate(TOKENS):
        logits, st = session.step(np.array([t]), st)
        out.append(logits[0])
        if i + 1 in (1, 2, 7, 64, 512):
            states[i + 1] = st.numpy()
    return np.stack(out), states


@pytest.mark.parametrize("T", [1, 2, 7, 64, 512])
@pytest.mark.parametrize("chunk", [1, 5, 64, 1024])
def test_prefill_equals_steps(session, stepped, T, chunk):
    if T == 512 and chunk == 1:
        pytest.skip("covered by the other chunk sizes (512 sequence-graph calls of one token)")
    logits, st = session.prefill(np.array([TOKENS[:T]]), chunk_size=chunk)
    ref_logits, ref_states = stepped
    assert np.abs(logits[0] - ref_logits[T - 1]).max() <= 1e-5
    for k, v in st.numpy().items():
        ref = ref_states[T][k]
        if k.endswith("wkv_pp"):
            np.testing.assert_allclose(v, ref, rtol=1e-6, atol=1e-5, err_msg=k)
        else:  # aa/bb are scaled by exp(-pp): compare relative to their size
            np.testing.assert_allclose(v, ref, rtol=1e-5, atol=1e-5, err_msg=k)


def test_plugin_mode_prefill_equals_steps(rwkv4_exports, stepped):
    s = rwkv_runtime.Session(rwkv4_exports["plugin"])
    logits, _ = s.prefill(np.array([TOKENS[:64]]), chunk_size=16)
    assert np.abs(logits[0] - stepped[0][63]).max() <= 1e-5


def test_batch_of_different_prompts_equals_one_by_one(session):
    prompts = [TOKENS[:5], TOKENS[100:140], TOKENS[200:201], TOKENS[300:317]]
    logits, st = session.prefill_many(prompts, chunk_size=8)
    arrays = st.numpy()
    for i, p in enumerate(prompts):
        single, sst = session.prefill(np.array([p]))
        assert np.abs(logits[i] - single[0]).max() <= 1e-5
        for k, v in sst.numpy().items():
            np.testing.assert_allclose(arrays[k][i], v[0], rtol=1e-5, atol=1e-5)


def test_sequences_join_and_leave_with_their_own_sampling(session):
    gen = BatchGenerator(session)
    a = gen.add(TOKENS[:10], SamplingParams(temperature=0))
    b = gen.add(TOKENS[50:53], SamplingParams(temperature=1.0, top_p=1.0, seed=5))
    for _ in range(3):
        gen.step()
    c = gen.add(TOKENS[70:90], SamplingParams(temperature=0))
    for _ in range(4):
        gen.step()
    gen.remove(b)
    for _ in range(2):
        gen.step()
    got_a, got_c = gen.remove(a), gen.remove(c)
    # each greedy sequence equals its own greedy run from scratch
    for prompt, got in ((TOKENS[:10], got_a), (TOKENS[70:90], got_c)):
        logits, st = session.prefill(np.array([prompt]))
        expect = []
        for _ in range(len(got)):
            tok = int(np.argmax(logits[0]))
            expect.append(tok)
            logits, st = session.step(np.array([tok]), st)
        assert got == expect
    assert len(got_a) == 9 and len(got_c) == 6 and gen.state is None


def test_low_memory_session_steps_with_the_sequence_graph(rwkv4_exports, stepped):
    s = rwkv_runtime.Session(rwkv4_exports["plain"], low_memory=True)
    logits, _ = step_all(s, TOKENS[:7])
    assert np.abs(logits - stepped[0][:7]).max() <= 1e-5
    assert set(s.backend._sessions) == {"sequence"}  # one onnxruntime session: weights in memory once
