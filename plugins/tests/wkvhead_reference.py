"""numpy reference of the RWKV-5/6/7 WKV operators (rwkv::WKV5/WKV6/WKV7 and their Seq forms),
realistic random inputs, ctypes wrappers of the CPU build (wkvHeadHost.cpp) and of the CUDA
launchers (wkvHeadKernel.h), and a runner for the exporter's own ONNX function bodies
(onnxruntime); the libraries are compiled by rwkv_export.targets.tensorrt.plugin (the one compiler driver). Shared by tests/tensorrt/test_plugins.py and plugins/tests/gpu_check.py.
No torch and no TensorRT, except ``run_function_body`` (imports rwkv_export, hence torch).

Conventions: every activation is [B, T, H, N] here (the single-step ops are T = 1; ``step_shapes``
drops the T axis for the ONNX step ops); the state is [B, H, N, N] float32. Index order and
formulas are those of exporter/arch/headwise.py (see plugins/wkvhead/wkvHeadMath.cuh).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "wkvhead"
F32, F16 = np.dtype(np.float32), np.dtype(np.float16)
DTYPE_CODE = {F32: 0, F16: 1}
REGISTER_SIZES = (16, 32, 64, 128)  # head sizes with a register-resident kernel; others: generic path
W7_SCALE = 0.606531  # RWKV-7: w = exp(-0.606531 * sigmoid(...))


@dataclass(frozen=True)
class OpSpec:
    family: str  # WKV5, WKV6, WKV7 (the Seq op runs the same kernel)
    inputs: tuple  # ONNX input order
    token: tuple  # per-token activations [B, T, H, N] (w among them for WKV6/7)
    params: tuple  # float32 [H, N]
    w_arg: bool  # the launcher takes wDtype (w is per token and may be float32 or the activation type)


OPS = {
    "WKV5": OpSpec("WKV5", ("r", "k", "v", "w", "u", "state"), ("r", "k", "v"), ("w", "u"), False),
    "WKV6": OpSpec("WKV6", ("r", "k", "v", "w", "u", "state"), ("r", "k", "v", "w"), ("u",), True),
    "WKV7": OpSpec("WKV7", ("r", "w", "k", "v", "a", "b", "state"), ("r", "w", "k", "v", "a", "b"), (), True),
}
OP_TYPES = ("WKV5", "WKV5Seq", "WKV6", "WKV6Seq", "WKV7", "WKV7Seq")


def family(op_type: str) -> str:
    return op_type.removesuffix("Seq")


# -- numpy reference --------------------------------------------------------------------------------
def reference(fam, ins, dtype=np.float64):
    """The contract's formulas (exporter/arch/rwkv{5,6,7}.py docstrings) in `dtype`: float64 for
    accuracy, float32 to mirror the kernels' arithmetic. ins: dict of arrays (activations
    [B, T, H, N]). Returns (y [B, T, H, N], state_out [B, H, N, N]) of `dtype`."""
    x = {n: np.asarray(a).astype(dtype) for n, a in ins.items()}
    s = x["state"].copy()
    T = x["r"].shape[1]
    ys = []
    for t in range(T):
        r, k, v = x["r"][:, t], x["k"][:, t], x["v"][:, t]
        if fam in ("WKV5", "WKV6"):
            w = x["w"] if x["w"].ndim == 2 else x["w"][:, t]  # [H,N] or [B,H,N]
            kv = k[..., :, None] * v[..., None, :]  # [B,H,N(i key),N(j value)]
            ys.append(np.einsum("bhi,bhij->bhj", r, x["u"][..., None] * kv + s))
            s = kv + w[..., None] * s
        else:
            w, a, b = x["w"][:, t], x["a"][:, t], x["b"][:, t]
            sa = np.einsum("bhij,bhj->bhi", s, a)  # S a
            s = s * w[..., None, :] + sa[..., :, None] * b[..., None, :] + v[..., :, None] * k[..., None, :]
            ys.append(np.einsum("bhij,bhj->bhi", s, r))
    y = np.stack(ys, 1) if ys else np.zeros(x["r"].shape, dtype)
    return y, s


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def random_case(rng, fam, B, T, H, N, dtype=np.float32, w_dtype=None, warmup=4, scale=1.0):
    """Inputs of `fam` with realistic ranges: r, k, v ~ N(0, scale); WKV5 w = exp(-exp(d)),
    d ~ U(-6, 1.5) per channel, u ~ N(0, 0.5); WKV6 the same decay plus a per-token N(0, 0.5) offset;
    WKV7 w = exp(-0.606531 sigmoid(N(0, 2))), kk = normalize(N(0, 1)) per head, a = -kk,
    b = kk * sigmoid(N(0, 1)). The state comes from a float64 rollout of `warmup` tokens from zero,
    then rounded to float32. Activations (and w when w_dtype is float16) are of `dtype` (default
    w_dtype: dtype); params and state float32. Returns a dict in the op's input order."""
    dtype = np.dtype(dtype)
    w_dtype = dtype if w_dtype is None else np.dtype(w_dtype)

    def tokens(t):
        d = {n: rng.normal(0.0, scale, (B, t, H, N)) for n in ("r", "k", "v")}
        if fam == "WKV6":
            d["w"] = np.exp(-np.exp(decay[None, None] + rng.normal(0.0, 0.5, (B, t, H, N))))
        elif fam == "WKV7":
            d["w"] = np.exp(-W7_SCALE * _sigmoid(rng.normal(0.0, 2.0, (B, t, H, N))))
            kk = rng.normal(0.0, 1.0, (B, t, H, N))
            kk /= np.maximum(np.linalg.norm(kk, axis=-1, keepdims=True), 1e-12)
            d["a"] = -kk
            d["b"] = kk * _sigmoid(rng.normal(0.0, 1.0, (B, t, H, N)))
        return d

    decay = rng.uniform(-6.0, 1.5, (H, N))
    params = {}
    if fam in ("WKV5", "WKV6"):
        params["u"] = rng.normal(0.0, 0.5, (H, N)).astype(np.float32)
    if fam == "WKV5":
        params["w"] = np.exp(-np.exp(decay)).astype(np.float32)
    state = np.zeros((B, H, N, N))
    if warmup:
        _, state = reference(fam, {**tokens(warmup), **params, "state": state})
    ins = {**tokens(T), **params, "state": np.ascontiguousarray(state, np.float32)}
    for n in OPS[fam].token:
        ins[n] = np.ascontiguousarray(ins[n], w_dtype if n == "w" else dtype)
    return {n: ins[n] for n in OPS[fam].inputs}


def case_dtypes(fam, ins):
    """(activation dtype, w dtype) of a case."""
    act = ins["r"].dtype
    return act, (ins["w"].dtype if OPS[fam].w_arg else F32)


# -- errors and tolerances --------------------------------------------------------------------------
def scaled_error(got, want):
    """max |got - want| / max(1, max |want|): the error relative to the tensor's own scale (a
    per-element relative error means nothing where sums of large terms cancel)."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    if got.size == 0:
        return 0.0
    return float(np.abs(got - want).max() / max(1.0, float(np.abs(want).max())))


def compare(fam, got, ins):
    """Errors of got = (y, state_out) as a dict: y_vs_f32 / state_vs_f32 against the float32 mirror
    of the formulas (y rounded to the activation type, as the kernel stores it); vs_f64: against
    float64 (state always; y too for float32 activations)."""
    r32 = reference(fam, ins, np.float32)
    r64 = reference(fam, ins)
    act = ins["r"].dtype
    out = {
        "y_vs_f32": scaled_error(got[0], r32[0].astype(act)),
        "state_vs_f32": scaled_error(got[1], r32[1]),
        "vs_f64": scaled_error(got[1], r64[1]),
    }
    if act == F32:
        out["vs_f64"] = max(out["vs_f64"], scaled_error(got[0], r64[0]))
    return out


# Relative to max(1, max |reference|) of each tensor. The kernels sum in another order than numpy:
# a few float32 ulps of the largest term. float16 y: <= 2 ulps of float16 rounding.
TOL_Y = {F32: 2e-5, F16: 2e-3}
TOL_STATE = 2e-5
TOL_F64 = 2e-4  # float32 vs exact math, T <= 512 with these input ranges (a sanity bound)


def within(errs, act_dtype):
    return (
        errs["y_vs_f32"] <= TOL_Y[np.dtype(act_dtype)]
        and errs["state_vs_f32"] <= TOL_STATE
        and errs["vs_f64"] <= TOL_F64
    )


# -- ctypes -----------------------------------------------------------------------------------------
_P, _I = ctypes.c_void_p, ctypes.c_int32
N_INTS = {"WKV5": 5, "WKV6": 6, "WKV7": 6}  # B, T, H, N, dtype[, wDtype]
N_PTRS = {"WKV5": 8, "WKV6": 8, "WKV7": 9}  # inputs (state included), y, state_out


def host_library(path):
    """ctypes handle of librwkv_wkvhead_host.so with argument types set."""
    lib = ctypes.CDLL(str(path))
    for fam in OPS:
        f = getattr(lib, f"rwkv{fam.capitalize()}ForwardHost")
        f.argtypes = [_I] * N_INTS[fam] + [_P] * N_PTRS[fam]
        f.restype = _I
    lib.rwkvWkvHeadHasHalf.restype = _I
    return lib


def kernels_library(path):
    """ctypes handle of librwkv_wkvhead_kernels.so (or librwkv_trt_plugins.so) with argument types set."""
    lib = ctypes.CDLL(str(path))
    for fam in OPS:
        f = getattr(lib, f"rwkv{fam.capitalize()}Forward")
        f.argtypes = [_P] + [_I] * N_INTS[fam] + [_P] * N_PTRS[fam]
        f.restype = ctypes.c_int
    return lib


def size_args(fam, ins):
    """The launchers' integer arguments for a case: B, T, H, N, dtype[, wDtype]."""
    B, T, H, N = ins["r"].shape
    act, w = case_dtypes(fam, ins)
    ints = [B, T, H, N, DTYPE_CODE[act]]
    if OPS[fam].w_arg:
        ints.append(DTYPE_CODE[w])
    return ints


def run_host(lib, fam, ins, *, y=None, state_out=None):
    """The CPU build on numpy arrays; returns (y, state_out). `y`/`state_out`: preallocated
    outputs, which may be input arrays (aliasing)."""
    arrs = {n: np.ascontiguousarray(a) for n, a in ins.items()}
    y = np.empty_like(arrs["r"]) if y is None else y
    state_out = np.empty_like(arrs["state"]) if state_out is None else state_out
    ptr = lambda a: a.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
    rc = getattr(lib, f"rwkv{fam.capitalize()}ForwardHost")(
        *size_args(fam, arrs), *(ptr(arrs[n]) for n in OPS[fam].inputs), ptr(y), ptr(state_out)
    )
    if rc != 0:
        raise RuntimeError(f"rwkv{fam.capitalize()}ForwardHost returned {rc}")
    return y, state_out


def run_device(lib, backend, fam, ins):
    """The CUDA launcher on device copies of `ins` (backend: wkv4_reference.CudaBackend); returns
    numpy (y, state_out)."""
    dev = [backend.to_device(ins[n]) for n in OPS[fam].inputs]
    y = backend.empty(ins["r"].shape, ins["r"].dtype)
    s = backend.empty(ins["state"].shape, np.float32)
    rc = getattr(lib, f"rwkv{fam.capitalize()}Forward")(
        backend.stream(), *size_args(fam, ins), *(p for _, p in dev), y[1], s[1]
    )
    if rc != 0:
        raise RuntimeError(f"rwkv{fam.capitalize()}Forward returned cudaError {rc}")
    backend.synchronize()
    return backend.to_host(y[0]), backend.to_host(s[0])


class HostBackend:
    """The CudaBackend interface over plain host memory, for the kernel emulator: "device"
    buffers are numpy arrays, the stream is null."""

    name = "host (emulated kernels)"

    def to_device(self, a):
        a = np.array(a, copy=True, order="C")
        return a, a.ctypes.data

    def empty(self, shape, dtype):
        return self.to_device(np.zeros(shape, dtype))

    def to_host(self, d):
        return np.array(d, copy=True)

    def stream(self):
        return None

    def synchronize(self):
        pass


# -- the exporter's ONNX function bodies, run by onnxruntime ----------------------------------------
def step_shapes(ins):
    """[B, 1, H, N] activations -> [B, H, N] (the ONNX step ops' shapes)."""
    return {n: (a[:, 0] if a.ndim == 4 and n != "state" else a) for n, a in ins.items()}


def function_body_model(op_type, ins):
    """A model with one rwkv::<op_type> node plus its model-local function, built by the exporter's
    own code (exporter/arch/headwise.wkv_node); every input float32 is a graph input."""
    from onnx import TensorProto, helper

    from rwkv_export.arch import headwise as hw
    from rwkv_export.onnx_graph import GraphBuilder

    g = GraphBuilder(f"{op_type}_function_body")
    names = list(ins)
    for n in names:
        g.inputs.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, list(ins[n].shape)))
    g.outputs.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, None))
    g.outputs.append(helper.make_tensor_value_info("state_out", TensorProto.FLOAT, None))
    hw.wkv_node(g, op_type, True, names, ["y", "state_out"])
    return g.model()


def run_function_body(op_type, ins):
    """onnxruntime (CPU) on the function body, float32 inputs in the ONNX op's shapes; returns
    (y, state_out) as numpy."""
    import onnxruntime as ort

    feeds = {n: np.ascontiguousarray(a, np.float32) for n, a in ins.items()}
    model = function_body_model(op_type, feeds)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y, s = sess.run(["y", "state_out"], feeds)
    return y, s


def capture_node_io(model_path, feeds, node_index=0):
    """Runs an exported model with onnxruntime, exposing the inputs and outputs of its
    `node_index`-th rwkv::WKV* node; returns (op_type, inputs dict in ONNX order, (y, state_out)).
    ONNX Runtime computes the node with its function body, so the outputs are the exporter's own."""
    import onnx
    import onnxruntime as ort

    m = onnx.load(str(model_path))
    nodes = [n for n in m.graph.node if n.domain == "rwkv"]
    node = nodes[node_index]
    fam = family(node.op_type)
    existing = {o.name for o in m.graph.output}
    inits = {i.name: i for i in m.graph.initializer}
    for name in list(node.input) + list(node.output):
        if name not in existing and name not in inits:
            m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    wanted = [n for n in list(node.input) + list(node.output) if n not in inits]
    got = dict(zip(wanted, sess.run(wanted, feeds)))
    for name in node.input:
        if name in inits:
            got[name] = onnx.numpy_helper.to_array(inits[name])
    ins = {formal: np.ascontiguousarray(got[actual]) for formal, actual in zip(OPS[fam].inputs, node.input)}
    return node.op_type, ins, (got[node.output[0]], got[node.output[1]])
