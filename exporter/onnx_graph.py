"""A small builder over ``onnx.helper`` for hand-designed graphs.

Why not ``torch.onnx``: the step graph's interface (state tensors as named inputs/outputs, custom
``rwkv::WKV*`` nodes that are also model-local functions, explicit casts for strongly typed
reduced precision, block-quantised MatMuls) is the product; writing it node by node keeps every
name and type under our control, and the PyTorch reference stays an independent check of it.
"""
from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 18
CUSTOM_DOMAIN = "rwkv"

ONNX_DTYPE = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16,
              "bfloat16": TensorProto.BFLOAT16, "int64": TensorProto.INT64}


def onnx_dtype(dt) -> int:
    """ONNX element type of a numpy dtype (bfloat16 via ml_dtypes, which onnx depends on)."""
    return helper.np_dtype_to_tensor_dtype(np.dtype(dt))


class GraphBuilder:
    """Collects nodes, initializers and graph I/O; ``op`` returns output names."""

    def __init__(self, name: str):
        self.name = name
        self.nodes: list = []
        self.initializers: list = []
        self.inputs: list = []
        self.outputs: list = []
        self.functions: dict = {}  # (domain, name) -> FunctionProto
        self.domains: dict = {"": OPSET}
        self._ids = itertools.count()
        self._consts: dict = {}

    # -- names and tensors ---------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        return f"{hint}_{next(self._ids)}"

    def weight(self, name: str, array, dtype=None) -> str:
        """Add an initializer (a model weight) and return its name."""
        # np.asarray keeps 0-d scalars 0-d (ascontiguousarray would make them [1])
        arr = np.asarray(array if dtype is None else np.asarray(array).astype(dtype), order="C")
        self.initializers.append(numpy_helper.from_array(arr, name))
        return name

    def weight_tensor(self, tensor: onnx.TensorProto) -> str:
        self.initializers.append(tensor)
        return tensor.name

    def const(self, value, dtype=np.float32) -> str:
        """A small shared constant (scalars, shape vectors)."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.weight(self.fresh("const"), arr)
        return self._consts[key]

    def input(self, name: str, dtype: str, shape) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, ONNX_DTYPE[dtype], shape))
        return name

    def output(self, name: str, dtype: str, shape) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, ONNX_DTYPE[dtype], shape))
        return name

    # -- nodes ---------------------------------------------------------------------------
    def op(self, op_type: str, inputs, outputs=None, n_out: int = 1, domain: str = "", name=None, **attrs):
        """Append a node. ``outputs`` fixes output names (graph outputs); otherwise fresh ones."""
        if outputs is None:
            outputs = [self.fresh(op_type.lower()) for _ in range(n_out)]
        elif isinstance(outputs, str):
            outputs = [outputs]
        node = helper.make_node(op_type, list(inputs), list(outputs), name=name or self.fresh(op_type),
                                domain=domain, **attrs)
        self.nodes.append(node)
        return outputs[0] if len(outputs) == 1 else outputs

    def add_function(self, fn: onnx.FunctionProto):
        self.functions[(fn.domain, fn.name)] = fn
        self.domains.setdefault(fn.domain, 1)

    # -- the model -----------------------------------------------------------------------
    def model(self, doc: str = "", metadata: dict | None = None) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        opsets = [helper.make_opsetid(d, v) for d, v in self.domains.items()]
        m = helper.make_model(graph, opset_imports=opsets, producer_name="rwkv-export",
                              functions=list(self.functions.values()), doc_string=doc)
        m.ir_version = 9  # readable by onnxruntime >= 1.16 and TensorRT 10's parser
        for k, v in (metadata or {}).items():
            helper.set_model_props(m, {**{p.key: p.value for p in m.metadata_props}, k: v})
        return m


def make_function(name: str, inputs, outputs, build, attributes=(), domain=CUSTOM_DOMAIN) -> onnx.FunctionProto:
    """A model-local function whose body ``build(g, *inputs)`` writes with standard ops.

    ONNX Runtime inlines it; TensorRT's parser prefers a registered plugin of the same op type.
    """
    g = GraphBuilder(name)
    outs = build(g, *inputs)
    outs = [outs] if isinstance(outs, str) else list(outs)
    # rename the body's final values to the function's declared outputs
    rename = dict(zip(outs, outputs))
    for node in g.nodes:  # producers and readers alike
        for i, o in enumerate(node.output):
            if o in rename:
                node.output[i] = rename[o]
        for i, o in enumerate(node.input):
            if o in rename:
                node.input[i] = rename[o]
    consts = []
    for init in g.initializers:  # functions have no initializers: turn them into Constant nodes
        consts.append(helper.make_node("Constant", [], [init.name], value=init))
    return helper.make_function(domain, name, list(inputs), list(outputs), consts + g.nodes,
                                [helper.make_opsetid("", OPSET)], attributes=list(attributes))
