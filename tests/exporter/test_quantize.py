"""int8/int4 exports are quantised one matrix at a time, yet give exactly what onnxruntime's
whole-model ``MatMulNBitsQuantizer`` gives on the same float graph: same nodes, same bytes."""
from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from rwkv_export import arch
from rwkv_export.arch.graph import GraphOptions
from rwkv_export.checkpoint import load_checkpoint
from rwkv_export.export import ExportOptions, export
from rwkv_export.onnx_graph import GraphBuilder

from ..conftest import ref_model


def _nodes(m):
    return [(n.op_type, tuple(n.input), tuple(n.output),
             tuple(sorted((a.name, helper.get_attribute_value(a)) for a in n.attribute))) for n in m.graph.node]


@pytest.mark.parametrize("bits,block", [(8, 32), (4, 32), (4, 128)])
def test_streamed_quantisation_equals_onnxruntimes_quantizer(tmp_path, bits, block):
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    mnq.logger.setLevel(logging.WARNING)
    ck = load_checkpoint(ref_model("tiny-rwkv-7v0-834K"))
    spec = arch.get(ck.version)
    cfg = spec.config_from_weights(ck.weights, ck.hf_config)
    g = GraphBuilder("rwkv7_step")
    spec.build_graph(g, spec.export_weights(ck.weights, cfg), cfg, GraphOptions(seq=False, gemm=False))
    q = mnq.MatMulNBitsQuantizer(g.model(), bits=bits, block_size=block, is_symmetric=True, accuracy_level=4)
    q.process()
    want = q.model.model
    got = onnx.load(str(export(ck.path, tmp_path / "q.onnx", ExportOptions(quantize=f"int{bits}", quant_block=block,
                                                                              graphs=("step",)))[0]))
    assert _nodes(got) == _nodes(want)
    wi = {t.name: numpy_helper.to_array(t) for t in want.graph.initializer}
    gi = {t.name: numpy_helper.to_array(t) for t in got.graph.initializer}
    assert set(wi) == set(gi) and sum(n == "MatMulNBits" for n, *_ in _nodes(got)) > 100
    for k in wi:
        np.testing.assert_array_equal(gi[k], wi[k], err_msg=k)


def test_cli_quant_block_reaches_the_graph_and_the_manifest(tmp_path):
    from click.testing import CliRunner

    from rwkv_export.cli import main
    from rwkv_runtime.artifact import read_manifest

    out = tmp_path / "q.onnx"
    r = CliRunner().invoke(main, ["export", str(ref_model("tiny-rwkv-4v0-660K")), "-o", str(out), "-q",
                                  "--quantize", "int4", "--quant-block", "64", "--graphs", "step"])
    assert r.exit_code == 0, r.output
    blocks = {helper.get_attribute_value(a) for n in onnx.load(str(out)).graph.node if n.op_type == "MatMulNBits"
              for a in n.attribute if a.name == "block_size"}
    assert blocks == {64}
    assert read_manifest(out)[0].options["quant_block"] == 64
    r = CliRunner().invoke(main, ["export", str(ref_model("tiny-rwkv-4v0-660K")), "-o", str(out), "-q",
                                  "--quantize", "int4", "--quant-block", "48"])
    assert r.exit_code != 0 and "48" in r.output
