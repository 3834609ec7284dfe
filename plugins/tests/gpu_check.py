#!/usr/bin/env python3
"""The one GPU check: the RWKV-4/5/6/7 WKV kernels, the TensorRT plugin's enqueue(), and the CUDA side
of rwkv_runtime's TensorRT backend (cuda.core) -- none of it needs TensorRT itself.

On a machine with a CUDA GPU, nvcc, numpy and torch or CuPy:

    python plugins/tests/gpu_check.py                 # compiles the kernels for this GPU, then checks
    python plugins/tests/gpu_check.py --lib k4.so --head-lib kh.so   # prebuilt kernel libraries
    TENSORRT_INCLUDE_DIR=/path/to/TensorRT/include python plugins/tests/gpu_check.py
        # additionally builds librwkv_trt_plugins.so and runs its IPluginV3 enqueue() on the GPU for
        # every op through a stand-in libnvinfer (mock_nvinfer.cpp): headers only, still no TensorRT
    python plugins/tests/gpu_check.py --emulate       # no GPU: the WKV5/6/7 part only, with the
        # kernels run on the CPU by wkvhead_emulator.cpp (a dry run of this script)

WKV4: WKV4 (T=1) and WKV4Seq (T in 1, 7, 64), float32 and float16, B in 1, 3, 8, C in 64, 768,
against numpy (float32 mirror of the formulas, and float64).
WKV5/6/7: each op (step: T=1; Seq: T in 1, 7, 64) for float32, float16 and (WKV6/7) float16 with a
float32 decay w, B in 1, 3, 8, head size 64 (4 heads); plus head sizes 8, 16, 32, 48, 128 (the
generic and the other register paths), a long sequence, T = 0, outputs aliasing inputs and a
misaligned state (scalar state loads), against numpy (float32 mirror and float64).
cuda.core (when `cuda-core` + `cuda-bindings` are installed): the TensorRT backend's memory module on
the real device, no stand-in -- host <-> device copies through pinned and pageable memory at odd sizes
and offsets, the state-set pool alternating between two addresses in a step loop and never handing
out a held set, and a CUDA graph captured with cuda.core's GraphBuilder (pinned copy in, device copy,
pinned copy out) replayed with new data.
Prints tables and exits 1 if anything fails (2 if it cannot run at all).
With TensorRT installed: tests/tensorrt/test_tensorrt.py's real-engine tests (plain and plugin mode, CUDA graphs on
and off, against BlinkDL's logits and onnxruntime); set TENSORRT_INCLUDE_DIR so the plugin is built too.
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
import wkvhead_reference as href  # noqa: E402


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


# -- RWKV-4 ---------------------------------------------------------------------------------------------
def wkv4_rows(lib, backend, rng):
    rows = []
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
    print(f"\ntolerances (relative to max(1, |ref|)): y {ref.TOL_Y[np.dtype(np.float32)]:.0e} (f32) / "
          f"{ref.TOL_Y[np.dtype(np.float16)]:.0e} (f16), state {ref.TOL_STATE:.0e}, vs float64 {ref.TOL_F64:.0e}")
    return sum(not r[6] for r in rows)


# -- RWKV-5/6/7 -----------------------------------------------------------------------------------------
DTYPES = {"f32": (np.float32, None), "f16": (np.float16, None), "f16/w32": (np.float16, np.float32)}


def head_cases():
    """(op, dtype key, B, T, H, N, note) of the table."""
    cases = []
    for op in href.OP_TYPES:
        fam = href.family(op)
        Ts = (1, 7, 64) if op.endswith("Seq") else (1,)
        for dkey in DTYPES:
            if dkey == "f16/w32" and not href.OPS[fam].w_arg:
                continue
            for B in (1, 3, 8):
                for T in Ts:
                    cases.append((op, dkey, B, T, 4, 64, ""))
        seq = op.endswith("Seq")
        for N, H in ((8, 8), (16, 4), (32, 2), (48, 2), (128, 1)):  # other register sizes + generic path
            cases.append((op, "f32", 3, 7 if seq else 1, H, N, "register path" if N in href.REGISTER_SIZES
                          else "generic path"))
        if seq:
            cases.append((op, "f16", 2, 256, 2, 64, "long sequence"))
            cases.append((op, "f32", 1, 64, 1, 256, "generic path, N=256"))
    return cases


def run_case(lib, backend, op, dkey, B, T, H, N, rng):
    fam = href.family(op)
    act, wd = DTYPES[dkey]
    ins = href.random_case(rng, fam, B, T, H, N, act, wd)
    got = href.run_device(lib, backend, fam, ins)
    errs = href.compare(fam, got, ins)
    finite = all(np.isfinite(np.asarray(g, np.float64)).all() for g in got)
    return errs, href.within(errs, act) and finite


def head_special_rows(lib, backend, rng):
    """T = 0, aliasing, misaligned state: (op, dtype, B, T, H, N, errs, ok, note)."""
    rows = []
    for fam in href.OPS:
        op = fam + "Seq"
        # T = 0: the state is copied through.
        ins = href.random_case(rng, fam, 2, 0, 2, 64, np.float32)
        y, s = href.run_device(lib, backend, fam, ins)
        rows.append((op, "f32", 2, 0, 2, 64, {}, y.shape == (2, 0, 2, 64) and np.array_equal(s, ins["state"]),
                     "T=0: state passed through"))
        # Outputs aliasing inputs: y over r, state_out over state.
        for N in (64, 48):
            ins = href.random_case(rng, fam, 2, 5, 2, N, np.float16)
            want = href.run_device(lib, backend, fam, ins)
            dev = {n: backend.to_device(ins[n]) for n in href.OPS[fam].inputs}
            rc = getattr(lib, f"rwkv{fam.capitalize()}Forward")(
                backend.stream(), *href.size_args(fam, ins), *(dev[n][1] for n in href.OPS[fam].inputs),
                dev["r"][1], dev["state"][1])
            backend.synchronize()
            ok = rc == 0 and np.array_equal(backend.to_host(dev["r"][0]), want[0]) and \
                np.array_equal(backend.to_host(dev["state"][0]), want[1])
            rows.append((op, "f16", 2, 5, 2, N, {}, ok, "y aliases r, state_out aliases state"))
        # A state 4 bytes off 16-byte alignment: the scalar state loads/stores.
        ins = href.random_case(rng, fam, 2, 5, 2, 64, np.float32)
        want = href.run_device(lib, backend, fam, ins)
        n_state = ins["state"].size
        buf_in = backend.to_device(np.concatenate([[0.0], ins["state"].ravel(), [0.0]]).astype(np.float32))
        buf_out = backend.empty((n_state + 2,), np.float32)
        dev = {n: backend.to_device(ins[n]) for n in href.OPS[fam].inputs if n != "state"}
        y = backend.empty(ins["r"].shape, np.float32)
        ptrs = [dev[n][1] if n != "state" else buf_in[1] + 4 for n in href.OPS[fam].inputs]
        rc = getattr(lib, f"rwkv{fam.capitalize()}Forward")(backend.stream(), *href.size_args(fam, ins), *ptrs, y[1],
                                                            buf_out[1] + 4)
        backend.synchronize()
        s = backend.to_host(buf_out[0])[1:-1].reshape(ins["state"].shape)
        ok = rc == 0 and np.array_equal(backend.to_host(y[0]), want[0]) and np.array_equal(s, want[1])
        rows.append((op, "f32", 2, 5, 2, 64, {}, ok, "state misaligned by 4 bytes (same result)"))
    # Argument checks.
    ins = href.random_case(rng, "WKV7", 1, 1, 1, 64, np.float32)
    bad = [lib.rwkvWkv7Forward(backend.stream(), 1, 1, 1, 2048, 0, 0, *([None] * 9)),   # N > 1024
           lib.rwkvWkv7Forward(backend.stream(), 1, 1, 1, 64, 0, 1, *([None] * 9)),     # f16 w with f32 act
           lib.rwkvWkv5Forward(backend.stream(), 1, 1, 1, 64, 2, *([None] * 8))]        # bad dtype
    rows.append(("WKV*", "-", 1, 1, 1, 64, {}, all(rc == 1 for rc in bad), "invalid arguments: cudaErrorInvalidValue"))
    return rows


def head_section(lib, backend, rng, timings):
    rows = []
    for op, dkey, B, T, H, N, note in head_cases():
        try:
            errs, ok = run_case(lib, backend, op, dkey, B, T, H, N, rng)
        except Exception as e:  # report and keep going
            errs, ok, note = {}, False, f"{type(e).__name__}: {e}"
        rows.append((op, dkey, B, T, H, N, errs, ok, note))
    try:
        rows += head_special_rows(lib, backend, rng)
    except Exception as e:
        rows.append(("WKV*", "-", 0, 0, 0, 0, {}, False, f"special cases: {type(e).__name__}: {e}"))

    print()
    print(f"{'op':8} {'dtype':8} {'B':>2} {'T':>4} {'H':>2} {'N':>4}  {'y vs f32':>9} {'state vs f32':>12} "
          f"{'vs f64':>9}  result")
    for op, dt, B, T, H, N, errs, ok, note in rows:
        e = lambda key: f"{errs[key]:.1e}" if key in errs else "-"  # noqa: E731
        print(f"{op:8} {dt:8} {B:>2} {T:>4} {H:>2} {N:>4}  {e('y_vs_f32'):>9} {e('state_vs_f32'):>12} "
              f"{e('vs_f64'):>9}  {'PASS' if ok else 'FAIL'} {note}")
    print(f"\ntolerances (relative to max(1, max |ref|) of each tensor): y {href.TOL_Y[href.F32]:.0e} (f32) / "
          f"{href.TOL_Y[href.F16]:.0e} (f16), state {href.TOL_STATE:.0e}, vs float64 {href.TOL_F64:.0e}")

    if timings:
        # Informational timings (wall clock around launch + synchronize), float16 activations.
        for fam in href.OPS:
            for B, T, H, N in ((1, 1, 32, 64), (8, 1, 32, 64), (1, 512, 32, 64), (8, 64, 32, 64)):
                ins = href.random_case(rng, fam, B, T, H, N, np.float16, warmup=0)
                dev = [backend.to_device(ins[n]) for n in href.OPS[fam].inputs]
                y = backend.empty(ins["r"].shape, np.float16)
                s = backend.empty(ins["state"].shape, np.float32)
                f = getattr(lib, f"rwkv{fam.capitalize()}Forward")
                ints = href.size_args(fam, ins)

                def call():
                    f(backend.stream(), *ints, *(p for _, p in dev), y[1], s[1])
                    backend.synchronize()

                print(f"timing {fam} f16 B={B} T={T} H={H} N={N}: {time_call(call, reps=20):.1f} us per call "
                      "(launch + sync)")
    return sum(not r[7] for r in rows)


def cuda_core_section(rng) -> int:
    """The TensorRT backend's CUDA side (rwkv_runtime/tensorrt/memory.py) on the real device."""
    sys.path.insert(0, str(REPO))
    try:
        from rwkv_runtime.errors import BackendUnavailable
        from rwkv_runtime.tensorrt import loader, memory
    except ImportError as e:
        print(f"\n(cuda.core check skipped: rwkv_runtime not importable: {e})")
        return 0
    try:
        cc = loader.import_cuda_core()
        cuda = memory.Cuda(cc)
    except BackendUnavailable as e:
        print(f"\n(cuda.core check skipped: {e})")
        return 0
    print("\ncuda.core (rwkv_runtime.tensorrt.memory) on the device:")
    failed = 0

    def check(ok, what):
        nonlocal failed
        print(f"{'ok  ' if ok else 'FAIL'}: {what}")
        failed += not ok

    # copies: pageable and pinned host memory, odd sizes, offsets inside a device buffer
    for n in (1, 7, 4096 + 3, 1 << 20):
        a = rng.standard_normal(n).astype(np.float32)
        dev = cuda.allocate(a.nbytes + 256)
        cuda.copy(int(dev.handle) + 256, a.ctypes.data, a.nbytes)
        back = np.empty_like(a)
        cuda.copy(back.ctypes.data, int(dev.handle) + 256, a.nbytes)
        cuda.sync()
        pin = memory.Pinned(cuda, a.nbytes)
        pin.view(a.shape, a.dtype)[:] = a * 2
        cuda.copy(int(dev.handle), int(pin.buf.handle), a.nbytes)
        cuda.copy(back.ctypes.data, int(dev.handle), a.nbytes)
        cuda.sync()
        check(np.array_equal(back, a * 2), f"copy round trip, {n} float32 (pageable and pinned, offset 256)")
        pin.close()
        dev.close(cuda.stream)

    # the state-set pool: a step loop alternates two addresses; a held set is never handed out
    pool = memory.Pool(cuda, keep=4)
    held, addrs = pool.take(1000), []
    prev = pool.take(1000)
    for _ in range(10):
        nxt = pool.take(1000)
        addrs.append(nxt.ptr)
        prev = nxt  # the old set goes back as its last reference goes
    check(len(set(addrs[2:])) == 2, f"step loop alternates between two sets ({len(set(addrs))} addresses seen)")
    check(held.ptr not in addrs, "a held set is never handed out again")
    del prev, held
    pool.close()

    # a CUDA graph captured through cuda.core's GraphBuilder, replayed with new input
    n = 257
    pin_in, pin_out = memory.Pinned(cuda, 4 * n), memory.Pinned(cuda, 4 * n)
    d1, d2 = cuda.allocate(4 * n), cuda.allocate(4 * n)
    graph = None
    try:
        gb = cuda.stream.create_graph_builder()
        gb.begin_building("thread_local")
        cuda.copy(int(d1.handle), int(pin_in.buf.handle), 4 * n, gb.stream)
        cuda.copy(int(d2.handle), int(d1.handle), 4 * n, gb.stream)
        cuda.copy(int(pin_out.buf.handle), int(d2.handle), 4 * n, gb.stream)
        gb.end_building()
        graph = gb.complete()
        ok = True
        for rep in range(3):
            x = rng.standard_normal(n).astype(np.float32)
            pin_in.view((n,), np.float32)[:] = x
            graph.launch(cuda.stream)
            cuda.sync()
            ok = ok and np.array_equal(pin_out.view((n,), np.float32), x)
        check(ok, "GraphBuilder capture (pinned in, device copy, pinned out) replays with new data, 3 launches")
    except Exception as e:  # noqa: BLE001 - report, do not crash the whole check
        check(False, f"GraphBuilder capture: {type(e).__name__}: {e}")
    finally:
        if graph is not None:
            graph.close()
        for b in (d1, d2):
            b.close(cuda.stream)
        pin_in.close()
        pin_out.close()
    cuda.close()
    return failed


def real_tensorrt_section(plugin=None) -> int:
    """With TensorRT installed: the real engines (plain and plugin mode, with and without CUDA graphs)
    against BlinkDL's logits and onnxruntime -- tests/tensorrt/test_tensorrt.py's device tests."""
    if importlib.util.find_spec("tensorrt") is None:
        print("\n(real TensorRT engines skipped: tensorrt is not installed)")
        return 0
    print("\nreal TensorRT engines (pytest tests/tensorrt/test_tensorrt.py -k 'blinkdl or batch_3'):")
    r = subprocess.run([sys.executable, "-m", "pytest", str(REPO / "tests" / "tensorrt" / "test_tensorrt.py"), "-q", "-rs",
                        "-p", "no:cacheprovider", "-k", "blinkdl or batch_3"], cwd=REPO, capture_output=True,
                       text=True, timeout=900, env={**os.environ, **({"RWKV_TRT_PLUGIN": str(plugin)} if plugin else {})})
    print((r.stdout + r.stderr)[-3000:])
    return 0 if r.returncode == 0 else 1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lib", type=Path, help="prebuilt librwkv_wkv4_kernels.so (default: compile now)")
    ap.add_argument("--head-lib", type=Path, help="prebuilt librwkv_wkvhead_kernels.so (default: compile now)")
    ap.add_argument("--arch", help="CUDA architecture to compile for (default: the GPU's, e.g. 90)")
    ap.add_argument("--out-dir", type=Path, help="where to compile (default: a temporary directory)")
    ap.add_argument("--trt-include", type=Path, help="TensorRT include dir (default: $TENSORRT_INCLUDE_DIR)")
    ap.add_argument("--emulate", action="store_true",
                    help="no GPU: run the WKV5/6/7 kernels on the CPU (wkvhead_emulator.cpp); skips WKV4 and the "
                         "plugin")
    args = ap.parse_args(argv)
    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="rwkv_gpu_check_"))
    rng = np.random.default_rng(2024)

    if args.emulate:
        lib = href.kernels_library(load_trt_plugin_module().compile_kernel_emulator(out_dir))
        print("device: none; WKV5/6/7 kernels emulated on the CPU (wkvhead_emulator.cpp)")
        failed = head_section(lib, href.HostBackend(), rng, timings=False)
        print(f"\n{'ALL PASSED' if failed == 0 else f'{failed} FAILED'} (emulated)")
        return 1 if failed else 0

    backend, reason = ref.cuda_backend()
    if backend is None:
        print(f"gpu_check: cannot run: {reason}")
        return 2
    tp = load_trt_plugin_module()
    arch = args.arch or str(backend.arch())
    print(f"device: {backend.device_name()} (sm_{backend.arch()}), buffers via {backend.name}")
    t0 = time.perf_counter()
    lib_path = args.lib or tp.compile_kernels_only(out_dir, cuda_architectures=arch)
    head_path = args.head_lib or tp.compile_kernels(out_dir, "wkvhead", cuda_architectures=arch)
    if not (args.lib and args.head_lib):
        print(f"compiled kernels for sm_{arch} in {time.perf_counter() - t0:.1f} s")
    lib = ref.kernels_library(lib_path)
    hlib = href.kernels_library(head_path)

    failed = wkv4_rows(lib, backend, rng)
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

    failed += head_section(hlib, backend, rng, timings=True)

    # Optional: the TensorRT plugin's enqueue() on the GPU, through the stand-in libnvinfer.
    plugin_lib = None
    env_include = os.environ.get("TENSORRT_INCLUDE_DIR")
    include = args.trt_include or (Path(env_include) if env_include else None)
    if include is not None:
        import mock_build

        print(f"\nplugin enqueue() check with TensorRT headers {include}:")
        try:
            h = mock_build.build_harness(tp, include, out_dir / "trt", cuda_architectures=arch)
            plugin_lib = h["plugin"]
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

    failed += cuda_core_section(rng)
    failed += real_tensorrt_section(plugin_lib)

    print(f"\n{'ALL PASSED' if failed == 0 else f'{failed} FAILED'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
