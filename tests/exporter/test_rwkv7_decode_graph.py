"""RWKV-7's decode path (issue #30): the runtime decodes through the sequence graph (T = 1 takes each
layer's WKV If's one-token branch). The graph is built with fewer, larger nodes there -- the six
token-shift lerps as one Mul+Add over a stacked constant and one Split, one T == 1 test for every
layer, a one-token branch without per-input Slice/Transpose pairs nor a state copy -- and must give
BlinkDL's logits token by token all the same."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from rwkv_export.export import ExportOptions, export

from ..conftest import PROMPTS, ref_logits
from ..conftest import ref_model as ref_path

NAME = "golden-rwkv7"
MIXES = "rwkvag"


@pytest.fixture(scope="module")
def seq_graph(tmp_path_factory):
    d = tmp_path_factory.mktemp("rwkv7-decode")
    return export(ref_path(NAME), d / "m.onnx", ExportOptions(graphs=("sequence",)))[0]


def _then(node):
    return next(a.g for a in node.attribute if a.name == "then_branch")


def test_decode_path_node_budget(seq_graph):
    m = onnx.load(str(seq_graph))
    main = m.graph.node
    ifs = [n for n in main if n.op_type == "If"]
    L = len(ifs)
    # one T == 1 test shared by every layer's If
    assert len({n.input[0] for n in ifs}) == 1 and sum(n.op_type == "Equal" for n in main) == 1
    for n in ifs:
        body = _then(n)
        ops = [x.op_type for x in body.node]
        # the five state-facing inputs and r: one Concat, one Slice, one Split; no state copy on the way out
        assert ops.count("Slice") == 1 and ops.count("Split") == 1 and "Identity" not in ops, ops
        assert len(ops) <= 15, ops  # was 21
    # the golden model's 2 layers: 207 nodes before the rewrite (12 lerp nodes, a T == 1 test per layer)
    assert L == 2 and len(main) <= 188, len(main)


def test_lerps_are_one_split_over_the_checkpoint_vectors(seq_graph):
    """Each layer's six lerps read one stacked [6C] constant: x_r, x_w, x_k, x_v, x_a, x_g of the
    checkpoint, in that order (the Split's outputs feed the receptance, decay, key, value, a, gate paths)."""
    m = onnx.load(str(seq_graph))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    ck = torch.load(ref_path(NAME), map_location="cpu", weights_only=True)
    L = sum(1 for n in m.graph.node if n.op_type == "If")
    splits = [n for n in m.graph.node if n.op_type == "Split" and len(n.output) == len(MIXES)]
    assert len(splits) == L
    for i in range(L):
        want = np.concatenate([ck[f"blocks.{i}.att.x_{x}"].float().numpy().reshape(-1) for x in MIXES])
        np.testing.assert_array_equal(inits[f"blocks.{i}.att.x_{MIXES}"], want)
        assert not any(f"blocks.{i}.att.x_{x}" in inits for x in MIXES)  # not also read one by one


def test_token_by_token_through_the_sequence_graph_matches_blinkdl(seq_graph):
    import onnxruntime as ort

    from rwkv_export.export import load_manifest

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(seq_graph), so, providers=["CPUExecutionProvider"])
    man = load_manifest(seq_graph)
    state = {s.name: np.full(s.concrete_shape(1), s.init, np.float32) for s in man.state}
    want = ref_logits(NAME, "atom")
    for t, tok in enumerate(PROMPTS["atom"]):
        res = sess.run(None, {"tokens": np.array([[tok]], np.int64), **state})
        state = {s.name: r for s, r in zip(man.state, res[1:])}
        assert np.abs(res[0].reshape(-1) - want[t]).max() <= 1e-5, t
