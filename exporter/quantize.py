"""Weight-only int8/int4 quantisation (onnxruntime's MatMulNBits), one matrix at a time; the
embedding table too (onnxruntime's GatherBlockQuantized: the same blocks along each row, dequantised
as rows are read), which float32 made the largest tensor of a quantised small model (issue #30).

onnxruntime's ``MatMulNBitsQuantizer`` needs the whole float model in memory. Here the graph is built
against a ``PendingStore`` that only keeps references to the weights (views into the memory-mapped
checkpoint); ``quantize_into`` then walks the graph's MatMul nodes, quantises each constant matrix
with onnxruntime's own block quantiser (``DefaultWeightOnlyQuantizer.qbits_block_quant``: the same
C++ kernels, so the same bytes as the whole-model quantiser), and writes the packed weights and every
other initializer straight into the export's ``WeightStore``. Matrices shared by the step and the
sequence graph are quantised once.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .onnx_graph import columns, release_freed

PENDING = "<pending>"
SLAB_BYTES = 16 * 2**20  # float32 bytes of columns quantised at a time
MS_DOMAIN = "com.microsoft"


class PendingStore:
    """A stand-in for ``WeightStore``: remembers each array (a view, or a ``LazyArray`` still to be
    computed: kept as it is) and returns a placeholder tensor."""

    def __init__(self, min_bytes: int = 1024):
        self.min_bytes = min_bytes
        self.arrays: list = []
        self.after_write = None

    def add(self, name: str, arr: np.ndarray) -> onnx.TensorProto:
        self.arrays.append(arr)
        t = onnx.TensorProto(
            name=name,
            data_type=helper.np_dtype_to_tensor_dtype(arr.dtype),
            dims=list(arr.shape),
            data_location=onnx.TensorProto.EXTERNAL,
        )
        for k, v in (("location", PENDING), ("offset", str(len(self.arrays) - 1))):
            e = t.external_data.add()
            e.key, e.value = k, v
        return t

    def add_proto(self, t: onnx.TensorProto) -> onnx.TensorProto:
        return t

    def array(self, t: onnx.TensorProto):
        """The array behind a placeholder, or None for an ordinary initializer."""
        if t.data_location != onnx.TensorProto.EXTERNAL:
            return None
        info = {e.key: e.value for e in t.external_data}
        return self.arrays[int(info["offset"])] if info.get("location") == PENDING else None


class Quantizer:
    """Quantises matrices into a store; remembers what it did so a second graph reuses it."""

    def __init__(self, bits: int, block: int, accuracy_level: int = 4):
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            DefaultWeightOnlyQuantizer,
        )

        self.bits, self.block, self.accuracy_level = bits, block, accuracy_level
        cfg = DefaultWeightOnlyQuantConfig(
            block_size=block, is_symmetric=True, accuracy_level=accuracy_level, bits=bits
        )
        self._q = DefaultWeightOnlyQuantizer(cfg)
        self._done: dict = {}  # (id of the source array, rows) -> (its packed and scales tensors, the array)
        self._row_quantizers: dict = {}
        self.processed = 0  # float bytes read so far
        self.after_write = None  # called with the quantiser after each matrix (export: release memory)

    def tensors(self, arr, qname: str, sname: str, store, rows: bool = False) -> tuple:
        """The packed weight and scales of ``arr`` as initializers (in ``store`` when given). A matrix
        already quantised (the other graph's) reuses the stored tensors: only references are kept.
        ``rows``: quantise each row of ``arr`` in blocks along it (a table read by rows: the embedding),
        packed [rows, cols * bits / 8] and scales [rows, cols / block], GatherBlockQuantized's layout."""
        key = (id(arr), rows)
        if key not in self._done:
            if self.after_write is not None and arr.nbytes > 64 * 2**20:
                self.after_write(self, force=True)  # a large matrix: start from no resident pages
            # a row of [V, C] is a column of its transpose: the same blocks MatMulNBits would use
            packed, scales = self.quantize(arr.T if rows else arr)
            if rows:
                packed, scales = packed.reshape(arr.shape[0], -1), scales.reshape(arr.shape[0], -1)
            self._done[key] = ((_tensor(store, qname, packed), _tensor(store, sname, scales)), arr)
        return self._done[key][0]

    def row_quantizer(self, cols: int) -> Quantizer | None:
        """The quantiser for a table read by rows with ``cols`` columns (the embedding): this one when its
        block divides ``cols`` (GatherBlockQuantized has no padded blocks), else one with the largest
        power-of-two block from 16 that does; None when none does."""
        if cols % self.block == 0:
            return self
        block = next((b for b in (256, 128, 64, 32, 16) if b < self.block and cols % b == 0), None)
        if block is None:
            return None
        if block not in self._row_quantizers:
            q = Quantizer(self.bits, block, self.accuracy_level)
            q.after_write, q._done = self.after_write, self._done  # one cache: each table quantised once
            self._row_quantizers[block] = q
        return self._row_quantizers[block]

    def _ms_node(self, op_type: str, inputs, outputs, name: str, **attrs):
        """A com.microsoft node replacing node ``name``, named after it and this quantiser's bits."""
        return helper.make_node(op_type, inputs, list(outputs), name=f"{name}_Q{self.bits}", domain=MS_DOMAIN, **attrs)

    def gather_node(self, indices: str, qname: str, sname: str, outputs, name: str):
        """Rows of a table quantised by ``tensors(rows=True)``, dequantised to float32 as they are read."""
        return self._ms_node(
            "GatherBlockQuantized",
            [qname, indices, sname],
            outputs,
            name,
            gather_axis=0,
            quantize_axis=1,
            block_size=self.block,
            bits=self.bits,
        )

    def quantize(self, arr, slab_bytes: int = SLAB_BYTES) -> tuple:
        """(packed [N, blocks, blob], scales [N, blocks]) of a float32 [K, N] matrix (an ndarray, a view
        into the checkpoint, or a ``LazyArray``), in slabs of columns: MatMulNBits' blocks run along K
        within one output column, so columns n0:n1 quantise to exactly rows n0:n1 of both results.
        Only a slab's contiguous float32 copy is ever made, never the whole matrix's."""
        K, N = arr.shape
        step = max(1, slab_bytes // max(1, 4 * K))
        packed = scales = None
        for n0 in range(0, N, step):
            n1 = min(N, n0 + step)
            p, s, _ = self._q.qbits_block_quant(columns(arr, n0, n1))  # symmetric: no zero points
            if packed is None:
                packed = np.empty((N,) + p.shape[1:], p.dtype)
                scales = np.empty((N,) + s.shape[1:], s.dtype)
            packed[n0:n1], scales[n0:n1] = p, s
            del p, s
            self.processed += (n1 - n0) * K * 4
            if self.after_write is not None:
                self.after_write(self)  # the export: drop the checkpoint pages read so far
        release_freed()  # the slabs' buffers (see onnx_graph.release_freed)
        return packed, scales

    def node(self, x: str, qname: str, sname: str, outputs, name: str, K: int, N: int):
        return self._ms_node(
            "MatMulNBits",
            [x, qname, sname],
            outputs,
            name,
            K=K,
            N=N,
            bits=self.bits,
            block_size=self.block,
            accuracy_level=self.accuracy_level,
        )


class DynamicInt8Quantizer(Quantizer):
    """``--quantize int8-dynamic``: int8 weights with one symmetric scale per output column, run by
    onnxruntime's ``DynamicQuantizeMatMul``, which quantises the activations at run time (one scale for
    the whole [rows, K] input) and multiplies in integers (MLAS's int8 GEMM, VNNI where the CPU has it).
    Measured (docs/benchmarks.md): as fast as MatMulNBits int8 for one sequence and about twice as fast
    for a batch of 32, at the same accuracy. The price: the activation scale spans the batch, so a
    sequence's logits move slightly with what else is in its batch."""

    def __init__(self):
        self.bits, self.block, self.accuracy_level = 8, 0, 0
        self._done = {}
        self.processed = 0
        self.after_write = None
        self._rows = None

    def row_quantizer(self, cols: int):
        """The embedding: 8-bit blocks of 32 (GGUF Q8_0's block; or the largest that divides ``cols``),
        read by GatherBlockQuantized (DynamicQuantizeMatMul has no gather form). Blocks of 32, not 128:
        this format's accuracy is per column, and the finer blocks cost 0.09 bytes a weight."""
        if self._rows is None:
            self._rows = Quantizer(8, 32)
            self._rows.after_write = self.after_write
        return self._rows.row_quantizer(cols)

    def quantize(self, arr, slab_bytes: int = SLAB_BYTES) -> tuple:
        """(int8 [K, N], float32 scales [N]) of a float32 [K, N] matrix, in slabs of columns (each
        column's scale depends on that column only, so slabs give the same bytes as one pass)."""
        K, N = arr.shape
        step = max(1, slab_bytes // max(1, 4 * K))
        q = np.empty((K, N), np.int8)
        scales = np.empty(N, np.float32)
        for n0 in range(0, N, step):
            n1 = min(N, n0 + step)
            c = columns(arr, n0, n1)
            s = np.abs(c).max(axis=0) / np.float32(127)
            s[s == 0] = 1  # an all-zero column: any scale gives zeros
            q[:, n0:n1] = np.clip(np.rint(c / s), -127, 127)
            scales[n0:n1] = s
            del c
            self.processed += (n1 - n0) * K * 4
            if self.after_write is not None:
                self.after_write(self)
        release_freed()
        return q, scales

    def node(self, x: str, qname: str, sname: str, outputs, name: str, K: int, N: int):
        return helper.make_node(
            "DynamicQuantizeMatMul", [x, qname, sname], list(outputs), name=f"{name}_Q8d", domain=MS_DOMAIN
        )


def quantize_into(model: onnx.ModelProto, pending: PendingStore, store, quantizer: Quantizer) -> None:
    """Replace every MatMul with a constant float32 [K, N] weight by the quantiser's op, and move every
    pending initializer into ``store`` (a ``WeightStore``, or None to keep them inside the model)."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    quantized, new_nodes, new_inits = set(), [], []
    for node in g.node:
        if node.op_type == "Gather" and _gather_axis(node) == 0:
            t = inits.get(node.input[0])
            arr = pending.array(t) if t is not None else None
            rq = (
                quantizer.row_quantizer(arr.shape[1])
                if (arr is not None and arr.ndim == 2 and arr.dtype == np.float32)
                else None
            )
            if rq is not None:  # the embedding: quantised like the matrices (llama.cpp's GGUF does too)
                qname, sname = f"{t.name}_G{rq.bits}", f"{t.name}_gscales"
                if qname not in quantized:
                    new_inits.extend(rq.tensors(arr, qname, sname, store, rows=True))
                    quantized.add(qname)
                new_nodes.append(rq.gather_node(node.input[1], qname, sname, node.output, node.name))
                continue
        t = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        arr = pending.array(t) if t is not None else None
        if arr is None or arr.ndim != 2 or arr.dtype != np.float32:
            new_nodes.append(node)
            continue
        K, N = arr.shape
        qname, sname = f"{t.name}_Q{quantizer.bits}", f"{t.name}_scales"
        if qname not in quantized:
            for t_, name in zip(quantizer.tensors(arr, qname, sname, store), (qname, sname)):
                t_ = onnx.TensorProto.FromString(t_.SerializeToString()) if t_.name != name else t_
                t_.name = name  # a matrix reused under another name: same bytes, its own initializer
                new_inits.append(t_)
            quantized.add(qname)
        new_nodes.append(quantizer.node(node.input[0], qname, sname, node.output, node.name, K, N))
    used = names_read(new_nodes)
    for t in g.initializer:
        if t.name not in used:
            continue  # a float matrix that was quantised
        arr = pending.array(t)
        new_inits.append(t if arr is None else _tensor(store, t.name, arr))
    replace_graph(model, new_nodes, new_inits)


def names_read(nodes) -> set:
    """The value names ``nodes`` read, their subgraphs' included (a Scan body reads outer-scope
    initializers, RWKV-4's w and u, by name)."""
    used = set()
    for n in nodes:
        used.update(n.input)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                used.update(i for sub in a.g.node for i in sub.input)
    return used


def replace_graph(model: onnx.ModelProto, nodes, initializers) -> None:
    """Give ``model``'s main graph these nodes and initializers, and the com.microsoft opset that
    quantised nodes need."""
    g = model.graph
    del g.node[:]
    g.node.extend(nodes)
    del g.initializer[:]
    g.initializer.extend(initializers)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def _gather_axis(node) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 0)


def _tensor(store, name: str, arr: np.ndarray) -> onnx.TensorProto:
    if store is not None and arr.nbytes >= store.min_bytes:
        return store.add(name, arr)
    return numpy_helper.from_array(np.ascontiguousarray(arr), name)
