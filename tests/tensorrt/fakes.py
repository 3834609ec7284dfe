"""A stand-in for `tensorrt` and cuda-python's `cuda.core`, for the TensorRT tests that run anywhere.

It mirrors the documented API that exporter/targets/tensorrt (engine.py, loader.py) and rwkv_runtime.tensorrt
call, keeps "device" memory in host allocations, records CUDA graph captures, and computes with onnxruntime on
the ONNX file the engine was built from. It checks our logic (profiles, sidecars, plugins, buffers, double buffering,
graph capture), not TensorRT. ``make_fake_trt(FakeCudaCore())`` returns the `tensorrt` module stand-in.
"""

from __future__ import annotations

import ctypes
import enum
import json
import types
from pathlib import Path

import numpy as np


class FakeCUDAError(RuntimeError):
    """What cuda.core raises when a driver call fails."""


class _Stream:
    _next = 0x5000

    def __init__(self, cuda):
        _Stream._next += 16
        self.cuda, self.handle = cuda, _Stream._next  # a cuda.core Stream's handle converts with int()
        self.capture = None  # list of recorded ops while a GraphBuilder captures this stream
        self.invalid = False

    def submit(self, op):
        if self.capture is not None:
            self.capture.append(op)
        else:
            op()

    def sync(self):
        if self.capture is not None:
            raise FakeCUDAError("CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED")

    def create_graph_builder(self):
        return _GraphBuilder(self)

    def close(self):
        self.cuda.streams.pop(self.handle, None)


class _Graph:
    def __init__(self, cuda, ops):
        self.cuda, self.ops = cuda, ops

    def launch(self, stream):
        self.cuda.launches += 1
        for op in self.ops:
            stream.submit(op)

    def close(self):
        pass


class _GraphBuilder:
    """cuda.core.graph.GraphBuilder over stream capture: what is enqueued while building is recorded."""

    def __init__(self, stream):
        self.stream = stream

    def begin_building(self, mode="relaxed"):
        self.stream.capture, self.stream.invalid = [], False
        return self

    def end_building(self):
        ops, self.stream.capture = self.stream.capture, None
        if self.stream.invalid:
            raise FakeCUDAError("CUDA_ERROR_STREAM_CAPTURE_INVALIDATED")
        self.ops = ops
        return self

    def complete(self):
        self.stream.cuda.instantiated += 1
        return _Graph(self.stream.cuda, list(self.ops))

    def close(self):
        pass


class _Buffer:
    def __init__(self, cuda, ptr, size, table=None, keep=None):
        self.cuda, self.handle, self.size, self.table, self.keep = cuda, int(ptr), int(size), table, keep

    def close(self, stream=None):
        if self.table is not None:
            self.table.pop(self.handle, None)  # (views made by from_handle own nothing)
            self.table = None

    def copy_from(self, src, *, stream):
        cuda, n = self.cuda, min(self.size, src.size)
        s = stream.stream if isinstance(stream, _GraphBuilder) else stream
        dst_dev, src_dev = cuda.is_device(self.handle, n), cuda.is_device(src.handle, n)
        for p, dev in ((self.handle, dst_dev), (src.handle, src_dev)):
            if not dev and s.capture is not None and not cuda._inside(cuda.pinned, p, n):
                s.invalid = True  # real CUDA: pageable memory cannot be captured
                raise FakeCUDAError("CUDA_ERROR_STREAM_CAPTURE_INVALIDATED")
        if not (dst_dev or src_dev) and not (
            cuda._inside(cuda.pinned, self.handle, n) or cuda._inside(cuda.pinned, src.handle, n)
        ):
            raise FakeCUDAError("host-to-host copy through the GPU API (the backend never does this)")
        dst, srcp = self.handle, src.handle
        s.submit(lambda: ctypes.memmove(dst, srcp, n))


class FakeCudaCore:
    """cuda.core as rwkv_runtime.tensorrt uses it (Device, Stream, Buffer, LegacyPinnedMemoryResource, GraphBuilder);
    "device" memory is host memory the stand-in keeps track of, so misuse (a host pointer given to the
    engine, pageable memory in a captured graph) is caught."""

    def __init__(self, devices: int = 1):
        self.devices = devices
        self.dev, self.pinned, self.streams = {}, {}, {}
        self.launches = self.instantiated = 0
        core = self

        class Device:
            def __init__(self, device_id=0):
                if device_id >= core.devices:
                    raise FakeCUDAError("CUDA_ERROR_NO_DEVICE: no CUDA-capable device is detected")

            def set_current(self):
                pass

            def create_stream(self):
                st = _Stream(core)
                core.streams[st.handle] = st
                return st

            def allocate(self, size, *, stream):
                return core._alloc(core.dev, size)

        class LegacyPinnedMemoryResource:
            def allocate(self, size, *, stream=None):
                return core._alloc(core.pinned, size)

        class Buffer:
            @staticmethod
            def from_handle(ptr, size, mr=None, owner=None):
                return _Buffer(core, ptr, size, keep=owner)

        self.Device, self.LegacyPinnedMemoryResource, self.Buffer = Device, LegacyPinnedMemoryResource, Buffer

    def _alloc(self, table, n):
        buf = ctypes.create_string_buffer(int(n))
        table[ctypes.addressof(buf)] = buf
        return _Buffer(self, ctypes.addressof(buf), n, table=table)

    @staticmethod
    def _inside(table, p, n) -> bool:
        return any(a <= p and p + n <= a + len(b) for a, b in table.items())

    def is_device(self, p, n) -> bool:
        return self._inside(self.dev, int(p), int(n))


_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


def make_fake_trt(
    cudart: FakeCudaCore,
    capturable: bool = True,
    fail_build: str | None = None,
    version: str = "10.99.0",
    parser: str | None = None,
):
    """A module with the parts of the tensorrt API that engine.py and rwkv_runtime.tensorrt use.

    ``parser``: whose precedence the ONNX parser follows for a custom node that is also a model-local
    function: "10.1" (onnx-tensorrt 10.0-10.6: built-in importer, then the local function, then the
    plugin registry) or "11" (10.15+/11: with a plugin_namespace attribute and a registered creator the
    plugin first, else the function, else the plugin); default: what ``version`` does (10.7-10.14
    prefer plugins too, as "11" does for our nodes, which all carry plugin_namespace)."""
    import onnx
    import onnxruntime as ort

    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    if parser is None:
        major, minor = (int(x) for x in version.split(".")[:2])
        parser = "10.1" if (major, minor) < (10, 7) else "11"
    trt.calls = {"networks": [], "configs": [], "loaded": [], "executions": 0, "creator_misses": 0}
    registry_creators = set()

    class ILogger:
        class Severity(enum.IntEnum):
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self):
            pass

    class IProgressMonitor:
        def __init__(self):
            pass

    trt.ILogger, trt.IProgressMonitor = ILogger, IProgressMonitor
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    trt.BuilderFlag = types.SimpleNamespace(TF32="tf32")
    trt.TensorIOMode = types.SimpleNamespace(INPUT="input", OUTPUT="output")
    trt.nptype = lambda dt: np.dtype(dt).type
    trt.LayerType = types.SimpleNamespace(
        PLUGIN_V3="PLUGIN_V3",
        PLUGIN_V2="PLUGIN_V2",
        ELEMENTWISE="ELEMENTWISE",
        UNARY="UNARY",
        MATRIX_MULTIPLY="MATRIX_MULTIPLY",
    )

    class Registry:
        def load_library(self, path):
            trt.calls["loaded"].append(path)
            lines = Path(path).read_text().split()
            if not lines or any(c in registry_creators for c in lines):
                return None  # like TensorRT: fails if a plugin is already registered
            registry_creators.update(lines)
            return object()

        def get_creator(self, op, version, namespace=""):
            if f"{namespace}::{op}:{version}" in registry_creators:
                return object()
            trt.calls["creator_misses"] += 1  # real TensorRT logs "Cannot find plugin" as an error here
            return None

        @property
        def all_creators(self):
            out = []
            for key in sorted(registry_creators):
                ns, rest = key.split("::", 1)
                name, ver = rest.rsplit(":", 1)
                out.append(types.SimpleNamespace(name=name, plugin_version=ver, plugin_namespace=ns))
            return out

    registry = Registry()
    trt.get_plugin_registry = lambda: registry

    class Tensor:
        def __init__(self, name, shape, dtype):
            self.name, self.shape, self.dtype = name, shape, dtype

    class Network:
        def __init__(self, flags):
            self.flags, self.inputs, self.path, self.custom, self.layers = flags, [], None, [], []
            trt.calls["networks"].append(self)

        @property
        def num_inputs(self):
            return len(self.inputs)

        @property
        def num_layers(self):
            return len(self.layers)

        def get_layer(self, i):
            return self.layers[i]

        def get_input(self, i):
            return self.inputs[i]

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.logger, self.errors = network, logger, []

        def parse_from_file(self, path):
            try:
                m = onnx.load(path, load_external_data=False)
            except Exception as e:  # noqa: BLE001
                self.errors.append(f"In node -1: MODEL_DESERIALIZE_FAILED: {e}")
                return False
            self.network.path = path
            for i in m.graph.input:
                dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in i.type.tensor_type.shape.dim)
                self.network.inputs.append(Tensor(i.name, dims, i.type.tensor_type.elem_type))
            local = {(f.domain, f.name): f for f in m.functions}
            for n in m.graph.node:
                if n.domain in ("", "ai.onnx"):
                    self.network.layers.append(types.SimpleNamespace(type=trt.LayerType.ELEMENTWISE, name=n.name))
                    continue
                attrs = {a.name: a.s.decode() for a in n.attribute if a.name.startswith("plugin_")}
                key = f"{attrs.get('plugin_namespace', n.domain)}::{n.op_type}:{attrs.get('plugin_version', '1')}"
                has_plugin = key in registry_creators
                fn = local.get((n.domain, n.op_type))
                if parser == "10.1":  # ModelImporter.cpp (10.1): a local function wins, the registry is not asked
                    use_plugin = fn is None and has_plugin
                else:  # 10.15+/11: plugin_namespace + a registered creator -> the plugin first
                    use_plugin = has_plugin and ("plugin_namespace" in attrs or fn is None)
                if use_plugin:
                    self.network.custom.append(key)
                    self.network.layers.append(types.SimpleNamespace(type=trt.LayerType.PLUGIN_V3, name=n.name))
                elif fn is not None:  # the function body, inlined as ordinary layers
                    self.network.layers += [
                        types.SimpleNamespace(type=trt.LayerType.UNARY, name=f"{n.name}/{b.name}") for b in fn.node
                    ]
                else:
                    self.errors.append(f"In node {n.name}: No importer registered for op: {n.op_type}")
                    return False
            return True

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, i):
            return self.errors[i]

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, mn, opt, mx):
            self.shapes[name] = [list(mn), list(opt), list(mx)]

    class Cache:
        def __init__(self, data):
            self.data = bytes(data) or b"fresh"

        def serialize(self):
            return self.data + b"+"

    class Config:
        def __init__(self):
            self.flags_cleared, self.profiles, self.cache, self.progress_monitor = [], [], None, None
            self.pool, self.builder_optimization_level = {}, 3
            trt.calls["configs"].append(self)

        def set_memory_pool_limit(self, pool, size):
            self.pool[pool] = size

        def clear_flag(self, flag):
            self.flags_cleared.append(flag)

        def create_timing_cache(self, data):
            return None if bytes(data).startswith(b"corrupt") else Cache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def add_optimization_profile(self, p):
            self.profiles.append(p)
            return len(self.profiles) - 1

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags=0):
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            if config.progress_monitor is not None:
                config.progress_monitor.phase_start("Building engine", None, 2)
                config.progress_monitor.step_complete("Building engine", 1)
                config.progress_monitor.phase_finish("Building engine")
            if fail_build and network.path.endswith(fail_build):
                self.logger.log(ILogger.Severity.ERROR, "out of tactics (stand-in failure)")
                return None
            (prof,) = config.profiles
            assert set(prof.shapes) == {t.name for t in network.inputs}
            return json.dumps(
                {"onnx": network.path, "profile": prof.shapes, "plugins": network.custom, "capturable": capturable}
            ).encode()

    trt.OnnxParser, trt.Builder = OnnxParser, Builder

    class Context:
        def __init__(self, engine):
            self.engine, self.shapes, self.addr = engine, {}, {}

        def set_input_shape(self, name, shape):
            mn, _, mx = self.engine.profile[name]
            if len(shape) != len(mn) or any(not lo <= d <= hi for d, lo, hi in zip(shape, mn, mx)):
                return False
            self.shapes[name] = tuple(int(d) for d in shape)
            return True

        def _dims(self):
            dims = {}
            for i in self.engine.sess.get_inputs():
                for sym, d in zip(i.shape, self.shapes.get(i.name, ())):
                    if isinstance(sym, str):
                        dims[sym] = d
            return dims

        def get_tensor_shape(self, name):
            if name in self.engine.inputs:
                return self.shapes.get(name, tuple(-1 for _ in self.engine.inputs[name][0]))
            dims = self._dims()
            return tuple(dims.get(d, -1) if isinstance(d, str) else d for d in self.engine.outputs[name][0])

        def set_tensor_address(self, name, ptr):
            if name not in self.engine.inputs and name not in self.engine.outputs:
                return False
            self.addr[name] = int(ptr)
            return True

        def execute_async_v3(self, stream_handle):
            stream = cudart.streams[int(stream_handle)]
            if stream.capture is not None and not self.engine.capturable:
                stream.invalid = True  # (an engine with operations that cannot be captured)
                return False
            eng = self.engine
            # what a real enqueue bakes in: the addresses and shapes of this moment
            ins = {n: (self.addr[n], self.shapes[n], eng.inputs[n][1]) for n in eng.inputs}
            outs = {n: (self.addr[n], self.get_tensor_shape(n), eng.outputs[n][1]) for n in eng.outputs}

            def run():
                trt.calls["executions"] += 1
                feed = {}
                for n, (p, shape, dt) in ins.items():
                    nbytes = int(np.prod(shape)) * np.dtype(dt).itemsize
                    assert cudart.is_device(p, nbytes), f"{n} is not in device memory"
                    feed[n] = np.frombuffer(ctypes.string_at(p, nbytes), dt).reshape(shape)
                results = eng.sess.run(list(outs), feed)
                for (n, (p, shape, dt)), r in zip(outs.items(), results):
                    r = np.ascontiguousarray(r, dtype=dt)
                    assert r.shape == tuple(shape) and cudart.is_device(p, r.nbytes), n
                    ctypes.memmove(p, r.ctypes.data, r.nbytes)

            stream.submit(run)
            return True

    class Engine:
        def __init__(self, spec):
            self.sess = ort.InferenceSession(spec["onnx"], providers=["CPUExecutionProvider"])
            self.profile, self.capturable = spec["profile"], spec["capturable"]
            self.inputs = {i.name: (i.shape, _ORT_DTYPES[i.type]) for i in self.sess.get_inputs()}
            self.outputs = {o.name: (o.shape, _ORT_DTYPES[o.type]) for o in self.sess.get_outputs()}
            self.names = list(self.inputs) + list(self.outputs)

        @property
        def num_io_tensors(self):
            return len(self.names)

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if name in self.inputs else trt.TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return (self.inputs.get(name) or self.outputs[name])[1]

        def get_tensor_profile_shape(self, name, index):
            assert index == 0
            return self.profile[name]

        def create_execution_context(self):
            return Context(self)

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, data):
            try:
                spec = json.loads(bytes(data))
            except ValueError:
                self.logger.log(ILogger.Severity.ERROR, "the serialized engine is not a valid plan")
                return None
            missing = [p for p in spec["plugins"] if p not in registry_creators]
            if missing:
                self.logger.log(ILogger.Severity.ERROR, f"getPluginCreator could not find plugin {missing[0]}")
                return None
            return Engine(spec)

    trt.Runtime = Runtime
    return trt
