"""The decode ceiling of an exported model: one onnxruntime op reading as many weight bytes as one
decode step does, at the model's precision.

    python scripts/bench_ceiling.py MODEL.onnx [MODEL2.onnx ...] [--threads 2] [--rounds 3]

Decoding one token reads every large matrix once (and one row of the embedding), so on a CPU it is
bound by memory bandwidth: no graph can step faster than a single op streaming the same bytes. The
ceiling of a model is the fastest of:
  - ``Gemm(transB=1)`` float32, x [1, K] times W [N, K] with N*K*4 = the step's weight bytes;
  - for int8/int4 models, ``MatMulNBits`` (the op the quantised graph uses: same bits, block size
    and accuracy level) over as many packed bytes, scales included.
Each is reported as "tok/s": calls per second. ``ceiling_tps`` is imported by bench_vs_blinkdl.py,
which prints every decode figure as a fraction of it.

A second, model-specific bound: the model's **matrix products alone** (``products_model``): every
weight-matrix node of the step graph, with its real weights and attributes, run one after another with
nothing else in the graph. No graph built from those separate products can step faster on onnxruntime,
so decode over it is the cost of everything else (elementwise nodes, the runtime's step loop), and it
over the single-op ceiling is the cost of splitting the bytes into many small products.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
from onnx import TensorProto, helper

MATRIX_OPS = {"Gemm": 1, "MatMul": 1, "MatMulNBits": 1}  # op -> index of its weight input


def _nbytes(t: onnx.TensorProto) -> int:
    n = int(np.prod(t.dims)) if t.dims else 1
    return n * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize


def step_weight_bytes(path) -> dict:
    """Bytes one decode step reads from the weights of a step graph (matrices in full, one row of
    each Gather table), and the quantisation it uses: {"bytes", "bits", "block", "accuracy_level", "K"}."""
    m = onnx.load(str(path), load_external_data=False)
    inits = {t.name: t for t in m.graph.initializer}
    total, info = 0, {"bits": 32, "block": 0, "accuracy_level": 0}
    ks = []
    for node in m.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            info.update(bits=attrs["bits"], block=attrs["block_size"], accuracy_level=attrs.get("accuracy_level", 0))
            ks.append(attrs["K"])
            total += sum(_nbytes(inits[n]) for n in node.input[1:] if n in inits)
        elif node.op_type == "DynamicQuantizeMatMul" and node.input[1] in inits:  # int8 [K, N] + scales
            info.update(bits=8, dynamic=True)
            ks.append(inits[node.input[1]].dims[0])
            total += sum(_nbytes(inits[n]) for n in node.input[1:] if n in inits)
        elif node.op_type in ("Gemm", "MatMul") and node.input[1] in inits and len(inits[node.input[1]].dims) == 2:
            t = inits[node.input[1]]
            total += _nbytes(t)
            ks.append(t.dims[1] if node.op_type == "Gemm" else t.dims[0])
        elif node.op_type == "Gather" and node.input[0] in inits:
            t = inits[node.input[0]]
            total += _nbytes(t) // max(1, t.dims[0])
    info["bytes"] = total
    info["K"] = int(np.median(ks)) if ks else 768
    return info


def _weight_k(node, inits) -> tuple[int, int] | None:
    """(K, N) of a matrix-product node whose weight is an initializer; None for any other node."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "MatMulNBits":
        return attrs["K"], attrs["N"]
    if len(node.input) < 2 or node.input[1] not in inits:
        return None
    dims = list(inits[node.input[1]].dims)
    if node.op_type == "Gemm" and len(dims) == 2:
        return (dims[1], dims[0]) if attrs.get("transB", 0) else (dims[0], dims[1])
    if node.op_type in ("MatMul", "DynamicQuantizeMatMul") and len(dims) == 2:
        return dims[0], dims[1]
    return None


def products_model(path) -> onnx.ModelProto:
    """The step graph's weight-matrix products alone, in graph order, with their real weights: one input
    [batch, K] per inner size K (and float type) feeds every product of that size; each product is a
    graph output."""
    m = onnx.load(str(path))  # with its external data: the real weights
    inits = {t.name: t for t in m.graph.initializer}
    nodes, used, inputs, outputs = [], set(), {}, []
    for i, node in enumerate(m.graph.node):
        kn = _weight_k(node, inits)
        if kn is None:
            continue
        K, N = kn
        extra = [n for n in node.input[1:] if n]
        if any(n not in inits for n in extra):  # a product of two activations: not a weight read
            continue
        # activations in the weights' float type (an fp16 export's Gemm); quantised ops take float32
        dtype = inits[node.input[1]].data_type if node.op_type in ("Gemm", "MatMul") else TensorProto.FLOAT
        key = (K, dtype)
        if key not in inputs:
            inputs[key] = helper.make_tensor_value_info(f"x_{K}_{dtype}", dtype, ["batch", K])
        used.update(extra)
        out = f"y_{i}"
        nodes.append(
            helper.make_node(
                node.op_type,
                [inputs[key].name] + list(node.input[1:]),
                [out],
                domain=node.domain,
                **{a.name: helper.get_attribute_value(a) for a in node.attribute},
            )
        )
        outputs.append(helper.make_tensor_value_info(out, dtype, ["batch", N]))
    g = helper.make_graph(
        nodes, "matrix_products", list(inputs.values()), outputs, [t for t in m.graph.initializer if t.name in used]
    )
    return helper.make_model(g, opset_imports=list(m.opset_import), ir_version=m.ir_version)


_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class ProductsRunner:
    """Runs ``products_model`` with pre-bound inputs and outputs (no per-call allocation), ``rows`` rows."""

    def __init__(self, path, threads: int = 2):
        import onnxruntime as ort

        self.session = _session(products_model(path), threads)
        self._ort, self._io = ort, {}

    def bound(self, rows: int):
        if rows not in self._io:
            ort, s = self._ort, self.session
            io = s.io_binding()
            feeds = {}
            for x in s.get_inputs():
                feeds[x.name] = ort.OrtValue.ortvalue_from_numpy(np.full((rows, x.shape[1]), 0.01, _NP[x.type]))
                io.bind_ortvalue_input(x.name, feeds[x.name])
            outs = [ort.OrtValue.ortvalue_from_shape_and_type((rows, y.shape[1]), _NP[y.type]) for y in s.get_outputs()]
            for y, v in zip(s.get_outputs(), outs):
                io.bind_ortvalue_output(y.name, v)
            self._io[rows] = (io, feeds, outs)  # the values live as long as their binding
        return self._io[rows][0]

    def run(self, rows: int = 1):
        self.session.run_with_iobinding(self.bound(rows))


def products_tps(path, batches=("1",), threads: int = 2, seconds: float = 1.5) -> dict:
    """{batch: tok/s} of the model's matrix products alone (``ProductsRunner``) with ``batch`` rows."""
    r = ProductsRunner(path, threads)
    return {str(b): int(b) * _calls_per_second(lambda b=b: r.run(int(b)), seconds) for b in batches}


def _gemm_model(K: int, nbytes: int) -> onnx.ModelProto:
    N = max(1, nbytes // (4 * K))
    w = helper.make_tensor(
        "W", TensorProto.FLOAT, [N, K], np.random.default_rng(0).standard_normal((N, K), np.float32).tobytes(), raw=True
    )
    g = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)],
        "ceiling_gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, N])],
        [w],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def _nbits_model(K: int, nbytes: int, bits: int, block: int, accuracy_level: int) -> onnx.ModelProto:
    blocks = K // block
    per_row = blocks * (block * bits // 8) + blocks * 4  # packed weights + float32 scales
    N = max(1, nbytes // per_row)
    rng = np.random.default_rng(0)
    b = rng.integers(0, 256, (N, blocks, block * bits // 8), dtype=np.uint8)
    s = (rng.random(N * blocks, dtype=np.float32) * 0.01).astype(np.float32)
    inits = [
        helper.make_tensor("B", TensorProto.UINT8, b.shape, b.tobytes(), raw=True),
        helper.make_tensor("S", TensorProto.FLOAT, s.shape, s.tobytes(), raw=True),
    ]
    node = helper.make_node(
        "MatMulNBits",
        ["x", "B", "S"],
        ["y"],
        domain="com.microsoft",
        K=K,
        N=N,
        bits=bits,
        block_size=block,
        accuracy_level=accuracy_level,
    )
    g = helper.make_graph(
        [node],
        "ceiling_nbits",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, N])],
        inits,
    )
    return helper.make_model(
        g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)], ir_version=9
    )


def _session(model: onnx.ModelProto, threads: int):
    import onnxruntime as ort

    from rwkv_runtime.hugepages import anonymous_regions, collapse_new

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    before = anonymous_regions()
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    collapse_new(before)  # its weights in huge pages, as the runtime's sessions have them (hugepages.py)
    return sess


def _calls_per_second(call, seconds: float, warmup: int = 3) -> float:
    """How often ``call()`` runs per second over ``seconds``, after ``warmup`` calls."""
    for _ in range(warmup):
        call()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        call()
        n += 1
    return n / (time.perf_counter() - t0)


def _rate(session, rows: int, K: int, seconds: float) -> float:
    """Calls per second of ``session`` on x [rows, K]."""
    x = {"x": np.random.default_rng(1).standard_normal((rows, K), np.float32)}
    return _calls_per_second(lambda: session.run(None, x), seconds)


def _calls_per_s(model: onnx.ModelProto, K: int, threads: int, seconds: float = 1.5) -> float:
    return _rate(_session(model, threads), 1, K, seconds)


def batched_ceiling_tps(info: dict, batches, threads: int = 2, seconds: float = 1.5) -> dict:
    """{batch: tok/s} of the float32 ``Gemm`` over the step's weight bytes with ``batch`` rows of x: one
    read of the weights serves the whole batch, so as the batch grows the op turns from memory-bound to
    compute-bound; its batch-N over batch-1 ratio is the most any batched decode can gain on the machine."""
    K = info["K"]
    m = _gemm_model(K, info["bytes"])
    for io in (m.graph.input[0], m.graph.output[0]):
        io.type.tensor_type.shape.dim[0].dim_param = "batch"
    s = _session(m, threads)
    return {str(b): int(b) * _rate(s, int(b), K, seconds) for b in batches}


def ceiling_tps(info: dict, threads: int = 2) -> dict:
    """{"gemm_fp32": tok/s, ["matmulnbits": tok/s], "ceiling": the faster, "gbps": bytes/s of it}."""
    K, nbytes = info["K"], info["bytes"]
    res = {"gemm_fp32": _calls_per_s(_gemm_model(K, nbytes), K, threads)}
    if info["bits"] in (4, 8) and not info.get("dynamic"):
        res["matmulnbits"] = _calls_per_s(
            _nbits_model(K, nbytes, info["bits"], info["block"], info["accuracy_level"]), K, threads
        )
    res["ceiling"] = max(res.values())
    res["gbps"] = res["ceiling"] * nbytes / 1e9
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    infos = {m: step_weight_bytes(m) for m in a.models}
    runs = {m: [] for m in a.models}
    for _ in range(a.rounds):  # interleaved: a slow moment of the machine hits every model alike
        for m in a.models:
            runs[m].append(ceiling_tps(infos[m], a.threads))
    for m in a.models:
        c = sorted(r["ceiling"] for r in runs[m])
        parts = ", ".join(
            f"{k} {np.median([r[k] for r in runs[m]]):.1f}" for k in runs[m][0] if k not in ("ceiling", "gbps")
        )
        print(
            f"{m}: {infos[m]['bytes'] / 1e6:.0f} MB/token ({infos[m]['bits']}-bit); ceiling {np.median(c):.1f} tok/s "
            f"({c[0]:.1f}-{c[-1]:.1f}; {np.median([r['gbps'] for r in runs[m]]):.1f} GB/s) [{parts}]"
        )


if __name__ == "__main__":
    main()
