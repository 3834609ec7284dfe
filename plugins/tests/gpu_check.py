#!/usr/bin/env python3
"""One-shot GPU check of the RWKV-4 WKV kernels (no TensorRT needed).

On a machine with a CUDA GPU, nvcc, numpy and torch or CuPy:

    python plugins/tests/gpu_check.py                 # compiles the kernels for this GPU, then checks
    python plugins/tests/gpu_check.py --lib path.so   # checks a prebuilt librwkv_wkv4_kernels.so
    TENSORRT_INCLUDE_DIR=/path/to/TensorRT/include python plugins/tests/gpu_check.py
        # additionally builds librwkv_trt_plugins.so and runs its IPluginV3 enqueue() on the GPU
        # through a stand-in libnvinfer (mock_nvinfer.cpp): headers only, still no TensorRT

Runs WKV4 (one token, T=1) and WKV4Seq (T in 1, 7, 64) for float32 and float16, B in 1, 3, 8,
C in 64, 768, against numpy (float32 mirror of the formulas, and float64); prints a table and
exits 1 if anything fails (2 if it cannot run at all).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
import wkv4_reference as ref  # noqa: E402


def load_trt_plugin_module():
    """rwkv_export.trt_plugin, installed or straight from the checkout."""
    try:
        from rwkv_export import trt_plugin

        return trt_plugin
    except ImportError:
        spec = importlib.util.spec_from_file_location("trt_plugin", REPO / "exporter" / "trt_plugin.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod


def time_call(fn, reps=50):
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e6


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lib", type=Path, help="prebuilt librwkv_wkv4_kernels.so (default: compile now)")
    ap.add_argument("--arch", help="CUDA architecture to compile for (default: the GPU's, e.g. 90)")
    ap.add_argument("--out-dir", type=Path, help="where to compile (default: a temporary directory)")
    ap.add_argument("--trt-include", type=Path, help="TensorRT include dir (default: $TENSORRT_INCLUDE_DIR)")
    args = ap.parse_args(argv)

    backend, reason = ref.cuda_backend()
    if backend is None:
        print(f"gpu_check: cannot run: {reason}")
        return 2
    tp = load_trt_plugin_module()
    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="rwkv_gpu_check_"))
    arch = args.arch or str(backend.arch())
    print(f"device: {backend.device_name()} (sm_{backend.arch()}), buffers via {backend.name}")
    if args.lib:
        lib_path = args.lib
    else:
        t0 = time.perf_counter()
        lib_path = tp.compile_kernels_only(out_dir, cuda_architectures=arch)
        print(f"compiled {lib_path} for sm_{arch} in {time.perf_counter() - t0:.1f} s")
    lib = ref.kernels_library(lib_path)

    rows = []
    rng = np.random.default_rng(2024)
    for op, Ts in (("WKV4", (1,)), ("WKV4Seq", (1, 7, 64))):
        for dtype in (np.float32, np.float16):
            for B in (1, 3, 8):
                for T in Ts:
                    for C in (64, 768):
                        k, v, w, u, state = ref.random_case(rng, B, T, C, dtype)
                        try:
                            got = ref.run_device(lib, backend, k, v, w, u, state)
                            errs = ref.compare(got, k, v, w, u, state)
                            ok = ref.within(errs, dtype)
                            note = ""
                        except Exception as e:  # report and keep going
                            errs, ok, note = {}, False, f"{type(e).__name__}: {e}"
                        rows.append((op, np.dtype(dtype).name, B, T, C, errs, ok, note))

    # Edge cases: zero tokens passes the state through; large keys stay finite.
    k, v, w, u, state = ref.random_case(rng, 2, 0, 64, np.float32)
    got = ref.run_device(lib, backend, k, v, w, u, state)
    ok = got[0].shape == (2, 0, 64) and all(np.array_equal(g, s) for g, s in zip(got[1:], state))
    rows.append(("WKV4Seq", "float32", 2, 0, 64, {}, ok, "T=0: state passed through"))
    k, v, w, u, state = ref.random_case(rng, 2, 256, 768, np.float32, k_scale=8.0)
    got = ref.run_device(lib, backend, k, v, w, u, state)
    errs = ref.compare(got, k, v, w, u, state)
    rows.append(("WKV4Seq", "float32", 2, 256, 768, errs,
                 ref.within(errs, np.float32) and all(np.isfinite(g).all() for g in got), "k ~ N(0, 8)"))

    print()
    print(f"{'op':8} {'dtype':8} {'B':>2} {'T':>4} {'C':>4}  {'y vs f32':>9} {'state vs f32':>12} {'vs f64':>9}  result")
    for op, dt, B, T, C, errs, ok, note in rows:
        e = lambda key: f"{errs[key]:.1e}" if key in errs else "-"  # noqa: E731
        print(f"{op:8} {dt:8} {B:>2} {T:>4} {C:>4}  {e('y_vs_f32'):>9} {e('state_vs_f32'):>12} {e('vs_f64'):>9}  "
              f"{'PASS' if ok else 'FAIL'} {note}")
    failed = sum(not r[6] for r in rows)
    print(f"\ntolerances (relative to max(1, |ref|)): y {ref.TOL_Y[np.dtype(np.float32)]:.0e} (f32) / "
          f"{ref.TOL_Y[np.dtype(np.float16)]:.0e} (f16), state {ref.TOL_STATE:.0e}, vs float64 {ref.TOL_F64:.0e}")

    # Informational timings (wall clock around launch + synchronize).
    for B, T, C in ((1, 1, 768), (8, 64, 768)):
        k, v, w, u, state = ref.random_case(rng, B, T, C, np.float16)
        ins = [backend.to_device(a) for a in (k, v, w, u, *state)]
        y = backend.empty(k.shape, k.dtype)
        outs = [backend.empty((B, C), np.float32) for _ in range(3)]

        def call():
            lib.rwkvWkv4Forward(backend.stream(), B, T, C, 1, *(p for _, p in ins), y[1], *(p for _, p in outs))
            backend.synchronize()

        print(f"timing f16 B={B} T={T} C={C}: {time_call(call):.1f} us per call (launch + sync)")

    # Optional: the TensorRT plugin's enqueue() on the GPU, through the stand-in libnvinfer.
    env_include = os.environ.get("TENSORRT_INCLUDE_DIR")
    include = args.trt_include or (Path(env_include) if env_include else None)
    if include is not None:
        import mock_build

        print(f"\nplugin enqueue() check with TensorRT headers {include}:")
        try:
            h = mock_build.build_harness(tp, include, out_dir / "trt", cuda_architectures=arch)
            r = subprocess.run([str(h["driver"]), "enqueue-gpu", str(h["plugin"])], capture_output=True, text=True,
                               timeout=300)
            print(r.stdout + r.stderr)
            if r.returncode != 0 or "FAIL" in r.stdout or "skip" in r.stdout:
                failed += 1
        except Exception as e:
            print(f"FAIL: {type(e).__name__}: {e}")
            failed += 1
    else:
        print("\n(plugin enqueue() check skipped: set TENSORRT_INCLUDE_DIR or --trt-include)")

    print(f"\n{'ALL PASSED' if failed == 0 else f'{failed} FAILED'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
