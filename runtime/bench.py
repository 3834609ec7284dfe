"""Measuring an exported model: decode tokens/s (batch 1 and larger), prefill tokens/s, time to first
token, peak memory. Used by ``rwkv-export bench`` and ``scripts/bench_vs_blinkdl.py``; torch-free."""

from __future__ import annotations

import resource
import time

import numpy as np


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def decode_tps(session, batch: int = 1, tokens: int = 64, warmup: int = 4) -> float:
    """Tokens/s (per sequence x batch) of stepping ``batch`` sequences, after a short warm-up."""
    rng = np.random.default_rng(0)
    st = session.new_state(batch)
    ids = rng.integers(0, session.vocab_size, size=(warmup + tokens, batch))
    for j in range(warmup):
        _, st = session.step(ids[j], st)
    t0 = time.perf_counter()
    for j in range(warmup, warmup + tokens):
        _, st = session.step(ids[j], st)
    return batch * tokens / (time.perf_counter() - t0)


def prefill_tps(session, length: int = 512, repeats: int = 2, chunk_size: int | None = None) -> float:
    rng = np.random.default_rng(1)
    ids = rng.integers(0, session.vocab_size, size=(1, length))
    session.prefill(ids[:, :8])  # warm-up (also loads the sequence graph)
    return length / _timed(lambda: session.prefill(ids, chunk_size=chunk_size), repeats)


def time_to_first_token(session, prompt_len: int = 64) -> float:
    """Seconds from a prompt to the first sampled token (prefill + one sample), warm."""
    rng = np.random.default_rng(2)
    ids = rng.integers(0, session.vocab_size, size=(1, prompt_len))

    def once():
        logits, _ = session.prefill(ids)
        int(np.argmax(logits[0]))

    once()
    return _timed(once, 3)


def run_bench(session, batches=(1, 4), decode_tokens: int = 64, prefill_len: int = 512) -> dict:
    res = {
        "model": str(session.path),
        "architecture": session.manifest.architecture,
        "precision": session.manifest.precision,
        "decode_tps": {},
        "prefill_len": prefill_len,
    }
    for b in batches:
        res["decode_tps"][str(b)] = decode_tps(session, b, decode_tokens)
    if prefill_len > 0:
        res["prefill_tps"] = prefill_tps(session, prefill_len)
        res["ttft_s_64"] = time_to_first_token(session, 64)
    res["peak_rss_mb"] = peak_rss_mb()
    return res
