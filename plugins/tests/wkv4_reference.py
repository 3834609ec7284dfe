"""numpy reference of the RWKV-4 WKV operator and realistic random inputs; shared by
tests/tensorrt/test_plugins.py and plugins/tests/gpu_check.py (no torch, no TensorRT)."""

from __future__ import annotations

import ctypes

import numpy as np

PP_INIT = -1e30  # initial running maximum; -inf in float16, so the state stays float32


def wkv4_reference(k, v, w, u, aa, bb, pp, dtype=np.float64):
    """The contract's formulas, evaluated in `dtype`: float64 (default) for accuracy, float32 to
    mirror the kernel's own arithmetic. k, v: [B, T, C]; w, u: [C]; aa, bb, pp: [B, C].
    Returns y [B, T, C] and the state after the last token, all of `dtype`."""
    k = np.asarray(k).astype(dtype)
    v = np.asarray(v).astype(dtype)
    w = np.asarray(w).astype(dtype)
    u = np.asarray(u).astype(dtype)
    aa, bb, pp = (np.array(s, dtype) for s in (aa, bb, pp))
    y = np.empty_like(k)
    for t in range(k.shape[1]):
        kt, vt = k[:, t], v[:, t]
        ww = u + kt
        p = np.maximum(pp, ww)
        e1, e2 = np.exp(pp - p), np.exp(ww - p)
        y[:, t] = (e1 * aa + e2 * vt) / (e1 * bb + e2)
        ww = w + pp
        p = np.maximum(ww, kt)
        e1, e2 = np.exp(ww - p), np.exp(kt - p)
        aa, bb, pp = e1 * aa + e2 * vt, e1 * bb + e2, p
    return y, aa, bb, pp


def random_case(rng, B, T, C, dtype=np.float32, warmup=4, k_scale=2.0):
    """k, v [B, T, C] of `dtype`; w = -exp(time_decay), u = time_first [C] float32; a state
    [B, C] float32 from a short rollout starting at pp = -1e30 (not a zero state)."""
    time_decay = rng.uniform(-6.0, 2.0, C)
    w = (-np.exp(time_decay)).astype(np.float32)
    u = rng.uniform(-1.0, 1.5, C).astype(np.float32)
    aa = np.zeros((B, C))
    bb = np.zeros((B, C))
    pp = np.full((B, C), PP_INIT)
    if warmup:
        kw = rng.normal(0.0, k_scale, (B, warmup, C))
        vw = rng.normal(0.0, 1.0, (B, warmup, C))
        _, aa, bb, pp = wkv4_reference(kw, vw, w, u, aa, bb, pp)
    k = rng.normal(0.0, k_scale, (B, T, C)).astype(dtype)
    v = rng.normal(0.0, 1.0, (B, T, C)).astype(dtype)
    state = tuple(np.ascontiguousarray(s, np.float32) for s in (aa, bb, pp))
    return k, v, w, u, state


def max_errors(got, want):
    """(max absolute error, max error relative to max(1, |want|)) -- the latter is what tolerances use."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    if got.size == 0:
        return 0.0, 0.0
    diff = np.abs(got - want)
    return float(diff.max()), float((diff / np.maximum(1.0, np.abs(want))).max())


def host_library(path):
    """ctypes handle of librwkv_wkv4_host.so with argument types set."""
    lib = ctypes.CDLL(str(path))
    p = ctypes.c_void_p
    i = ctypes.c_int32
    lib.rwkvWkv4ForwardHost.argtypes = [i, i, i, i] + [p] * 11
    lib.rwkvWkv4ForwardHost.restype = i
    lib.rwkvWkv4HasHalf.restype = i
    return lib


def kernels_library(path):
    """ctypes handle of librwkv_wkv4_kernels.so (or librwkv_trt_plugins.so) with argument types set."""
    lib = ctypes.CDLL(str(path))
    p = ctypes.c_void_p
    i = ctypes.c_int32
    lib.rwkvWkv4Forward.argtypes = [p, i, i, i, i] + [p] * 11
    lib.rwkvWkv4Forward.restype = ctypes.c_int
    return lib


def run_host(lib, k, v, w, u, state, *, out_state=None, y=None):
    """Runs the CPU build on numpy arrays; returns (y, aa, bb, pp). k, v: [B, T, C] float32/float16."""
    B, T, C = k.shape
    dtype = {np.dtype(np.float32): 0, np.dtype(np.float16): 1}[k.dtype]
    arrs = [np.ascontiguousarray(a) for a in (k, v)]
    y = np.empty_like(arrs[0]) if y is None else y
    outs = out_state if out_state is not None else tuple(np.empty((B, C), np.float32) for _ in range(3))
    ptr = lambda a: a.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
    rc = lib.rwkvWkv4ForwardHost(
        B,
        T,
        C,
        dtype,
        ptr(arrs[0]),
        ptr(arrs[1]),
        ptr(w),
        ptr(u),
        *(ptr(s) for s in state),
        ptr(y),
        *(ptr(o) for o in outs),
    )
    if rc != 0:
        raise RuntimeError(f"rwkvWkv4ForwardHost returned {rc}")
    return (y, *outs)


# -- CUDA device buffers through torch or CuPy (whichever is installed and sees a device) -------
class CudaBackend:
    """Minimal device-buffer helper: to_device/to_host/stream/synchronize/arch."""

    def __init__(self, name, mod):
        self.name = name
        self.mod = mod

    def to_device(self, a):
        a = np.ascontiguousarray(a)
        if self.name == "torch":
            t = self.mod.from_numpy(a).cuda()
            return t, t.data_ptr()
        d = self.mod.asarray(a)
        return d, d.data.ptr

    def empty(self, shape, dtype):
        return self.to_device(np.zeros(shape, dtype))

    def to_host(self, d):
        return d.cpu().numpy() if self.name == "torch" else self.mod.asnumpy(d)

    def stream(self):
        if self.name == "torch":
            return self.mod.cuda.current_stream().cuda_stream
        return self.mod.cuda.get_current_stream().ptr

    def synchronize(self):
        if self.name == "torch":
            self.mod.cuda.synchronize()
        else:
            self.mod.cuda.runtime.deviceSynchronize()

    def arch(self):
        """Compute capability as an nvcc architecture number, e.g. 90."""
        if self.name == "torch":
            major, minor = self.mod.cuda.get_device_capability()
        else:
            cc = self.mod.cuda.Device().compute_capability  # e.g. "90"
            major, minor = int(cc[:-1]), int(cc[-1])
        return major * 10 + minor

    def device_name(self):
        if self.name == "torch":
            return self.mod.cuda.get_device_name()
        props = self.mod.cuda.runtime.getDeviceProperties(self.mod.cuda.Device().id)
        n = props["name"]
        return n.decode() if isinstance(n, bytes) else str(n)


def cuda_backend():
    """(backend, None) if torch or CuPy sees a CUDA device, else (None, one-line reason)."""
    reasons = []
    try:
        import torch

        if torch.cuda.is_available():
            return CudaBackend("torch", torch), None
        reasons.append(f"torch {torch.__version__} sees no CUDA device")
    except ImportError:
        reasons.append("torch not installed")
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return CudaBackend("cupy", cupy), None
        reasons.append("CuPy sees no CUDA device")
    except ImportError:
        reasons.append("CuPy not installed")
    except Exception as e:  # CuPy raises its own CUDARuntimeError without a driver
        reasons.append(f"CuPy: {type(e).__name__}")
    return None, "no CUDA device (" + "; ".join(reasons) + ")"


def run_device(lib, backend, k, v, w, u, state):
    """Runs rwkvWkv4Forward on the device; returns numpy (y, aa, bb, pp)."""
    B, T, C = k.shape
    dtype = {np.dtype(np.float32): 0, np.dtype(np.float16): 1}[k.dtype]
    ins = [backend.to_device(a) for a in (k, v, w, u, *state)]
    y = backend.empty(k.shape, k.dtype)
    outs = [backend.empty((B, C), np.float32) for _ in range(3)]
    rc = lib.rwkvWkv4Forward(backend.stream(), B, T, C, dtype, *(p for _, p in ins), y[1], *(p for _, p in outs))
    if rc != 0:
        raise RuntimeError(f"rwkvWkv4Forward returned cudaError {rc}")
    backend.synchronize()
    return tuple(backend.to_host(d) for d, _ in (y, *outs))


def compare(got, k, v, w, u, state):
    """Worst relative errors (see max_errors) of got = (y, aa, bb, pp) as a dict:
    y_vs_f32 / state_vs_f32: against the float32 mirror of the formulas, y rounded to k's type as
    the kernel stores it (the kernel's own arithmetic: ~1e-6); vs_f64: against float64 (float32's
    intrinsic accuracy, which degrades slowly with T; y is left out for float16)."""
    with np.errstate(over="ignore", invalid="ignore"):
        r32 = wkv4_reference(k, v, w, u, *state, dtype=np.float32)
    r64 = wkv4_reference(k, v, w, u, *state)
    y32 = r32[0].astype(k.dtype).astype(np.float64)
    out = {
        "y_vs_f32": max_errors(got[0], y32)[1],
        "state_vs_f32": max(max_errors(g, r)[1] for g, r in zip(got[1:], r32[1:])),
        "vs_f64": max(max_errors(g, r)[1] for g, r in zip(got[1:], r64[1:])),
    }
    if k.dtype == np.float32:
        out["vs_f64"] = max(out["vs_f64"], max_errors(got[0], r64[0])[1])
    return out


# Tolerances used by the tests and gpu_check.py (relative to max(1, |reference|)).
TOL_Y = {np.dtype(np.float32): 1e-5, np.dtype(np.float16): 2e-3}  # float16 y: <= 2 ulps of rounding
TOL_STATE = 1e-5
TOL_F64 = 5e-4  # float32 vs exact math (a sanity bound), T <= 512, k ~ N(0, 8) or narrower


def within(errs, dtype):
    return (
        errs["y_vs_f32"] <= TOL_Y[np.dtype(dtype)] and errs["state_vs_f32"] <= TOL_STATE and errs["vs_f64"] <= TOL_F64
    )
