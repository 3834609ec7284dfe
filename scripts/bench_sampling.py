"""The sampler's draw over a World-sized vocabulary (65,536 logits), per call, best of rounds.

Three rows per distribution, measured in the same process, interleaved:
  - runtime: ``rwkv_runtime.sampling.sample_logprobs`` as shipped;
  - full sort (peer): the same semantics sorting the whole vocabulary on every draw (what the runtime
    did before its fast paths, and what a straightforward nucleus sampler does);
  - ceiling: the work every draw over the vocabulary needs at least (one exp over it and the seeded
    choice from the resulting distribution), with no nucleus cut at all.

    python scripts/bench_sampling.py --rounds 5 [--json build/bench-sampling.json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from rwkv_runtime.sampling import sample_logprobs

V = 65536


def full_sort(logp, temperature, top_p, top_k, rng):
    probs = np.exp(logp)
    order = np.argsort(-logp, kind="stable")
    cum = np.cumsum(probs[order])
    keep = logp >= logp[order[int(np.argmax(cum >= min(top_p, cum[-1])))]]
    if 0 < top_k < len(logp):
        keep[order[top_k:]] = False
    with np.errstate(over="ignore"):
        q = np.exp(np.where(keep, (logp - np.max(logp[keep])) / temperature, -np.inf))
    return int(rng.choice(len(q), p=q / q.sum()))


def ceiling(logp, temperature, top_p, top_k, rng):
    q = np.exp(logp)
    return int(rng.choice(len(q), p=q / q.sum()))


def log_softmax(x):
    m = x[np.isfinite(x)].max()
    return x - (m + np.log(np.exp(x - m).sum()))


def distributions(seed: int = 0) -> dict:
    g = np.random.default_rng(seed)
    peaked = g.standard_normal(V) * 3.0
    peaked[g.integers(V, size=8)] += 12.0  # a few likely tokens over a long tail, as a trained model's
    masked = g.standard_normal(V) * 3.0
    masked[g.random(V) < 0.99] = -np.inf  # a grammar allows ~1% of the vocabulary
    return {
        "peaked": log_softmax(peaked),
        "flat (random model)": log_softmax(g.standard_normal(V) * 0.5),
        "masked (constraint)": log_softmax(masked),
    }


def time_draw(fn, logp, top_p, n: int = 30) -> float:
    rng = np.random.default_rng(1)
    t0 = time.perf_counter()
    for _ in range(n):
        fn(logp, 1.0, top_p, 0, rng)
    return (time.perf_counter() - t0) / n * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    print("| logits | top_p | runtime ms | full sort ms | ceiling ms | runtime / ceiling time |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, logp in distributions().items():
        for top_p in (1.0, 0.85):
            best = {"runtime": 1e9, "full": 1e9, "ceiling": 1e9}
            for _ in range(args.rounds):
                for k, fn in (("runtime", sample_logprobs), ("full", full_sort), ("ceiling", ceiling)):
                    best[k] = min(best[k], time_draw(fn, logp, top_p))
            rows.append({"logits": name, "top_p": top_p, **best})
            print(
                f"| {name} | {top_p} | {best['runtime']:.2f} | {best['full']:.2f} | {best['ceiling']:.2f} "
                f"| {best['runtime'] / best['ceiling']:.2f}x |"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rounds": args.rounds, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
