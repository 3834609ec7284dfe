"""Decode tokens/s of the step loop: buffers bound once (ping-pong sets) vs bound every token (the old
loop), through the sequence graph (the default: weights once) and through the step graph.

All variants run in one process, interleaved over rounds; medians with min-max are printed.

    python scripts/bench_step_loop.py build/r169-f32.onnx --threads 2 --rounds 5
"""
from __future__ import annotations

import argparse
import platform
import time

import numpy as np

from rwkv_runtime import Session


def tps(session, tokens: np.ndarray) -> float:
    st = session.new_state(1)
    for t in tokens[:3]:  # warm-up
        _, st = session.step(t[None], st)
    t0 = time.perf_counter()
    for t in tokens[3:]:
        _, st = session.step(t[None], st)
    return (len(tokens) - 3) / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    variants = {}
    for graph in ("sequence", "step"):
        for bound in (True, False):
            s = Session(a.model, threads=a.threads, decode_graph=graph)
            if not bound:
                s.backend._take_set = lambda *_: None  # every step binds fresh outputs (the old loop)
            variants[f"{graph} graph, {'bound once' if bound else 'rebound per token'}"] = s
    ids = np.random.default_rng(0).integers(0, next(iter(variants.values())).vocab_size, a.tokens + 3)
    res = {k: [] for k in variants}
    for _ in range(a.rounds):
        for k, s in variants.items():
            res[k].append(tps(s, ids))
    print(f"{a.model}: {platform.processor() or platform.machine()}, {a.threads} threads, {a.rounds} interleaved rounds")
    for k, v in res.items():
        print(f"  {k:<36} {np.median(v):7.1f} tok/s  ({min(v):.1f}-{max(v):.1f})")


if __name__ == "__main__":
    main()
