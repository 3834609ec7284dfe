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


def tps(session, tokens: np.ndarray) -> tuple[float, float]:
    """(tokens/s by the wall clock, CPU ms per token of this process: steadier on a busy machine)."""
    st = session.new_state(1)
    for t in tokens[:3]:  # warm-up
        _, st = session.step(t[None], st)
    t0, c0 = time.perf_counter(), time.process_time()
    for t in tokens[3:]:
        _, st = session.step(t[None], st)
    n = len(tokens) - 3
    return n / (time.perf_counter() - t0), (time.process_time() - c0) * 1e3 / n


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2, help="1 makes CPU ms/token comparable (no spinning threads)")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--graphs", default="sequence,step")
    ap.add_argument("--loops", default="bound,rebound")
    a = ap.parse_args()
    variants = {}
    for graph in a.graphs.split(","):
        for bound in [lp == "bound" for lp in a.loops.split(",")]:
            s = Session(a.model, threads=a.threads, decode_graph=graph)
            if not bound:
                s.backend._take_set = lambda *_: None  # every step binds fresh outputs (the old loop)
            variants[f"{graph} graph, {'bound once' if bound else 'rebound per token'}"] = s
    ids = np.random.default_rng(0).integers(0, next(iter(variants.values())).vocab_size, a.tokens + 3)
    res = {k: [] for k in variants}
    for _ in range(a.rounds):
        for k, s in variants.items():
            res[k].append(tps(s, ids))
    print(
        f"{a.model}: {platform.processor() or platform.machine()}, {a.threads} threads, {a.rounds} interleaved rounds"
    )
    for k, v in res.items():
        w, c = [x[0] for x in v], [x[1] for x in v]
        print(
            f"  {k:<36} {np.median(w):7.1f} tok/s ({min(w):.1f}-{max(w):.1f})   "
            f"{np.median(c):7.2f} CPU ms/token ({min(c):.2f}-{max(c):.2f}; the minimum is the least disturbed)"
        )


if __name__ == "__main__":
    main()
