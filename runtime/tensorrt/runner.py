"""One deserialized engine (the step or the sequence graph): its I/O names checked against the
manifest, its profile limits, and its execution contexts -- one shared context for plain runs, and one
per batch size for CUDA graphs, each with the graphs captured for it."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np

from .loader import TensorRTError
from .memory import IOBuffers

MAX_CONTEXTS = 8  # CUDA-graph execution contexts kept per engine (one per batch size)
MAX_GRAPHS = 4  # captured graphs kept per context (2 in the double-buffered loop)


class Exec:
    """An execution context with input shapes set for one (batch, T), and, when it is the context of
    a CUDA-graph batch size, its captured graphs."""

    def __init__(self, runner: Runner, ctx, own: bool):
        self.runner, self.ctx, self.own = runner, ctx, own
        self.key = None
        self.logits_shape: tuple = ()
        self.io = IOBuffers(runner.cuda, fixed=own)
        self.graphs: OrderedDict = OrderedDict()  # (input ptrs, output set ptr) -> cuda.core Graph
        self.seen: set = set()
        self.capturable = own

    def set_shapes(self, B: int, T):
        r = self.runner
        if self.key == (B, T):
            return
        tok_shape = (B,) if T is None else (B, T)
        if not self.ctx.set_input_shape(r.tokens, tok_shape):
            raise TensorRTError(
                f"{r.path.name}: TensorRT rejected tokens of shape {list(tok_shape)} "
                f"({r.log.last_error('outside the optimization profile')})"
            )
        for s in r.specs:
            if not self.ctx.set_input_shape(s.name, s.concrete_shape(B)):
                raise TensorRTError(
                    f"{r.path.name}: TensorRT rejected {s.name} of shape "
                    f"{list(s.concrete_shape(B))} ({r.log.last_error('outside the profile')})"
                )
        shape = tuple(int(d) for d in self.ctx.get_tensor_shape(r.logits))
        if any(d < 0 for d in shape):
            raise TensorRTError(f"{r.path.name}: TensorRT could not infer the logits shape ({r.log.last_error()})")
        tok_bytes = int(np.prod(tok_shape)) * r.tok_dtype.itemsize
        self.io.ensure(tok_bytes, int(np.prod(shape)) * r.log_dtype.itemsize)
        self.key, self.logits_shape = (B, T), shape

    def keep_graph(self, key, graph):
        self.graphs[key] = graph
        while len(self.graphs) > MAX_GRAPHS:
            self.graphs.popitem(last=False)[1].close()

    def destroy(self):
        for g in self.graphs.values():
            g.close()
        self.graphs.clear()
        self.io.close()
        self.ctx = None


class Runner:
    """A deserialized engine, its I/O names and profile limits, and its execution contexts."""

    def __init__(self, backend, kind: str, path: Path):
        self.backend, self.kind, self.path = backend, kind, path
        self.cuda, self.log, trt = backend.cuda, backend.log, backend.trt
        man = backend.manifest
        self.seq = kind == "sequence"
        self.specs = man.state
        self.tokens, self.logits = man.tokens_input, man.logits_output
        try:
            data = path.read_bytes()
        except OSError as e:
            raise TensorRTError(f"{path}: {e.strerror}") from None
        engine = backend.runtime.deserialize_cuda_engine(data)
        if engine is None:
            built = backend.sidecar.get("tensorrt_version") if path == backend.path else None
            hint = (
                f" (built with TensorRT {built}, this is {trt.__version__})"
                if built and built != trt.__version__
                else ""
            )
            raise TensorRTError(
                f"{path.name}: TensorRT could not deserialize this engine{hint}: "
                f"{self.log.last_error()}; engines are specific to a TensorRT version and GPU, "
                "rebuild it with rwkv-export build-engine"
            )
        self.engine = engine
        self._check_io(trt)
        lo, _, hi = (tuple(int(d) for d in dims) for dims in engine.get_tensor_profile_shape(self.tokens, 0))
        self.min_batch, self.max_batch = lo[0], hi[0]
        self.max_seq = hi[1] if self.seq and len(hi) > 1 else 1
        self.shared = None  # the context for plain runs (every shape)
        self.graph_execs: OrderedDict = OrderedDict()  # batch -> Exec with its own context

    def _check_io(self, trt):
        engine, path = self.engine, self.path
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        want_in = [self.tokens] + [s.name for s in self.specs]
        want_out = [self.logits] + [s.output for s in self.specs]
        for n in want_in + want_out:
            if n not in names:
                raise TensorRTError(
                    f"{path.name}: the engine has no tensor {n!r}, which the manifest names "
                    "(was it built from this model?)"
                )
        extra = sorted(set(names) - set(want_in) - set(want_out))
        if extra:
            raise TensorRTError(f"{path.name}: the engine has tensors the manifest does not name: {', '.join(extra)}")
        for s in self.specs:
            for n in (s.name, s.output):
                got = np.dtype(trt.nptype(engine.get_tensor_dtype(n)))
                if got != np.dtype(s.dtype):
                    raise TensorRTError(f"{path.name}: tensor {n} is {got} in the engine, {s.dtype} in the manifest")
        self.tok_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self.tokens)))
        self.log_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self.logits)))

    def new_context(self):
        ctx = self.engine.create_execution_context()
        if ctx is None:
            raise TensorRTError(
                f"{self.path.name}: TensorRT could not create an execution context "
                f"({self.log.last_error('out of GPU memory?')})"
            )
        return ctx

    def exec_for(self, B: int, T, graphs: bool) -> Exec:
        if not self.min_batch <= B <= self.max_batch:
            raise TensorRTError(
                f"a batch of {B} is outside this engine's profile ({self.min_batch}..{self.max_batch}): "
                f"rebuild it with rwkv-export build-engine --max-batch {B}"
            )
        if graphs and not self.seq:
            ex = self.graph_execs.get(B)
            if ex is None:
                ex = Exec(self, self.new_context(), own=True)
                ex.set_shapes(B, T)
                self.graph_execs[B] = ex
                while len(self.graph_execs) > MAX_CONTEXTS:
                    self.graph_execs.popitem(last=False)[1].destroy()
            else:
                self.graph_execs.move_to_end(B)
            return ex
        if self.shared is None:
            self.shared = Exec(self, self.new_context(), own=False)
        self.shared.set_shapes(B, T)
        return self.shared

    def destroy(self):
        for ex in self.graph_execs.values():
            ex.destroy()
        self.graph_execs.clear()
        if self.shared is not None:
            self.shared.destroy()
            self.shared = None
        self.engine = None
