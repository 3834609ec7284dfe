"""Decode and prefill speed of rwkv-export ONNX models as fractions of the machine's ceiling, next to
BlinkDL's `rwkv` package and (given a build) rwkv.cpp, all in one run.

    python scripts/bench_vs_blinkdl.py CHECKPOINT.pth MODEL.onnx [MODEL2.onnx ...] [--threads 2]
        [--rounds 3] [--batches 1,4,16,32] [--rwkvcpp PATH] [--json out.json]

Every measurement runs in its own process (memory and thread pools do not interfere) with the same
thread count, and the contenders are interleaved: round 1 measures each once, then round 2, ...; the
table shows medians with min-max. Within a process, batch-1 decode is the median of three blocks of
``--tokens`` tokens for every contender (a moment's stall of the machine hits one block). The ceiling of each model is one onnxruntime op reading as many
weight bytes as one decode step of it (scripts/bench_ceiling.py); "of ceiling" is the model's median
decode over the ceiling's median. BlinkDL's package: strategy "cpu fp32", one token per forward() for
decode, one forward() of the whole prompt for prefill. rwkv.cpp (``--rwkvcpp`` = its source tree,
built as docs/benchmarks.md says): the checkpoint converted to FP32, Q8_0 and Q4_0, decode one token
per rwkv_eval, prefill in chunks of ``--chunk`` tokens (its sequence mode; ours in the same chunks).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

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
    n, rates = int(sys.argv[3]), []
    for b in range(3):  # the median of three blocks: a moment's stall of the machine hits one block
        t0 = time.perf_counter()
        for t in ids[4 + b * n:4 + (b + 1) * n]:
            _, st = m.forward([t], st)
        rates.append(n / (time.perf_counter() - t0))
    res = {"decode_tps": sorted(rates)[1]}
    L = int(sys.argv[4])
    if L:
        m.forward(ids[:8], None)
        t0 = time.perf_counter(); m.forward(ids[:L], None); res["prefill_tps"] = L / (time.perf_counter() - t0)
    print(json.dumps(res))
""")

OURS = textwrap.dedent("""
    import sys, json
    import rwkv_runtime
    from rwkv_runtime.bench import decode_tps, prefill_tps, peak_rss_mb
    s = rwkv_runtime.Session(sys.argv[1], threads=int(sys.argv[2]), low_memory=sys.argv[5] == "1",
                             decode_graph=sys.argv[7])
    n, L = int(sys.argv[3]), int(sys.argv[4])
    # batch 1: the median of three blocks, as for every contender (a moment's stall hits one block)
    res = {"decode_tps": {b: sorted(decode_tps(s, 1, n) for _ in range(3))[1] if b == "1" else decode_tps(s, int(b), n)
                          for b in sys.argv[6].split(",")}}
    if L and s.backend.has("sequence"):
        res["prefill_tps"] = prefill_tps(s, L, repeats=1, chunk_size=int(sys.argv[8]))
    res["peak_rss_mb"] = peak_rss_mb()  # before the paired ops below add their own weights
    if len(sys.argv) > 9:  # paired: the bounds and decode alternating in this process, same memory state
        import time
        import numpy as np
        import onnxruntime as ort
        sys.path.insert(0, sys.argv[9])
        import bench_ceiling as bc
        info = bc.step_weight_bytes(sys.argv[1])
        so = ort.SessionOptions(); so.intra_op_num_threads = int(sys.argv[2])
        c = ort.InferenceSession(bc._gemm_model(info["K"], info["bytes"]).SerializeToString(), so,
                                 providers=["CPUExecutionProvider"])
        x = {"x": np.ones((1, info["K"]), np.float32)}
        prod = bc.ProductsRunner(sys.argv[1], int(sys.argv[2]))
        def rate(f):
            f()
            t0 = time.perf_counter()
            for _ in range(16):
                f()
            return 16 / (time.perf_counter() - t0)
        pairs, pprod = [], []
        for _ in range(5):
            ceil, products = rate(lambda: c.run(None, x)), rate(prod.run)
            d = decode_tps(s, 1, 16, warmup=1)
            pairs.append(d / ceil)
            pprod.append(d / products)
        res["paired_fraction"] = sorted(pairs)[len(pairs) // 2]
        res["paired_products_fraction"] = sorted(pprod)[len(pprod) // 2]
    print(json.dumps(res))
""")

CEILING = textwrap.dedent("""
    import sys, json
    sys.path.insert(0, sys.argv[3])
    import bench_ceiling as bc
    info = bc.step_weight_bytes(sys.argv[1])
    res = bc.ceiling_tps(info, int(sys.argv[2]))
    batches = sys.argv[4].split(",") if len(sys.argv) > 4 else ["1"]
    if len(sys.argv) > 5 and sys.argv[5] == "1":  # the float32 model: the Gemm op's batched ceilings
        res["batched"] = bc.batched_ceiling_tps(info, batches, int(sys.argv[2]))
    res["products"] = bc.products_tps(sys.argv[1], batches, int(sys.argv[2]))
    print(json.dumps(res))
""")

RWKVCPP = textwrap.dedent("""
    import sys, time, json
    import numpy as np
    sys.path.insert(0, sys.argv[1] + "/python")
    from rwkv_cpp import rwkv_cpp_model, rwkv_cpp_shared_library
    lib = rwkv_cpp_shared_library.RWKVSharedLibrary(sys.argv[5])
    m = rwkv_cpp_model.RWKVModel(lib, sys.argv[2], thread_count=int(sys.argv[3]))
    ids = np.random.default_rng(0).integers(0, m.n_vocab, 600).tolist()
    st_a, st_b = None, None
    logits, st_a = m.eval(ids[0], None, use_numpy=True)
    st_b = st_a.copy()
    for t in ids[1:4]:
        m.eval(t, st_a, st_b, logits); st_a, st_b = st_b, st_a
    n, rates = int(sys.argv[4]), []
    for b in range(3):  # the median of three blocks, as for every contender
        t0 = time.perf_counter()
        for t in ids[4 + b * n:4 + (b + 1) * n]:
            m.eval(t, st_a, st_b, logits); st_a, st_b = st_b, st_a
        rates.append(n / (time.perf_counter() - t0))
    res = {"decode_tps": sorted(rates)[1]}
    L, chunk = int(sys.argv[6]), int(sys.argv[7])
    if L:
        m.eval_sequence_in_chunks(ids[:chunk], None, chunk_size=chunk, use_numpy=True)
        t0 = time.perf_counter()
        m.eval_sequence_in_chunks(ids[:L], None, chunk_size=chunk, use_numpy=True)
        res["prefill_tps"] = L / (time.perf_counter() - t0)
    print(json.dumps(res))
""")


def run(code: str, *args, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"benchmark process failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def rwkvcpp_models(root: Path, checkpoint: str, build: Path) -> tuple[Path, dict]:
    """rwkv.cpp's library and the checkpoint in its formats (converted once, kept in ``build``)."""
    lib = next(
        (
            p
            for p in (root / "build" / "librwkv.so", root / "librwkv.so", root / "build" / "bin" / "librwkv.so")
            if p.is_file()
        ),
        None,
    )
    if lib is None:
        raise SystemExit(f"--rwkvcpp {root}: no librwkv.so under build/ (see docs/benchmarks.md for the build)")
    stem = Path(checkpoint).stem
    files = {f: build / f"{stem}.rwkvcpp-{f}.bin" for f in ("FP32", "Q8_0", "Q4_0")}
    if not files["FP32"].is_file():
        subprocess.run(
            [
                sys.executable,
                str(root / "python" / "convert_pytorch_to_ggml.py"),
                checkpoint,
                str(files["FP32"]),
                "FP32",
            ],
            check=True,
            capture_output=True,
        )
    for f in ("Q8_0", "Q4_0"):
        if not files[f].is_file():
            code = (
                "import sys; sys.path.insert(0, sys.argv[1] + '/python'); from rwkv_cpp import rwkv_cpp_shared_library as l;"
                "l.RWKVSharedLibrary(sys.argv[2]).rwkv_quantize_model_file(sys.argv[3], sys.argv[4], sys.argv[5])"
            )
            subprocess.run(
                [sys.executable, "-c", code, str(root), str(lib), str(files["FP32"]), str(files[f]), f],
                check=True,
                capture_output=True,
            )
    return lib, files


def stats(xs) -> tuple:
    xs = sorted(xs)
    return float(np.median(xs)), xs[0], xs[-1]


def fmt(xs, width=20) -> str:
    if not xs:
        return f"{'-':>{width}}"
    m, lo, hi = stats(xs)
    # (a leading space keeps columns apart when a wide figure, e.g. a tiny model's, overflows the width)
    return " " + f"{m:>7.1f} ({lo:.1f}-{hi:.1f})".rjust(width - 1)


def machine() -> str:
    try:
        model = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.platform()
    return f"{model}, {os.cpu_count()} logical CPUs, {platform.machine()}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("models", nargs="+", help="exported step graphs (fp32, int8, int4, ...); the first is batched")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=64, help="prefill chunk size (ours and rwkv.cpp's sequence mode)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--batches", default="1,4,16,32", help="batch sizes measured (the first model's against its ceiling)"
    )
    ap.add_argument("--low-memory", action="store_true", help="also measure each model with low_memory=True")
    ap.add_argument("--rwkvcpp", type=Path, help="an rwkv.cpp source tree with build/librwkv.so")
    ap.add_argument("--skip-blinkdl", action="store_true")
    ap.add_argument(
        "--step-graph",
        action="store_true",
        help="also measure the first model with decode_graph='step' (two sessions, a second weights copy)",
    )
    ap.add_argument("--json", dest="json_out")
    a = ap.parse_args()
    T = a.threads
    cpp = rwkvcpp_models(a.rwkvcpp, a.checkpoint, Path(a.models[0]).parent) if a.rwkvcpp else None

    contenders = {}  # label -> (code, args)
    for i, m in enumerate(dict.fromkeys(a.models)):
        contenders[f"ceiling {Path(m).name}"] = (CEILING, (m, T, HERE, a.batches, "1" if i == 0 else "0"))
    if not a.skip_blinkdl:
        contenders["BlinkDL rwkv (cpu fp32)"] = (BLINKDL, (a.checkpoint, T, a.tokens, a.prefill))
    if cpp:
        lib, files = cpp
        for f, p in files.items():
            contenders[f"rwkv.cpp {f}"] = (RWKVCPP, (a.rwkvcpp, p, T, a.tokens, lib, a.prefill, a.chunk))
    for i, m in enumerate(a.models):
        for low in [False, True] if a.low_memory else [False]:
            label = Path(m).name + (" (low-memory)" if low else "")
            batches = a.batches if not low else "1"
            contenders[label] = (OURS, (m, T, a.tokens, a.prefill, "1" if low else "0", batches, "auto", a.chunk, HERE))
        if i == 0 and a.step_graph:  # the two-session layout: faster decode, a second copy of the weights
            contenders[Path(m).name + " (decode_graph=step)"] = (
                OURS,
                (m, T, a.tokens, a.prefill, "0", a.batches, "step", a.chunk, HERE),
            )

    runs = {k: [] for k in contenders}
    for r in range(a.rounds):
        for label, (code, args) in contenders.items():
            print(f"round {r + 1}/{a.rounds}: {label}", file=sys.stderr, flush=True)
            runs[label].append(run(code, *args, threads=T))

    def dec(label, batch="1"):
        out = []
        for x in runs[label]:
            d = x.get("ceiling", x.get("decode_tps"))
            out.append(d[batch] if isinstance(d, dict) else d)
        return out

    print(f"machine: {machine()}; {T} threads; {a.rounds} interleaved rounds, median (min-max)")
    blink = dec("BlinkDL rwkv (cpu fp32)") if not a.skip_blinkdl else []
    b_med = stats(blink)[0] if blink else float("nan")
    print(
        f"{'':34}{'decode tok/s':>20}{'of ceiling':>11}{'ceiling tok/s':>20}{'vs BlinkDL*':>12}{'prefill tok/s':>20}"
        f"{'paired**':>10}"
    )
    if blink:
        pre = [x["prefill_tps"] for x in runs["BlinkDL rwkv (cpu fp32)"] if "prefill_tps" in x]
        print(f"{'BlinkDL rwkv (cpu fp32)':<34}{fmt(blink)}{'':>11}{'':>20}{1.0:>12.2f}{fmt(pre)}")
    if cpp:
        for f in cpp[1]:
            label = f"rwkv.cpp {f}"
            pre = [x["prefill_tps"] for x in runs[label] if "prefill_tps" in x]
            print(f"{label:<34}{fmt(dec(label))}{'':>11}{'':>20}{stats(dec(label))[0] / b_med:>12.2f}{fmt(pre)}")
    for i, m in enumerate(a.models):
        ceil = dec(f"ceiling {Path(m).name}")
        prods = [x["products"] for x in runs[f"ceiling {Path(m).name}"]]
        p1 = stats([x["1"] for x in prods])[0]
        for label in [k for k in contenders if k.startswith(Path(m).name)]:
            d = dec(label)
            pre = [x["prefill_tps"] for x in runs[label] if "prefill_tps" in x]
            paired = [x["paired_fraction"] for x in runs[label] if "paired_fraction" in x]
            pf = f"{stats(paired)[0]:.2f} ({stats(paired)[1]:.2f}-{stats(paired)[2]:.2f})" if paired else ""
            print(
                f"{label:<34}{fmt(d)}{stats(d)[0] / stats(ceil)[0]:>11.2f}{fmt(ceil)}{stats(d)[0] / b_med:>12.2f}"
                f"{fmt(pre)}  {pf}"
            )
            if label.endswith("(low-memory)"):
                continue
            pp = [x["paired_products_fraction"] for x in runs[label] if "paired_products_fraction" in x]
            if label == Path(m).name:  # the bound of separate matrix products, once per model
                print(
                    f"{'  its matrix products alone***':<34}{fmt([x['1'] for x in prods])}{p1 / stats(ceil)[0]:>11.2f}"
                )
            if pp:
                print(
                    f"{'    decode over them':<34}{stats(d)[0] / p1:>20.2f}{'':>11}{'':>20}{'':>12}{'':>20}  "
                    f"{stats(pp)[0]:.2f} ({stats(pp)[1]:.2f}-{stats(pp)[2]:.2f})"
                )
            first = a.models[0]
            bc = [x["batched"] for x in runs[f"ceiling {Path(first).name}"]]
            for b in a.batches.split(",")[1:]:
                db, pb = dec(label, b), [x[b] for x in prods]
                bound = (
                    f"; its products alone {stats(pb)[0]:.0f} tok/s (decode {stats(db)[0] / stats(pb)[0]:.2f} of them, "
                    f"at most {stats(pb)[0] / stats(d)[0]:.1f}x this batch 1)"
                )
                if i == 0:  # the float32 model: against the Gemm op at batch b over its bytes
                    cb = [x[b] for x in bc]
                    print(
                        f"{'  batch ' + b + ' (aggregate)':<34}{fmt(db)}{stats(db)[0] / stats(cb)[0]:>11.2f}{fmt(cb)}"
                        f"{'':>12}   {stats(db)[0] / stats(d)[0]:.1f}x batch 1 (the ceiling op: "
                        f"{stats(cb)[0] / stats([x['1'] for x in bc])[0]:.1f}x its batch 1){bound}"
                    )
                else:
                    print(
                        f"{'  batch ' + b + ' (aggregate)':<34}{fmt(db)}{'':>11}{'':>20}{'':>12}"
                        f"   {stats(db)[0] / stats(d)[0]:.1f}x batch 1, "
                        f"{stats(db)[0] / stats(dec(Path(first).name))[0]:.1f}x {Path(first).name} batch 1{bound}"
                    )
    print(
        "* ratios to BlinkDL's package depend on the machine (memory bandwidth against compute); "
        "the fractions of the ceiling are what carries over"
    )
    print(
        "** paired: batch-1 decode over the ceiling op timed alternately in the model's own process (5 pairs of "
        "16 steps; median of the rounds' medians, min-max): both see the same memory state at the same moment"
    )
    print(
        "*** the step graph's weight-matrix products with their real weights and nothing else, one after another "
        "(scripts/bench_ceiling.py products_model): no graph of separate products runs faster on onnxruntime, so "
        '"decode over them" is the cost of everything else, and they over the ceiling the cost of many small products'
    )
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"machine": machine(), "threads": T, "rounds": a.rounds, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
