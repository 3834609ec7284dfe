"""A small builder over ``onnx.helper`` for hand-designed graphs.

Why not ``torch.onnx``: the step graph's interface (state tensors as named inputs/outputs, custom
``rwkv::WKV*`` nodes that are also model-local functions, explicit casts for strongly typed
reduced precision, block-quantised MatMuls) is the product; writing it node by node keeps every
name and type under our control, and the PyTorch reference stays an independent check of it.
"""

from __future__ import annotations

import hashlib
import itertools
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 18
CUSTOM_DOMAIN = "rwkv"

ONNX_DTYPE = {
    "float32": TensorProto.FLOAT,
    "float16": TensorProto.FLOAT16,
    "bfloat16": TensorProto.BFLOAT16,
    "int64": TensorProto.INT64,
}


def onnx_dtype(dt) -> int:
    """ONNX element type of a numpy dtype (bfloat16 via ml_dtypes, which onnx depends on)."""
    return helper.np_dtype_to_tensor_dtype(np.dtype(dt))


# Offsets of large tensors in the shared weights file are multiples of this: 64 KiB is the allocation
# granularity on Windows and a multiple of every page size, so ONNX Runtime can memory-map each tensor.
DATA_ALIGN = 65536
EXTERNAL_MIN_BYTES = 1024  # smaller tensors stay inside the .onnx (as onnx's own default threshold)
CHUNK_BYTES = 16 * 2**20  # a LazyArray is computed this many float32 bytes of rows at a time


class LazyArray:
    """A matrix computed only when it is written: a bf16/fp16 checkpoint matrix converted to float32,
    or the embedding with ln0 folded in. ``rows(i, j)`` returns rows i:j of the source matrix as
    float32; ``.T``, ``/ scalar`` and ``astype`` stay lazy. ``chunks`` yields the result in C order a
    few MB at a time (``WeightStore.add`` writes it so, never holding it whole); ``np.asarray`` /
    ``materialize`` computes it whole into one allocation; ``columns`` computes a slab of columns."""

    ndim = 2

    def __init__(self, rows, shape, transposed: bool = False, divisor=None, dtype=np.float32):
        self._rows, self._base = rows, tuple(int(n) for n in shape)  # the source's [rows, cols]
        self._transposed, self._divisor, self.dtype = transposed, divisor, np.dtype(dtype)

    @classmethod
    def of(cls, tensor):
        """A torch tensor (any float dtype; a view into a memory-mapped checkpoint) as float32, lazily."""
        t = tensor.detach()
        if t.ndim != 2:
            raise ValueError(f"LazyArray: a 2-D tensor expected, not {tuple(t.shape)}")
        return cls(lambda i, j: t[i:j].float().numpy(), t.shape)

    def _like(self, **kw) -> LazyArray:
        a = dict(transposed=self._transposed, divisor=self._divisor, dtype=self.dtype)
        a.update(kw)
        return LazyArray(self._rows, self._base, **a)

    @property
    def shape(self):
        return self._base[::-1] if self._transposed else self._base

    @property
    def size(self) -> int:
        return self._base[0] * self._base[1]

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def key(self) -> tuple:
        """Identifies what this computes (the same source, layout, scale and dtype)."""
        return (
            id(self._rows),
            self._transposed,
            None if self._divisor is None else float(self._divisor),
            self.dtype.str,
        )

    @property
    def T(self) -> LazyArray:
        return self._like(transposed=not self._transposed)

    def __truediv__(self, d) -> LazyArray:
        if self.dtype != np.float32:
            return NotImplemented
        d = np.float32(d)
        return self._like(divisor=d if self._divisor is None else self._divisor * d)

    def astype(self, dtype, copy: bool = True) -> LazyArray:
        """float32 -> ``dtype`` after the float32 computation (as ``array.astype`` would be)."""
        if self.dtype != np.float32:
            raise ValueError("LazyArray.astype: converts from float32 only")
        return self._like(dtype=dtype)

    def _chunk(self, i: int, j: int) -> np.ndarray:
        """Rows i:j of the source, computed, scaled and converted (not transposed)."""
        part = np.asarray(self._rows(i, j), dtype=np.float32)
        if self._divisor is not None:
            part = part / self._divisor  # float32 / float32: as dividing the whole matrix would
        return part.astype(self.dtype, copy=False)

    def _step(self) -> int:
        return max(1, CHUNK_BYTES // max(1, 4 * self._base[1]))

    def chunks(self):
        """The result in C order, a chunk of rows at a time (a transposed one: whole, once)."""
        if self._transposed:
            yield self.materialize()
            return
        n, step = self._base[0], self._step()
        for i in range(0, n, step):
            yield self._chunk(i, min(n, i + step))

    def materialize(self) -> np.ndarray:
        """The whole array (C order), filled a chunk of rows at a time into one allocation."""
        n = self._base[0]
        out = np.empty(self.shape, dtype=self.dtype)
        step = self._step()
        for i in range(0, n, step):
            j = min(n, i + step)
            if self._transposed:
                out[:, i:j] = self._chunk(i, j).T
            else:
                out[i:j] = self._chunk(i, j)
        return out

    def columns(self, j0: int, j1: int) -> np.ndarray:
        """Columns j0:j1 as a C-order array (of a transposed source: only those source rows read)."""
        if self._transposed:
            return np.ascontiguousarray(self._chunk(j0, j1).T)
        return np.ascontiguousarray(self.materialize()[:, j0:j1])

    def __array__(self, dtype=None, copy=None):
        out = self.materialize()
        return out if dtype is None else out.astype(dtype, copy=False)

    def __repr__(self):
        return f"LazyArray(shape={self.shape}, {self.dtype})"


_libc = []


def release_freed() -> None:
    """Hand freed heap memory back to the system (glibc's ``malloc_trim``; elsewhere a no-op).

    Converting a matrix allocates and frees buffers of a few MB to a few tens of MB; glibc raises its
    mmap threshold after the first such free, so later ones come from the heap and their pages stay
    resident after ``free``: without this, a bf16 export's RSS grew by about half the model."""
    if not _libc:
        try:
            import ctypes

            _libc.append(ctypes.CDLL(None).malloc_trim)
        except (OSError, AttributeError):
            _libc.append(None)
    if _libc[0] is not None:
        _libc[0](0)


def columns(arr, j0: int, j1: int) -> np.ndarray:
    """Columns j0:j1 of a matrix (an ndarray, a view into a checkpoint, or a LazyArray) as C-order float32."""
    if isinstance(arr, LazyArray):
        return arr.columns(j0, j1)
    return np.ascontiguousarray(arr[:, j0:j1], dtype=np.float32)


class WeightStore:
    """One external-data file shared by every graph of an export, written tensor by tensor.

    ``add`` appends a tensor's bytes at an aligned offset and returns a TensorProto that only
    references them, so no graph ever holds its weights in memory. Content-addressed: a tensor
    whose dtype and bytes were already written (the sequence graph repeats the step
    graph's weights) points at the existing bytes, so the file holds each weight once.
    """

    def __init__(self, path, min_bytes: int = EXTERNAL_MIN_BYTES, align: int = DATA_ALIGN):
        self.path = os.fspath(path)
        self.location = os.path.basename(self.path)  # relative: the export folder can be moved
        self.min_bytes, self.align = int(min_bytes), int(align)
        self._f = open(self.path, "wb")  # plain open(): the file mode follows the umask
        self._end = 0
        self._seen: dict = {}  # (dtype, digest) -> (offset, length)
        self._lazy: dict = {}  # LazyArray.key -> its (dtype, digest) key
        self.processed = 0  # bytes passed to ``add``, stored or found already stored
        self.after_write = None  # called with the store after each ``add`` (export: release memory)

    def add(self, name: str, arr: np.ndarray) -> onnx.TensorProto:
        if isinstance(arr, LazyArray):
            key = self._add_lazy(arr)
        else:
            arr = np.ascontiguousarray(arr)
            data = memoryview(arr.reshape(-1).view(np.uint8))
            key = (arr.dtype.str, hashlib.blake2b(data, digest_size=20).digest())  # shape: per graph
            if key not in self._seen:
                offset = self._pad(len(data))
                self._f.write(data)
                self._end = offset + len(data)
                self._seen[key] = (offset, len(data))
            self.processed += len(data)
            if self.after_write is not None:
                self.after_write(self)
        offset, length = self._seen[key]
        t = onnx.TensorProto(
            name=name, data_type=onnx_dtype(arr.dtype), dims=list(arr.shape), data_location=onnx.TensorProto.EXTERNAL
        )
        for k, v in (("location", self.location), ("offset", str(offset)), ("length", str(length))):
            e = t.external_data.add()
            e.key, e.value = k, v
        return t

    def _pad(self, nbytes: int) -> int:
        """Pad the file to the next offset for a tensor of ``nbytes``; returns that offset. Large
        tensors at the mmap granularity; small ones only at 64 bytes (ONNX Runtime copies those
        anyway, and page-aligning every vector would bloat the file of a tiny model)."""
        align = self.align if nbytes >= self.align else 64
        offset = -(-self._end // align) * align
        if offset > self._end:
            self._f.write(b"\0" * (offset - self._end))
        return offset

    def _add_lazy(self, arr: LazyArray) -> tuple:
        """Compute and write a LazyArray chunk by chunk (hashing as it goes), never whole in memory.
        One computed before (the other graph's) is not computed again; one whose bytes turn out to
        be stored already is cut off the file again."""
        if arr.key in self._lazy:
            self.processed += arr.nbytes
            return self._lazy[arr.key][0]
        start = self._end
        offset = self._pad(arr.nbytes)
        h = hashlib.blake2b(digest_size=20)
        for chunk in arr.chunks():
            data = memoryview(np.ascontiguousarray(chunk).reshape(-1).view(np.uint8))
            h.update(data)
            self._f.write(data)
            self.processed += len(data)
            del chunk, data
            if self.after_write is not None:
                self.after_write(self)  # the export: drop the checkpoint pages read so far
        key = (arr.dtype.str, h.digest())
        if key in self._seen:
            self._f.seek(start)
            self._f.truncate()
        else:
            self._seen[key] = (offset, arr.nbytes)
            self._end = offset + arr.nbytes
        self._lazy[arr.key] = (key, arr._rows)  # the function kept: its id stays this array's
        release_freed()
        return key

    def add_proto(self, t: onnx.TensorProto) -> onnx.TensorProto:
        """Move an in-memory initializer (e.g. from onnxruntime's quantiser) into the file."""
        if (
            t.data_location == onnx.TensorProto.EXTERNAL
            or not t.HasField("raw_data")
            or len(t.raw_data) < self.min_bytes
        ):
            return t
        return self.add(t.name, numpy_helper.to_array(t))

    @property
    def size(self) -> int:
        return self._end

    def close(self):
        if not self._f.closed:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()


class GraphBuilder:
    """Collects nodes, initializers and graph I/O; ``op`` returns output names.

    With a ``store``, weights of ``store.min_bytes`` or more are written to it as they are added
    and the graph keeps only references (streaming export); without one they stay in memory."""

    def __init__(self, name: str, store: WeightStore | None = None):
        self.name = name
        self.store = store
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
        """Add an initializer (a model weight) and return its name. A ``LazyArray`` is computed only
        here, when it is written (then dropped); a store that keeps references (``PendingStore``) keeps
        the LazyArray itself."""
        if isinstance(array, LazyArray):
            if dtype is not None and np.dtype(dtype) != array.dtype:
                array = array.astype(dtype)
            if self.store is not None and array.nbytes >= self.store.min_bytes:
                self.initializers.append(self.store.add(name, array))
                return name
            array, dtype = array.materialize(), None
        # np.asarray keeps 0-d scalars 0-d (ascontiguousarray would make them [1])
        arr = np.asarray(array if dtype is None else np.asarray(array).astype(dtype, copy=False))
        if self.store is not None and arr.nbytes >= self.store.min_bytes:
            self.initializers.append(self.store.add(name, arr))  # a view stays a view until written
        else:
            arr = np.asarray(arr, order="C")
            self.initializers.append(numpy_helper.from_array(arr, name))
        return name

    def weight_tensor(self, tensor: onnx.TensorProto) -> str:
        self.initializers.append(self.store.add_proto(tensor) if self.store is not None else tensor)
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
        node = helper.make_node(
            op_type, list(inputs), list(outputs), name=name or self.fresh(op_type), domain=domain, **attrs
        )
        self.nodes.append(node)
        return outputs[0] if len(outputs) == 1 else outputs

    def add_function(self, fn: onnx.FunctionProto):
        self.functions[(fn.domain, fn.name)] = fn
        self.domains.setdefault(fn.domain, 1)

    # -- the model -----------------------------------------------------------------------
    def model(self, doc: str = "", metadata: dict | None = None) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        opsets = [helper.make_opsetid(d, v) for d, v in self.domains.items()]
        m = helper.make_model(
            graph,
            opset_imports=opsets,
            producer_name="rwkv-export",
            functions=list(self.functions.values()),
            doc_string=doc,
        )
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
    return helper.make_function(
        domain,
        name,
        list(inputs),
        list(outputs),
        consts + g.nodes,
        [helper.make_opsetid("", OPSET)],
        attributes=list(attributes),
    )
