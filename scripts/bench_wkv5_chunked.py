"""Prefill of an RWKV-6 sequence graph: the chunked WKV (shipped) against the per-token Scan it replaced.

A random RWKV-6 of the 0.1B shape (12 layers x 768, head 64, ffn 2688, vocab 65536: scripts/make_169m.py;
the sequence graph's head reads the last token only, so the vocabulary is not what is measured) is exported fp32 twice in one process: as shipped (``headwise.wkv5_chunked_ops``
in the sequence graph) and with WKV6Seq's body swapped back to the per-token ``scan_ops`` form. Both
sessions then prefill the same prompt, one thread each, CPU time (time.process_time), best of
``--repeat``, interleaved. A relative check: run both in one process on the same machine.

    python scripts/bench_wkv5_chunked.py [--tokens 512] [--repeat 3] [--dir /tmp/wkv6bench]

--wkv-only times the WKV6Seq op alone (one layer's worth: batch 1, 12 heads of 64, trained-range
decays) for the Scan and for each chunk length in --chunks, the same way.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from make_169m import random_weights  # this folder (python puts a script's folder on sys.path)


def scan_wkv6(g, r, k, v, w, u, s):
    """WKV6Seq as it was before the chunked form: an If whose many-token branch scans token by token."""
    from rwkv_export.arch import headwise as hw

    return hw.scan_ops(
        g,
        "wkv6_scan",
        lambda b, rt, kt, vt, wt, u_, st: hw.wkv5_step_ops(b, rt, kt, vt, wt, u_, st),
        s,
        [r, k, v, w],
        [u],
    )


def _session(model, ort):
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def _best(sessions: dict, feeds: dict, repeat: int) -> dict:
    """CPU seconds per run, best of ``repeat``, the sessions interleaved; after one warm-up run each."""
    for name, sess in sessions.items():
        sess.run(None, feeds[name])
    best = {n: float("inf") for n in sessions}
    for _ in range(repeat):
        for name, sess in sessions.items():
            t0 = time.process_time()
            sess.run(None, feeds[name])
            best[name] = min(best[name], time.process_time() - t0)
    return best


def wkv_only(tokens: int, chunks, repeat: int):
    import onnxruntime as ort

    from rwkv_export.arch import headwise as hw
    from rwkv_export.onnx_graph import GraphBuilder

    def model(body):
        g = GraphBuilder("wkv6")
        for n in "rkvw":
            g.input(n, "float32", ["B", "T", "H", "N"])
        g.input("u", "float32", ["H", "N"])
        g.input("s", "float32", ["B", "H", "N", "N2"])
        y, s2 = body(g, "r", "k", "v", "w", "u", "s")
        g.op("Identity", [y], "y")
        g.op("Identity", [s2], "s_out")
        g.output("y", "float32", None)
        g.output("s_out", "float32", None)
        return g.model().SerializeToString()

    B, H, N = 1, 12, 64
    rng = np.random.default_rng(0)
    feed = {n: rng.standard_normal((B, tokens, H, N)).astype(np.float32) for n in "rkv"}
    feed["w"] = np.exp(-np.exp(rng.uniform(-6, 1, (B, tokens, H, N)))).astype(np.float32)
    feed["u"] = rng.standard_normal((H, N)).astype(np.float32)
    feed["s"] = rng.standard_normal((B, H, N, N)).astype(np.float32)
    sessions = {"scan": _session(model(scan_wkv6), ort)}
    for L in chunks:
        sessions[f"chunked L={L}"] = _session(model(lambda g, *a, L=L: hw.wkv5_chunked_ops(g, *a, L=L)), ort)
    best = _best(sessions, {n: feed for n in sessions}, repeat)
    for name, t in best.items():
        print(f"{name:14s} WKV6Seq, {tokens} tokens, one layer: {t * 1000:.1f} ms CPU")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--wkv-only", action="store_true")
    ap.add_argument("--chunks", default="8,16,32", help="chunk lengths for --wkv-only")
    a = ap.parse_args()
    if a.wkv_only:
        return wkv_only(a.tokens, [int(x) for x in a.chunks.split(",")], a.repeat)
    import onnxruntime as ort

    from rwkv_export.arch import headwise as hw
    from rwkv_export.export import ExportOptions, export, load_manifest

    d = a.dir or Path(tempfile.mkdtemp(prefix="wkv6bench-"))
    d.mkdir(parents=True, exist_ok=True)
    ck = d / "rwkv6-0.1b-random.pth"
    if not ck.exists():
        torch.save(random_weights("6"), ck)  # scripts/make_169m.py: the 0.1B RWKV-6 shape
    paths = {}
    opts = ExportOptions(graphs=("sequence",))
    paths["chunked"] = export(ck, d / "chunked.onnx", opts)[-1]
    shipped = hw.WKV_OPS["WKV6Seq"]
    hw.WKV_OPS["WKV6Seq"] = (shipped[0], scan_wkv6)
    try:
        paths["scan"] = export(ck, d / "scan.onnx", opts)[-1]
    finally:
        hw.WKV_OPS["WKV6Seq"] = shipped

    tokens = np.random.default_rng(0).integers(0, 1024, (1, a.tokens)).astype(np.int64)
    sessions, feeds = {}, {}
    for name, p in paths.items():
        man = load_manifest(p)
        sessions[name] = _session(str(p), ort)
        feeds[name] = {
            "tokens": tokens,
            **{s.name: np.full(s.concrete_shape(1), s.init, np.float32) for s in man.state},
        }
    outs = {n: s.run(None, feeds[n]) for n, s in sessions.items()}
    best = _best(sessions, feeds, a.repeat)
    diff = max(float(np.abs(x - y).max() / max(1.0, np.abs(y).max())) for x, y in zip(outs["chunked"], outs["scan"]))
    for name, t in best.items():
        print(f"{name:8s} prefill {a.tokens} tokens: {t:.3f} s CPU ({a.tokens / t:.0f} tok/s)")
    print(f"speedup {best['scan'] / best['chunked']:.2f}x; max relative difference of the outputs {diff:.1e}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
