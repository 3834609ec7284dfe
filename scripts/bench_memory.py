"""Peak memory and speed of a Session, one fresh process per measurement (issue 11 item 9).

For each model and session mode, a child process: imports the runtime (baseline RSS), opens a Session,
decodes (peak RSS after decode), prefills (peak RSS after prefill too), and times both. Weights = the
bytes of the step graph's file plus its external data. Prints a table; --json writes the rows.

    python scripts/bench_memory.py build/r169-f32.onnx build/r169-int8.onnx --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import numpy as np
import onnxruntime  # noqa: F401 - in the baseline: its own code is not the model's memory
import rwkv_runtime
from rwkv_runtime.bench import peak_rss_mb

def rss_now():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

path, mode, threads, steps, plen = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
base = rss_now()
kw = {"threads": threads}
if mode == "low_memory":
    kw["low_memory"] = True
elif mode == "step":
    kw["decode_graph"] = "step"  # the step graph decodes in a second session (the layout before one-session)
t0 = time.perf_counter()
s = rwkv_runtime.Session(path, **kw)
load_s = time.perf_counter() - t0
loaded = rss_now()
rng = np.random.default_rng(0)
ids = rng.integers(0, s.vocab_size, size=steps + 4)
st = s.new_state(1)
for t in ids[:4]:
    _, st = s.step(np.array([t]), st)
t0 = time.perf_counter()
for t in ids[4:]:
    _, st = s.step(np.array([t]), st)
dec = steps / (time.perf_counter() - t0)
peak_dec = peak_rss_mb()
p = rng.integers(0, s.vocab_size, size=(1, plen))
s.prefill(p[:, :8])
t0 = time.perf_counter()
s.prefill(p)
pre = plen / (time.perf_counter() - t0)
print(json.dumps({"base_mb": base, "load_s": load_s, "loaded_mb": loaded, "end_mb": rss_now(), "decode_tps": dec, "peak_decode_mb": peak_dec,
                  "prefill_tps": pre, "peak_prefill_mb": peak_rss_mb()}))
"""

# rwkv.cpp on the same checkpoint, measured the same way (its Python wrapper over librwkv.so): the
# peer for "weights held once" (issue 11 item 9); given with --rwkvcpp ROOT --rwkvcpp-model FILE
CHILD_RWKVCPP = r"""
import json, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1] + "/python")
from rwkv_cpp import rwkv_cpp_model, rwkv_cpp_shared_library
from rwkv_runtime.bench import peak_rss_mb

def rss_now():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

root, lib_path, path, threads, steps, plen = sys.argv[1:4] + [int(x) for x in sys.argv[4:7]]
lib = rwkv_cpp_shared_library.RWKVSharedLibrary(lib_path)
base = rss_now()
t0 = time.perf_counter()
m = rwkv_cpp_model.RWKVModel(lib, path, thread_count=threads)
load_s = time.perf_counter() - t0
loaded = rss_now()
ids = np.random.default_rng(0).integers(0, m.n_vocab, size=max(steps + 4, plen)).tolist()
logits, st_a = m.eval(ids[0], None, use_numpy=True)
st_b = st_a.copy()  # two state buffers, ping-pong (as rwkv.cpp's own examples)
for i, t in enumerate(ids[1:4 + steps], start=1):
    if i == 4:  # three warm-up tokens, then the timed ones
        t0 = time.perf_counter()
    m.eval(t, st_a, st_b, logits, use_numpy=True)
    st_a, st_b = st_b, st_a
dec = steps / (time.perf_counter() - t0)
peak_dec = peak_rss_mb()
t0 = time.perf_counter()
m.eval_sequence_in_chunks(ids[:plen], None, chunk_size=min(plen, 128), use_numpy=True)
pre = plen / (time.perf_counter() - t0)
print(json.dumps({"base_mb": base, "load_s": load_s, "loaded_mb": loaded, "end_mb": rss_now(), "decode_tps": dec,
                  "peak_decode_mb": peak_dec, "prefill_tps": pre, "peak_prefill_mb": peak_rss_mb()}))
"""


def weights_mb(path: Path) -> float:
    """The step graph's file plus its external data (the exporter names it MODEL.onnx.data)."""
    data = path.with_name(path.name + ".data")
    return (path.stat().st_size + (data.stat().st_size if data.is_file() else 0)) / 2**20


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument(
        "--modes",
        default="default",
        help="comma-separated: default (one session), step (decode_graph='step': two sessions), low_memory",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds (medians are reported)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--rwkvcpp", type=Path, help="an rwkv.cpp checkout with build/librwkv.so (docs/benchmarks.md)")
    ap.add_argument(
        "--rwkvcpp-model",
        type=Path,
        action="append",
        default=[],
        help="an rwkv.cpp model file (FP32/Q8_0/Q4_0 of the same checkpoint); repeatable",
    )
    a = ap.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {a.threads} threads; python {platform.python_version()}"
    )
    rows = []
    for r in range(a.rounds):
        for m in a.models:
            for mode in a.modes.split(","):
                out = subprocess.run(
                    [sys.executable, "-c", CHILD, str(m), mode, str(a.threads), str(a.steps), str(a.prefill)],
                    capture_output=True,
                    text=True,
                    timeout=900,
                )
                if out.returncode:
                    print(f"{m.name} {mode}: failed: {out.stderr.strip().splitlines()[-1:]}")
                    continue
                d = json.loads(out.stdout.strip().splitlines()[-1])
                d.update(model=m.name, mode=mode, round=r, weights_mb=weights_mb(m))
                rows.append(d)
        for m in a.rwkvcpp_model if a.rwkvcpp else []:
            out = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    CHILD_RWKVCPP,
                    str(a.rwkvcpp),
                    str(a.rwkvcpp / "build" / "librwkv.so"),
                    str(m),
                    str(a.threads),
                    str(a.steps),
                    str(a.prefill),
                ],
                capture_output=True,
                text=True,
                timeout=900,
            )
            if out.returncode:
                print(f"{m.name} rwkv.cpp: failed: {out.stderr.strip().splitlines()[-1:]}")
                continue
            d = json.loads(out.stdout.strip().splitlines()[-1])
            d.update(model=m.name[-24:], mode="rwkv.cpp", round=r, weights_mb=m.stat().st_size / 2**20)
            rows.append(d)
    print(
        f"{'model':<16}{'mode':<12}{'weights MB':>11}{'base MB':>9}{'loaded x w':>11}{'peak dec MB':>12}{'x w':>6}"
        f"{'peak pre MB':>12}{'x w':>6}{'end x w':>8}{'dec tok/s':>10}{'pre tok/s':>10}"
    )
    for d in rows:
        w = d["weights_mb"]
        print(
            f"{d['model']:<16}{d['mode']:<12}{w:>11.0f}{d['base_mb']:>9.0f}{(d['loaded_mb'] - d['base_mb']) / w:>11.2f}"
            f"{d['peak_decode_mb']:>12.0f}{(d['peak_decode_mb'] - d['base_mb']) / w:>6.2f}{d['peak_prefill_mb']:>12.0f}"
            f"{(d['peak_prefill_mb'] - d['base_mb']) / w:>6.2f}{(d['end_mb'] - d['base_mb']) / w:>8.2f}"
            f"{d['decode_tps']:>10.1f}{d['prefill_tps']:>10.1f}"
        )
    print(
        "x w = (RSS - RSS after importing numpy, onnxruntime and the runtime) / weights; 'loaded' and 'end' are the "
        "resident size after opening the session and at the end, 'peak' the process's high-water mark"
    )
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
