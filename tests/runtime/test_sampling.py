"""Sampling: sound at every temperature, parameters and logits checked, ChatRWKV's semantics kept."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rwkv_runtime import RuntimeUserError, Sampler, SamplingParams


def test_tiny_temperature_works_and_is_nearly_greedy():
    """temperature 0.001 crashed with 'Probabilities contain NaN' when done in probability space."""
    logits = np.array([1.0, 3.0, 2.9, -5.0], np.float32)
    s = Sampler(SamplingParams(temperature=0.001, top_p=1.0, seed=0))
    assert {s(logits) for _ in range(50)} == {1}
    s = Sampler(SamplingParams(temperature=1e-30, top_p=1.0, seed=0))
    assert s(logits) == 1


def test_temperature_zero_is_greedy_even_with_top_p_zero():
    logits = np.array([0.0, 0.5, 4.0], np.float32)
    assert Sampler(SamplingParams(temperature=0.0, top_p=0.0))(logits) == 2
    assert Sampler(SamplingParams(temperature=1.0, top_p=0.0, seed=1))(logits) == 2  # top-p 0 keeps the best


def test_temperature_follows_chatrwkv_probs_power():
    """ChatRWKV: probs ** (1/T) renormalised; at T=0.5 with probs (0.6, 0.4): 0.36/0.52 ~ 0.692."""
    logits = np.log(np.array([0.6, 0.4]))
    s = Sampler(SamplingParams(temperature=0.5, top_p=1.0, seed=3))
    n = 4000
    freq0 = sum(s(logits) == 0 for _ in range(n)) / n
    assert abs(freq0 - 0.36 / 0.52) < 0.03


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_logits_are_a_clear_error(bad):
    logits = np.zeros(5, np.float32)
    logits[2] = bad
    with pytest.raises(RuntimeUserError, match="NaN or inf"):
        Sampler(SamplingParams(seed=0))(logits)


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=float("nan")),
        dict(temperature=-1.0),
        dict(temperature=float("inf")),
        dict(top_p=1.5),
        dict(top_p=float("nan")),
        dict(top_k=-1),
        dict(top_k=1.5),
        dict(seed=-1),
        dict(seed=1.5),
        dict(presence_penalty=float("inf")),
        dict(penalty_decay=2.0),
        dict(ban=(-1,)),
        dict(stop=("a",)),
        dict(ban=5.5),
    ],
)
def test_bad_parameters_are_a_clear_error(kw):
    with pytest.raises(RuntimeUserError, match="sampling"):
        Sampler(SamplingParams(**kw))


def test_ban_and_stop_ids_checked_against_the_vocabulary(tiny_session):
    with pytest.raises(RuntimeUserError, match="outside the vocabulary"):
        list(tiny_session.generate([1, 2], 3, ban=(tiny_session.vocab_size,)))
    with pytest.raises(RuntimeUserError, match="outside the vocabulary"):
        list(tiny_session.generate([1, 2], 3, stop=(10**9,)))
    with pytest.raises(RuntimeUserError, match="vocabulary"):
        Sampler(SamplingParams(ban=(7,)))(np.zeros(5))


def test_banned_tokens_never_come_out():
    s = Sampler(SamplingParams(temperature=2.0, top_p=1.0, seed=0, ban=(0, 1)))
    logits = np.array([10.0, 10.0, 0.0, 0.0], np.float32)
    assert {s(logits) for _ in range(100)} <= {2, 3}
    with pytest.raises(RuntimeUserError, match="every token"):
        Sampler(SamplingParams(ban=(0, 1)))(np.zeros(2))


finite_or_not = st.floats(allow_nan=True, allow_infinity=True, width=64)


@settings(max_examples=60, deadline=None)
@given(
    temperature=finite_or_not | st.floats(0, 1e-3),
    top_p=finite_or_not | st.floats(0, 1),
    top_k=st.integers(-3, 12),
    presence=finite_or_not,
    frequency=finite_or_not,
    seed=st.none() | st.integers(-5, 2**63),
    ban=st.lists(st.integers(-2, 12), max_size=4),
    logits=st.lists(st.floats(-1e30, 1e30).map(lambda x: float(np.float32(x))), min_size=1, max_size=10),
)
def test_generated_parameters_give_a_token_or_a_clear_error(
    temperature, top_p, top_k, presence, frequency, seed, ban, logits
):
    v = len(logits)
    try:
        s = Sampler(
            SamplingParams(
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                presence_penalty=presence,
                frequency_penalty=frequency,
                seed=seed,
                ban=tuple(ban),
            ),
            vocab_size=v,
        )
        toks = [s(np.asarray(logits, np.float32)) for _ in range(3)]
    except RuntimeUserError as e:
        assert "\n" not in str(e)
        return
    assert all(0 <= t < v and t not in ban for t in toks)
    assert math.isfinite(temperature) and temperature >= 0


def test_logit_bias_is_added_to_the_logits_before_everything_else():
    """OpenAI's definition: a sampler with logit_bias draws exactly what one without it draws from the
    biased logits (same seed, penalties on, many steps, so the occurrence counts match too)."""
    rng = np.random.default_rng(5)
    rows = rng.normal(0, 3, (200, 40))
    bias = {3: 4.0, 17: -2.5, 39: 100.0, 0: -100.0}
    added = np.zeros(40)
    added[list(bias)] = list(bias.values())
    kw = dict(temperature=0.9, top_p=0.9, top_k=12, presence_penalty=0.4, frequency_penalty=0.2, seed=9)
    with_bias, without = Sampler(SamplingParams(**kw, logit_bias=bias), 40), Sampler(SamplingParams(**kw), 40)
    got = [with_bias(r) for r in rows]
    assert got == [without(r + added) for r in rows]
    assert 0 not in got and got.count(39) > 150  # -100 / +100: effectively banned / forced
    # greedy sees it too; a banned token stays banned whatever its bias
    logits = np.array([5.0, 1.0, 0.0])
    assert Sampler(SamplingParams(temperature=0, logit_bias={1: 4.5}))(logits) == 1
    assert Sampler(SamplingParams(temperature=0, logit_bias={1: 100}, ban=(1,)))(logits) == 0


@pytest.mark.parametrize(
    "bias", [{"5": 1.0}, {True: 1.0}, {-1: 1.0}, {40: 1.0}, {2: float("nan")}, {2: float("inf")}, {2: "1"}, [(2, 1.0)]]
)
def test_bad_logit_bias_is_a_clear_error(bias):
    with pytest.raises(RuntimeUserError, match="logit_bias"):
        Sampler(SamplingParams(logit_bias=bias), vocab_size=40)


def test_generate_with_logit_bias_equals_stepping_the_biased_logits(tiny_session):
    s, prompt = tiny_session, [1, 2, 3]
    plain = list(s.generate_tokens(prompt, 12, SamplingParams(temperature=0)))
    bias = {plain[0]: -50.0, (plain[0] + 1) % s.vocab_size: 3.0}
    got = list(s.generate_tokens(prompt, 12, SamplingParams(temperature=0, logit_bias=bias)))
    logits, st = s.prefill(np.array([prompt]))
    want = []
    for _ in range(12):
        x = logits[0].astype(np.float64)
        x[list(bias)] += list(bias.values())
        want.append(int(np.argmax(x)))
        logits, st = s.step(np.array(want[-1:]), st)
    assert got == want
    assert got[0] != plain[0]  # the bias mattered


def _full_sort_sample(logp, temperature, top_p, top_k, rng):
    """The draw as ChatRWKV's order defines it, sorting the whole vocabulary (what sample_logprobs did
    before it sorted only the nucleus's head): the independent statement of the semantics."""
    probs = np.exp(logp)
    order = np.argsort(-logp, kind="stable")
    cum = np.cumsum(probs[order])
    keep = logp >= logp[order[int(np.argmax(cum >= min(top_p, cum[-1])))]]
    if top_p >= 1.0:  # no cut: every possible token
        keep = logp > -np.inf
    if 0 < top_k < len(logp):
        keep[order[top_k:]] = False
    with np.errstate(over="ignore"):
        q = np.exp(np.where(keep, (logp - np.max(logp[keep])) / temperature, -np.inf))
    return int(rng.choice(len(q), p=q / q.sum()))


def test_sorting_only_the_nucleus_head_draws_what_the_full_sort_draws():
    """The fast path (sort the tokens near the top only) must give the same token for the same seed as
    sorting all 65,536: peaked and flat distributions, ties, masked (-inf) tokens, every top_p and
    top_k regime (the JS runtime, which sorts everything, is checked against Python's draws)."""
    from rwkv_runtime.sampling import sample_logprobs

    g = np.random.default_rng(7)
    for _ in range(400):
        V = int(g.choice([7, 1000, 65536]))
        x = g.standard_normal(V) * float(g.choice([0.3, 3.0, 12.0]))
        if g.random() < 0.3:
            x = np.round(x)  # ties at the cut
        if g.random() < 0.2:
            x[g.random(V) < 0.5] = -np.inf
            x[0] = 1.0
        m = x[np.isfinite(x)].max()
        logp = x - (m + np.log(np.exp(x - m).sum()))
        T, P = float(g.choice([0.05, 1.0, 2.0])), float(g.choice([0.0, 0.3, 0.85, 0.999, 1.0]))
        K, seed = int(g.choice([0, 1, 5, 300])), int(g.integers(1 << 30))
        got = sample_logprobs(logp, T, P, K, np.random.default_rng(seed))
        assert got == _full_sort_sample(logp, T, P, K, np.random.default_rng(seed)), (V, T, P, K, seed)
