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
Kernel bandwidth: each WKV op at a bandwidth-bound shape, bytes moved per call over the time per call,
as a fraction of the same-run ceiling (a device-to-device copy of 512 MiB through torch/CuPy) and of the
device's theoretical HBM bandwidth where CuPy can read it.
With TensorRT installed: tests/tensorrt/test_tensorrt.py's real-engine tests (plain and plugin mode, CUDA graphs on
and off, against BlinkDL's logits and onnxruntime); set TENSORRT_INCLUDE_DIR so the plugin is built too.

Every check ends PASSED, FAILED or SKIPPED (with its reason). The exit status is 0 only when every check
that was asked for PASSED: a check that could not run (no TensorRT, no headers, no cuda.core) fails the
run unless it was excluded with --skip (e.g. ``--skip tensorrt-engines,plugin-enqueue`` on a machine
without TensorRT). 2: nothing could run (no CUDA device). One JSON and one text report are written to
--report-dir (default build/gpu-check/). bf16 is not a kernel dtype: bf16 exports keep the WKV in
float32 (exporter/arch/graph.py's precision policy), so the float32 rows cover them.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
import build_helpers  # noqa: E402
import wkv4_reference as ref  # noqa: E402
import wkvhead_reference as href  # noqa: E402


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
    rows.append(
        (
            "WKV4Seq",
            "float32",
            2,
            256,
            768,
            errs,
            ref.within(errs, np.float32) and all(np.isfinite(g).all() for g in got),
            "k ~ N(0, 8)",
        )
    )

    print()
    print(
        f"{'op':8} {'dtype':8} {'B':>2} {'T':>4} {'C':>4}  {'y vs f32':>9} {'state vs f32':>12} {'vs f64':>9}  result"
    )
    for op, dt, B, T, C, errs, ok, note in rows:
        e = lambda key: f"{errs[key]:.1e}" if key in errs else "-"  # noqa: E731
        print(
            f"{op:8} {dt:8} {B:>2} {T:>4} {C:>4}  {e('y_vs_f32'):>9} {e('state_vs_f32'):>12} {e('vs_f64'):>9}  "
            f"{'PASS' if ok else 'FAIL'} {note}"
        )
    print(
        f"\ntolerances (relative to max(1, |ref|)): y {ref.TOL_Y[np.dtype(np.float32)]:.0e} (f32) / "
        f"{ref.TOL_Y[np.dtype(np.float16)]:.0e} (f16), state {ref.TOL_STATE:.0e}, vs float64 {ref.TOL_F64:.0e}"
    )
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
            cases.append(
                (op, "f32", 3, 7 if seq else 1, H, N, "register path" if N in href.REGISTER_SIZES else "generic path")
            )
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
        rows.append(
            (
                op,
                "f32",
                2,
                0,
                2,
                64,
                {},
                y.shape == (2, 0, 2, 64) and np.array_equal(s, ins["state"]),
                "T=0: state passed through",
            )
        )
        # Outputs aliasing inputs: y over r, state_out over state.
        for N in (64, 48):
            ins = href.random_case(rng, fam, 2, 5, 2, N, np.float16)
            want = href.run_device(lib, backend, fam, ins)
            dev = {n: backend.to_device(ins[n]) for n in href.OPS[fam].inputs}
            rc = getattr(lib, f"rwkv{fam.capitalize()}Forward")(
                backend.stream(),
                *href.size_args(fam, ins),
                *(dev[n][1] for n in href.OPS[fam].inputs),
                dev["r"][1],
                dev["state"][1],
            )
            backend.synchronize()
            ok = (
                rc == 0
                and np.array_equal(backend.to_host(dev["r"][0]), want[0])
                and np.array_equal(backend.to_host(dev["state"][0]), want[1])
            )
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
        rc = getattr(lib, f"rwkv{fam.capitalize()}Forward")(
            backend.stream(), *href.size_args(fam, ins), *ptrs, y[1], buf_out[1] + 4
        )
        backend.synchronize()
        s = backend.to_host(buf_out[0])[1:-1].reshape(ins["state"].shape)
        ok = rc == 0 and np.array_equal(backend.to_host(y[0]), want[0]) and np.array_equal(s, want[1])
        rows.append((op, "f32", 2, 5, 2, 64, {}, ok, "state misaligned by 4 bytes (same result)"))
    # Argument checks.
    ins = href.random_case(rng, "WKV7", 1, 1, 1, 64, np.float32)
    bad = [
        lib.rwkvWkv7Forward(backend.stream(), 1, 1, 1, 2048, 0, 0, *([None] * 9)),  # N > 1024
        lib.rwkvWkv7Forward(backend.stream(), 1, 1, 1, 64, 0, 1, *([None] * 9)),  # f16 w with f32 act
        lib.rwkvWkv5Forward(backend.stream(), 1, 1, 1, 64, 2, *([None] * 8)),
    ]  # bad dtype
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
    print(
        f"{'op':8} {'dtype':8} {'B':>2} {'T':>4} {'H':>2} {'N':>4}  {'y vs f32':>9} {'state vs f32':>12} "
        f"{'vs f64':>9}  result"
    )
    for op, dt, B, T, H, N, errs, ok, note in rows:
        e = lambda key: f"{errs[key]:.1e}" if key in errs else "-"  # noqa: E731
        print(
            f"{op:8} {dt:8} {B:>2} {T:>4} {H:>2} {N:>4}  {e('y_vs_f32'):>9} {e('state_vs_f32'):>12} "
            f"{e('vs_f64'):>9}  {'PASS' if ok else 'FAIL'} {note}"
        )
    print(
        f"\ntolerances (relative to max(1, max |ref|) of each tensor): y {href.TOL_Y[href.F32]:.0e} (f32) / "
        f"{href.TOL_Y[href.F16]:.0e} (f16), state {href.TOL_STATE:.0e}, vs float64 {href.TOL_F64:.0e}"
    )

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

                print(
                    f"timing {fam} f16 B={B} T={T} H={H} N={N}: {time_call(call, reps=20):.1f} us per call "
                    "(launch + sync)"
                )
    return sum(not r[7] for r in rows)


# -- the report -----------------------------------------------------------------------------------------
CHECKS = (
    "compile",
    "wkv4-kernels",
    "wkvhead-kernels",
    "kernel-bandwidth",
    "cuda-core-memory",
    "cuda-core-graph",
    "cuda-core-threads",
    "plugin-enqueue",
    "tensorrt-engines",
)


class Report:
    """Each check's verdict (PASSED / FAILED / SKIPPED + why) and data; printed output is kept too."""

    def __init__(self, requested):
        self.requested = set(requested)
        self.checks: dict = {}
        self.data: dict = {}
        self.text = io.StringIO()

    def say(self, line=""):
        print(line)  # sys.stdout is a _Tee during main(): the text report gets every printed table too

    def verdict(self, name, status, detail=""):
        self.checks[name] = {"status": status, "detail": detail, "requested": name in self.requested}
        self.say(f"[{status}] {name}{': ' + detail if detail else ''}")

    def run(self, name, fn, *args):
        """Runs a check that returns (status, detail); an exception is its FAILED line, never a traceback."""
        if name not in self.requested:
            self.checks[name] = {"status": "NOT REQUESTED", "detail": "excluded with --skip", "requested": False}
            return None
        try:
            status, detail = fn(*args)
        except Exception as e:  # noqa: BLE001 - one line per failed check; the run goes on
            status, detail = (
                "FAILED",
                f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}",
            )
        self.verdict(name, status, detail)
        return status

    def exit_code(self) -> int:
        bad = [n for n, c in self.checks.items() if c["requested"] and c["status"] != "PASSED"]
        return 1 if bad else 0

    def write(self, out_dir: Path, meta: dict, code: int | None = None):
        out_dir.mkdir(parents=True, exist_ok=True)
        summary = {
            st: sorted(n for n, c in self.checks.items() if c["status"] == st)
            for st in ("PASSED", "FAILED", "SKIPPED", "NOT REQUESTED")
        }
        doc = {
            "meta": meta,
            "checks": self.checks,
            "summary": summary,
            "data": self.data,
            "exit_code": self.exit_code() if code is None else code,
        }
        (out_dir / "gpu_check.json").write_text(json.dumps(doc, indent=1, default=str))
        (out_dir / "gpu_check.txt").write_text(self.text.getvalue())


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, s):
        for st in self.streams:
            st.write(s)
        return len(s)

    def flush(self):
        for st in self.streams:
            st.flush()


def import_runtime_tensorrt():
    """rwkv_runtime.tensorrt's loader and memory modules, installed or straight from the checkout (the
    package folder is runtime/, so the checkout root on sys.path is not enough). The checkout's package is
    aliased without running its __init__, which would import onnxruntime (not needed here)."""
    try:
        from rwkv_runtime.tensorrt import loader, memory

        return loader, memory, "installed rwkv_runtime"
    except ImportError:
        for k in [k for k in sys.modules if k == "rwkv_runtime" or k.startswith("rwkv_runtime.")]:
            del sys.modules[k]
    pkg = types.ModuleType("rwkv_runtime")
    pkg.__path__ = [str(REPO / "runtime")]
    sys.modules["rwkv_runtime"] = pkg
    from rwkv_runtime.tensorrt import loader, memory  # noqa: E402 - after the alias

    return loader, memory, f"rwkv_runtime from {REPO / 'runtime'}"


# -- cuda.core: the TensorRT backend's CUDA side ------------------------------------------------------------
class CudaCoreChecks:
    def __init__(self, report: Report, rng):
        self.report, self.rng = report, rng
        self.cuda = self.memory = None
        self.why = None
        try:
            loader, self.memory, where = import_runtime_tensorrt()
            cc = loader.import_cuda_core()
            self.cuda = self.memory.Cuda(cc)
            report.say(f"\ncuda.core checks ({where}):")
        except Exception as e:  # noqa: BLE001 - BackendUnavailable, ImportError: the checks say SKIPPED
            self.why = f"{type(e).__name__}: {e}"

    def _skip(self):
        return "SKIPPED", f"cuda.core backend unavailable ({self.why})"

    def memory_check(self):
        if self.cuda is None:
            return self._skip()
        cuda, memory, fails = self.cuda, self.memory, []
        for n in (1, 7, 4096 + 3, 1 << 20):  # pageable and pinned host memory, odd sizes, offsets
            a = self.rng.standard_normal(n).astype(np.float32)
            dev = cuda.allocate(a.nbytes + 256)
            cuda.copy(int(dev.handle) + 256, a.ctypes.data, a.nbytes)
            back = np.empty_like(a)
            cuda.copy(back.ctypes.data, int(dev.handle) + 256, a.nbytes)
            cuda.sync()
            ok1 = np.array_equal(back, a)
            pin = memory.Pinned(cuda, a.nbytes)
            pin.view(a.shape, a.dtype)[:] = a * 2
            cuda.copy(int(dev.handle), int(pin.buf.handle), a.nbytes)
            cuda.copy(back.ctypes.data, int(dev.handle), a.nbytes)
            cuda.sync()
            if not (ok1 and np.array_equal(back, a * 2)):
                fails.append(f"copy round trip of {n} float32")
            pin.close()
            dev.close(cuda.stream)
        pool = memory.Pool(cuda, keep=4)  # a step loop alternates two sets; a held set is never handed out
        held, addrs = pool.take(1000), []
        prev = pool.take(1000)
        for _ in range(10):
            nxt = pool.take(1000)
            addrs.append(nxt.ptr)
            prev = nxt
        if len(set(addrs[2:])) != 2:
            fails.append(f"step loop saw {len(set(addrs))} addresses, not 2 alternating")
        if held.ptr in addrs:
            fails.append("a held set was handed out again")
        del prev, held
        pool.close()
        return (
            ("FAILED", "; ".join(fails))
            if fails
            else ("PASSED", "copies (pageable, pinned, odd sizes, offset 256) and the double-buffered state-set pool")
        )

    def graph_check(self):
        if self.cuda is None:
            return self._skip()
        cuda, memory, n = self.cuda, self.memory, 257
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
            for _ in range(3):
                x = self.rng.standard_normal(n).astype(np.float32)
                pin_in.view((n,), np.float32)[:] = x
                graph.launch(cuda.stream)
                cuda.sync()
                if not np.array_equal(pin_out.view((n,), np.float32), x):
                    return "FAILED", "a replayed graph returned stale data"
            return (
                "PASSED",
                "GraphBuilder capture (pinned in, device copy, pinned out) replays with new data, 3 launches",
            )
        finally:
            if graph is not None:
                graph.close()
            for b in (d1, d2):
                b.close(cuda.stream)
            pin_in.close()
            pin_out.close()

    def threads_check(self):
        """The Session is created on one thread and stepped on another (the server's scheduler thread):
        every entry point must work from a thread that did not create the context."""
        if self.cuda is None:
            return self._skip()
        cuda, memory = self.cuda, self.memory
        pool = memory.Pool(cuda, keep=2)
        out = {}

        def worker(tag):
            try:
                a = self.rng.standard_normal(4099).astype(np.float32) if tag == 0 else np.arange(4099, dtype=np.float32)
                for _ in range(20):
                    lease = pool.take(a.nbytes)
                    cuda.copy(lease.ptr, a.ctypes.data, a.nbytes)
                    back = np.empty_like(a)
                    cuda.copy(back.ctypes.data, lease.ptr, a.nbytes)
                    cuda.sync()
                    if not np.array_equal(back, a):
                        out[tag] = "wrong data"
                        return
                    del lease  # given back on this thread
                out[tag] = "ok"
            except Exception as e:  # noqa: BLE001
                out[tag] = f"{type(e).__name__}: {e}"

        ts = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        pool.close()
        if out == {0: "ok", 1: "ok"}:
            return "PASSED", "two threads (neither created the context): allocate, copy both ways, sync, give back"
        return "FAILED", f"thread results {out}"

    def close(self):
        if self.cuda is not None:
            self.cuda.close()


# -- bandwidth: the kernels against the device's memory bandwidth ------------------------------------------
def seconds_per_call(backend, fn, reps: int) -> float:
    """Mean seconds of ``fn()`` over ``reps`` calls after one warm-up, the device synchronised around them."""
    fn()
    backend.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    backend.synchronize()
    return (time.perf_counter() - t0) / reps


def copy_ceiling(backend, nbytes=512 << 20, reps=20):
    """GB/s of a device-to-device copy (read + write counted), the same-run ceiling."""
    n = nbytes // 4
    if backend.name == "torch":
        src = backend.mod.empty(n, dtype=backend.mod.float32, device="cuda")
        dst = backend.mod.empty_like(src)
        fn = lambda: dst.copy_(src)  # noqa: E731
    else:
        src = backend.mod.empty(n, dtype=backend.mod.float32)
        dst = backend.mod.empty_like(src)
        fn = lambda: backend.mod.copyto(dst, src)  # noqa: E731
    return 2 * nbytes / seconds_per_call(backend, fn, reps) / 1e9


def theoretical_bandwidth():
    """GB/s from the memory clock and bus width, where CuPy can read them (else None)."""
    try:
        import cupy

        rt = cupy.cuda.runtime
        dev = cupy.cuda.Device().id
        clock_khz = rt.deviceGetAttribute(36, dev)  # cudaDevAttrMemoryClockRate
        bus_bits = rt.deviceGetAttribute(37, dev)  # cudaDevAttrGlobalMemoryBusWidth
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9 if clock_khz and bus_bits else None
    except Exception:  # noqa: BLE001 - informational only
        return None


# bandwidth-bound shapes: (B, T, C, dtype) for WKV4; (B, T, H, N, dtype) for WKV5/6/7 (state 32 MiB per way)
WKV4_BANDWIDTH_CASES = ((256, 1, 4096, np.float32), (64, 256, 2048, np.float16))
HEAD_BANDWIDTH_CASES = ((64, 1, 32, 64, np.float16), (8, 256, 32, 64, np.float16), (64, 1, 32, 64, np.float32))
BANDWIDTH_REPS = 30


def bandwidth_check(report, lib, hlib, backend, rng):
    ceiling = copy_ceiling(backend)
    peak = theoretical_bandwidth()
    report.say(
        f"\nbandwidth ceiling (device-to-device copy, same run): {ceiling:.0f} GB/s"
        + (f"; theoretical HBM {peak:.0f} GB/s" if peak else "; theoretical HBM: unknown (needs CuPy)")
    )
    rows = []

    def timed(fn, reps=BANDWIDTH_REPS):
        return seconds_per_call(backend, fn, reps)

    for B, T, C, dt in WKV4_BANDWIDTH_CASES:
        k, v, w, u, state = ref.random_case(rng, B, T, C, dt, warmup=0)
        ins = [backend.to_device(a) for a in (k, v, w, u, *state)]
        y = backend.empty(k.shape, k.dtype)
        outs = [backend.empty((B, C), np.float32) for _ in range(3)]
        code = 0 if dt == np.float32 else 1
        nbytes = sum(a.nbytes for a in (k, v, w, u, *state)) + k.nbytes + 3 * B * C * 4
        sec = timed(
            lambda: lib.rwkvWkv4Forward(
                backend.stream(), B, T, C, code, *(p for _, p in ins), y[1], *(p for _, p in outs)
            )
        )
        rows.append(("WKV4" + ("Seq" if T > 1 else ""), np.dtype(dt).name, B, T, f"C={C}", nbytes, sec))
    for fam in href.OPS:
        for B, T, H, N, dt in HEAD_BANDWIDTH_CASES:
            ins = href.random_case(rng, fam, B, T, H, N, dt, warmup=0)
            dev = [backend.to_device(ins[n]) for n in href.OPS[fam].inputs]
            yb = backend.empty(ins["r"].shape, dt)
            sb = backend.empty(ins["state"].shape, np.float32)
            f = getattr(hlib, f"rwkv{fam.capitalize()}Forward")
            ints = href.size_args(fam, ins)
            nbytes = sum(a.nbytes for a in ins.values()) + ins["r"].nbytes + ins["state"].nbytes
            sec = timed(lambda: f(backend.stream(), *ints, *(p for _, p in dev), yb[1], sb[1]))
            rows.append((fam + ("Seq" if T > 1 else ""), np.dtype(dt).name, B, T, f"H={H} N={N}", nbytes, sec))
    report.say(
        f"{'op':8} {'dtype':8} {'B':>3} {'T':>4} {'shape':>11} {'MB/call':>8} {'us/call':>8} {'GB/s':>7} "
        f"{'of copy':>7} {'of HBM':>7}"
    )
    data = []
    for op, dt, B, T, shape, nbytes, sec in rows:
        gbs = nbytes / sec / 1e9
        report.say(
            f"{op:8} {dt:8} {B:>3} {T:>4} {shape:>11} {nbytes / 1e6:>8.1f} {sec * 1e6:>8.1f} {gbs:>7.0f} "
            f"{gbs / ceiling:>7.2f} {(f'{gbs / peak:.2f}' if peak else '-'):>7}"
        )
        data.append(
            {
                "op": op,
                "dtype": dt,
                "B": B,
                "T": T,
                "shape": shape,
                "bytes": nbytes,
                "seconds": sec,
                "GBps": gbs,
                "of_copy_ceiling": gbs / ceiling,
                "of_theoretical": gbs / peak if peak else None,
            }
        )
    report.data["bandwidth"] = {"copy_ceiling_GBps": ceiling, "theoretical_GBps": peak, "rows": data}
    best = max(d["of_copy_ceiling"] for d in data)
    return "PASSED", f"{len(data)} kernels timed; best {best:.2f} of the copy ceiling ({ceiling:.0f} GB/s)"


# -- optional parts that need TensorRT (headers, or the library) ------------------------------------------
def plugin_enqueue_check(report, tp, include, out_dir, arch):
    if include is None:
        return "SKIPPED", "no TensorRT headers (set TENSORRT_INCLUDE_DIR or --trt-include)"
    import mock_build

    h = mock_build.build_harness(tp, include, out_dir / "trt", cuda_architectures=arch)
    report.data["plugin_library"] = str(h["plugin"])
    r = subprocess.run([str(h["driver"]), "enqueue-gpu", str(h["plugin"])], capture_output=True, text=True, timeout=300)
    report.say(r.stdout + r.stderr)
    if r.returncode != 0 or "FAIL" in r.stdout:
        return "FAILED", f"enqueue-gpu exited {r.returncode}"
    if "skip" in r.stdout:
        return "SKIPPED", "the stand-in driver skipped part of enqueue-gpu (see the text report)"
    return "PASSED", f"IPluginV3 enqueue() of every op on the GPU through the stand-in libnvinfer ({include})"


def real_tensorrt_check(report, plugin=None):
    """The real engines (plain and plugin mode, with and without CUDA graphs) against BlinkDL's logits and
    onnxruntime: tests/tensorrt/test_tensorrt.py's device tests."""
    if importlib.util.find_spec("tensorrt") is None:
        return "SKIPPED", "tensorrt is not installed"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            str(REPO / "tests" / "tensorrt" / "test_tensorrt.py"),
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
            "-k",
            "blinkdl or batch_3",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, **({"RWKV_TRT_PLUGIN": str(plugin)} if plugin else {})},
    )
    report.say((r.stdout + r.stderr)[-3000:])
    if r.returncode != 0:
        return "FAILED", f"pytest exited {r.returncode}"
    if " skipped" in r.stdout and " passed" not in r.stdout:
        return "SKIPPED", "every real-engine test skipped (see the text report)"
    return "PASSED", "real TensorRT engines match BlinkDL's logits and onnxruntime"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lib", type=Path, help="prebuilt librwkv_wkv4_kernels.so (default: compile now)")
    ap.add_argument("--head-lib", type=Path, help="prebuilt librwkv_wkvhead_kernels.so (default: compile now)")
    ap.add_argument("--arch", help="CUDA architecture to compile for (default: the GPU's, e.g. 90)")
    ap.add_argument("--out-dir", type=Path, help="where to compile (default: a temporary directory)")
    ap.add_argument("--trt-include", type=Path, help="TensorRT include dir (default: $TENSORRT_INCLUDE_DIR)")
    ap.add_argument("--skip", default="", help=f"checks not to ask for, comma-separated, of: {', '.join(CHECKS)}")
    ap.add_argument(
        "--report-dir",
        type=Path,
        default=REPO / "build" / "gpu-check",
        help="where gpu_check.json and gpu_check.txt go (default: build/gpu-check)",
    )
    ap.add_argument(
        "--emulate",
        action="store_true",
        help="no GPU: run the WKV5/6/7 kernels on the CPU (wkvhead_emulator.cpp); skips WKV4 and the plugin",
    )
    args = ap.parse_args(argv)
    skip = {x.strip() for x in args.skip.split(",") if x.strip()}
    unknown = skip - set(CHECKS)
    if unknown:
        print(f"Error: unknown check(s) in --skip: {', '.join(sorted(unknown))} (known: {', '.join(CHECKS)})")
        return 2
    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="rwkv_gpu_check_"))
    rng = np.random.default_rng(2024)
    t_start = time.perf_counter()
    tp = build_helpers.tp  # the shipped compiler driver, installed or from the checkout

    if args.emulate:
        lib = href.kernels_library(build_helpers.compile_kernel_emulator(out_dir))
        print("device: none; WKV5/6/7 kernels emulated on the CPU (wkvhead_emulator.cpp)")
        failed = head_section(lib, href.HostBackend(), rng, timings=False)
        print(f"\n{'ALL PASSED' if failed == 0 else f'{failed} FAILED'} (emulated)")
        return 1 if failed else 0

    report = Report(set(CHECKS) - skip)
    real_stdout = sys.stdout
    sys.stdout = _Tee(real_stdout, report.text)
    try:
        return _run_checks(args, report, rng, tp, out_dir, t_start)
    finally:
        sys.stdout = real_stdout


def _run_checks(args, report, rng, tp, out_dir, t_start):
    meta = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host": platform.node(),
        "python": sys.version.split()[0],
        "argv": sys.argv[1:],
    }
    backend, reason = ref.cuda_backend()
    if backend is None:
        print(f"gpu_check: cannot run: {reason}")
        report.requested.add("device")
        report.verdict("device", "SKIPPED", reason)
        report.write(args.report_dir, meta, code=2)
        return 2
    arch = args.arch or str(backend.arch())
    meta.update(device=backend.device_name(), sm=arch, buffers=backend.name)
    report.say(f"device: {backend.device_name()} (sm_{backend.arch()}), buffers via {backend.name}")

    libs = {}

    def compile_check():
        if args.lib and args.head_lib:
            libs["wkv4"], libs["head"] = args.lib, args.head_lib
            return "PASSED", "prebuilt libraries given"
        if tp.find_nvcc() is None:
            return (
                "FAILED",
                "nvcc not found (set CUDACXX or CUDA_HOME, or put the CUDA toolkit on PATH), or pass "
                "--lib and --head-lib",
            )
        t0 = time.perf_counter()
        libs["wkv4"] = args.lib or tp.compile_kernels_only(out_dir, cuda_architectures=arch)
        libs["head"] = args.head_lib or tp.compile_kernels(out_dir, "wkvhead", cuda_architectures=arch)
        return "PASSED", f"kernels compiled with nvcc for sm_{arch} in {time.perf_counter() - t0:.1f} s"

    report.requested.add("compile")
    report.run("compile", compile_check)
    lib = ref.kernels_library(libs["wkv4"]) if "wkv4" in libs else None
    hlib = href.kernels_library(libs["head"]) if "head" in libs else None
    no_lib = ("SKIPPED", "the kernels did not compile")

    def wkv4_check():
        if lib is None:
            return no_lib
        failed = wkv4_rows(lib, backend, rng)
        return ("FAILED", f"{failed} rows failed") if failed else ("PASSED", "every WKV4/WKV4Seq row within tolerance")

    def head_check():
        if hlib is None:
            return no_lib
        failed = head_section(hlib, backend, rng, timings=False)
        return (
            ("FAILED", f"{failed} rows failed")
            if failed
            else ("PASSED", "every WKV5/6/7 (+Seq) row within tolerance, f32/f16/f16-with-f32-w, head sizes 8-256")
        )

    report.run("wkv4-kernels", wkv4_check)
    report.run("wkvhead-kernels", head_check)
    report.run(
        "kernel-bandwidth",
        lambda: no_lib if lib is None or hlib is None else bandwidth_check(report, lib, hlib, backend, rng),
    )

    cc = CudaCoreChecks(report, rng)
    report.run("cuda-core-memory", cc.memory_check)
    report.run("cuda-core-graph", cc.graph_check)
    report.run("cuda-core-threads", cc.threads_check)
    cc.close()

    env_include = os.environ.get("TENSORRT_INCLUDE_DIR")
    include = args.trt_include or (Path(env_include) if env_include else None)
    report.run("plugin-enqueue", plugin_enqueue_check, report, tp, include, out_dir, arch)
    report.run("tensorrt-engines", real_tensorrt_check, report, report.data.get("plugin_library"))

    meta["seconds"] = round(time.perf_counter() - t_start, 1)
    report.say(f"\n{'check':20} result")
    for name, c in report.checks.items():
        report.say(f"{name:20} {c['status']}{' - ' + c['detail'] if c['detail'] else ''}")
    code = report.exit_code()
    not_run = [n for n, c in report.checks.items() if c["requested"] and c["status"] == "SKIPPED"]
    failed = [n for n, c in report.checks.items() if c["requested"] and c["status"] == "FAILED"]
    if code == 0:
        report.say(f"\nALL PASSED ({len(report.checks)} checks, {meta['seconds']} s)")
    else:
        report.say(
            f"\nNOT ALL PASSED: {len(failed)} failed ({', '.join(failed) or '-'}), {len(not_run)} asked for "
            f"but not run ({', '.join(not_run) or '-'}; --skip them if that is expected) [{meta['seconds']} s]"
        )
    report.write(args.report_dir, meta)
    report.say(f"reports: {args.report_dir / 'gpu_check.json'}, {args.report_dir / 'gpu_check.txt'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
