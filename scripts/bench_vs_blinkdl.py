"""Decode and prefill speed of an rwkv-export ONNX model against BlinkDL's `rwkv` package, same run.

    python scripts/bench_vs_blinkdl.py CHECKPOINT.pth MODEL.onnx [MODEL2.onnx ...] [--threads 2] [--json out.json]

Each side runs in its own process (so memory and thread pools do not interfere) with the same
thread count; BlinkDL's package uses strategy "cpu fp32", one token per forward() for decode and
one forward() of the whole prompt for prefill (its sequence mode).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import textwrap

BLINKDL = textwrap.dedent("""
    import os, sys, time, json
    os.environ["RWKV_JIT_ON"] = "1"; os.environ["RWKV_CUDA_ON"] = "0"
    import torch
    torch.set_num_threads(int(sys.argv[2]))
    from rwkv.model import RWKV
    m = RWKV(sys.argv[1][:-4], strategy="cpu fp32", verbose=False)
    g = torch.Generator().manual_seed(0)
    V = m.w["emb.weight"].shape[0]
    ids = torch.randint(0, V, (600,), generator=g).tolist()
    st = None
    for t in ids[:4]:
        _, st = m.forward([t], st)
    n = int(sys.argv[3])
    t0 = time.perf_counter()
    for t in ids[4:4 + n]:
        _, st = m.forward([t], st)
    dec = n / (time.perf_counter() - t0)
    L = int(sys.argv[4]); best = 1e9
    m.forward(ids[:8], None)
    for _ in range(2):
        t0 = time.perf_counter(); m.forward(ids[:L], None); best = min(best, time.perf_counter() - t0)
    print(json.dumps({"decode_tps": dec, "prefill_tps": L / best}))
""")

OURS = textwrap.dedent("""
    import sys, json
    import rwkv_runtime
    from rwkv_runtime.bench import decode_tps, prefill_tps, peak_rss_mb
    s = rwkv_runtime.Session(sys.argv[1], threads=int(sys.argv[2]), low_memory=sys.argv[5] == "1")
    n, L = int(sys.argv[3]), int(sys.argv[4])
    res = {"decode_tps": decode_tps(s, 1, n)}
    res["step_tps_for_prefill_ratio"] = res["decode_tps"]
    if L and s.backend.has("sequence"):
        res["prefill_tps"] = prefill_tps(s, L)
    res["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(res))
""")


def run(code: str, *args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args[1]))
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"benchmark process failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("models", nargs="+", help="exported step graphs (fp32, int8, ...) to measure")
    ap.add_argument("--low-memory", action="store_true", help="also measure each model with low_memory=True")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--json", dest="json_out")
    ap.add_argument("--skip-blinkdl", action="store_true")
    a = ap.parse_args()
    peer = None if a.skip_blinkdl else run(BLINKDL, a.checkpoint, a.threads, a.tokens, a.prefill)
    ours = {}
    for m in a.models:
        for low in ([False, True] if a.low_memory else [False]):
            label = os.path.basename(m) + (" (low-memory)" if low else "")
            ours[label] = run(OURS, m, a.threads, a.tokens, a.prefill, "1" if low else "0")
    machine = f"{platform.machine()} {os.cpu_count()} cores, {platform.processor() or platform.platform()}"
    print(f"machine: {machine}; threads {a.threads}")
    p_dec = peer["decode_tps"] if peer else float("nan")
    p_pre = peer["prefill_tps"] if peer else float("nan")
    print(f"{'':34}{'decode tok/s':>13}{'vs BlinkDL':>11}{'prefill tok/s':>15}{'vs BlinkDL':>11}{'RSS MB':>8}")
    if peer:
        print(f"{'BlinkDL rwkv (cpu fp32)':<34}{p_dec:>13.1f}{1.0:>11.2f}{p_pre:>15.1f}{1.0:>11.2f}{'':>8}")
    for label, r in ours.items():
        pre = r.get("prefill_tps", float("nan"))
        print(f"{label:<34}{r['decode_tps']:>13.1f}{r['decode_tps'] / p_dec:>11.2f}{pre:>15.1f}{pre / p_pre:>11.2f}"
              f"{r['peak_rss_mb']:>8.0f}")
        if "prefill_tps" in r:
            print(f"{'':34}prefill / stepping the same tokens: {pre / r['decode_tps']:.1f}x")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"machine": machine, "threads": a.threads, "ours": ours, "blinkdl": peer}, f, indent=1)


if __name__ == "__main__":
    main()
