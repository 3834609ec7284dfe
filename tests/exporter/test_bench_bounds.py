"""The bounds `make bench` divides by are what they claim: the ceiling op reads the step's weight bytes,
and the "matrix products alone" graph holds every weight product of the step graph, with its real
weights, and computes what those products compute."""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tests.conftest import REPO, ref_model

ort = pytest.importorskip("onnxruntime")


def _bench_ceiling():
    spec = importlib.util.spec_from_file_location("bench_ceiling", REPO / "scripts" / "bench_ceiling.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    from rwkv_export.export import ExportOptions, export

    d = tmp_path_factory.mktemp("bounds")
    out = {}
    for name, ver in (("v4", "golden-rwkv4"), ("v7", "golden-rwkv7")):
        out[name] = export(ref_model(ver), d / f"{name}.onnx", ExportOptions())[0]
    out["v7-int4"] = export(ref_model("golden-rwkv7"), d / "v7-int4.onnx", ExportOptions(quantize="int4"))[0]
    out["v4-fp16"] = export(
        ref_model("golden-rwkv4"), d / "v4-fp16.onnx", ExportOptions(graphs=("step",), precision="fp16")
    )[0]
    return out


@pytest.mark.parametrize("name", ["v4", "v7", "v4-fp16"])
def test_products_alone_are_the_step_graphs_weight_products(exports, name):
    bc = _bench_ceiling()
    path = exports[name]
    m = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    weight_nodes = [
        n
        for n in m.graph.node
        if n.op_type in ("Gemm", "MatMul") and n.input[1] in inits and inits[n.input[1]].ndim == 2
    ]
    assert weight_nodes, "the step graph has weight products"
    pm = bc.products_model(path)
    assert [n.input[1] for n in pm.graph.node] == [n.input[1] for n in weight_nodes]
    # the same bytes: the products read what a decode step reads, less one row of each Gather table
    p_inits = {t.name: numpy_helper.to_array(t) for t in pm.graph.initializer}
    for n in weight_nodes:
        np.testing.assert_array_equal(p_inits[n.input[1]], inits[n.input[1]])
    gathers = sum(
        inits[n.input[0]].nbytes // inits[n.input[0]].shape[0]
        for n in m.graph.node
        if n.op_type == "Gather" and n.input[0] in inits
    )
    assert sum(a.nbytes for a in p_inits.values()) == bc.step_weight_bytes(path)["bytes"] - gathers
    # and it computes those products: each output is x times the weight (as numpy computes it)
    s = ort.InferenceSession(pm.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
    feeds = {x.name: rng.standard_normal((3, x.shape[1])).astype(dtype[x.type]) for x in s.get_inputs()}
    outs = s.run(None, feeds)
    fp16 = name.endswith("fp16")
    for node, y in zip(pm.graph.node, outs):
        w = p_inits[node.input[1]]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        x = feeds[node.input[0]].astype(np.float32)
        want = x @ (w.T if attrs.get("transB", 0) else w).astype(np.float32)
        if len(node.input) > 2 and node.input[2]:
            want = want + p_inits[node.input[2]].astype(np.float32)
        assert y.dtype == (np.float16 if fp16 else np.float32)
        tol = 2e-2 * max(1.0, float(np.abs(want).max())) if fp16 else 1e-5
        np.testing.assert_allclose(y.astype(np.float32), want, rtol=1e-2 if fp16 else 1e-4, atol=tol)


def test_products_alone_of_a_quantised_export_run_at_every_batch(exports):
    bc = _bench_ceiling()
    path = exports["v7-int4"]
    m = onnx.load(str(path), load_external_data=False)
    n_nbits = sum(n.op_type == "MatMulNBits" for n in m.graph.node)
    pm = bc.products_model(path)
    assert n_nbits and sum(n.op_type == "MatMulNBits" for n in pm.graph.node) == n_nbits
    r = bc.ProductsRunner(path, threads=1)
    for rows in (1, 4):
        r.run(rows)  # pre-bound outputs of [rows, N]: a wrong N or K fails in onnxruntime
    rates = bc.products_tps(path, ("1", "2"), threads=1, seconds=0.05)
    assert set(rates) == {"1", "2"} and all(v > 0 for v in rates.values())
