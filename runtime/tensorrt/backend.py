"""``TrtBackend``: runs a TensorRT engine (and its sequence companion) for ``Session``; implements
``rwkv_runtime.backend.Backend``. See docs/tensorrt.md and the package docstring for the buffer rules.

Callable from any thread: every entry point (``run``, ``from_numpy``, ``to_numpy``, ``close``) makes
the CUDA context current on the calling thread (``Cuda.bind``) and holds one lock, so calls from
several threads are serialised rather than interleaved on the one stream.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import numpy as np

from ..artifact import read_sidecar
from ..errors import RuntimeUserError
from ..manifest import Manifest
from . import loader
from .loader import GRAPHS_ENV, TensorRTError, load_plugin_library, plugin_candidates, trt_logger
from .memory import ALIGN, Cuda, DeviceTensor, Pool
from .runner import Exec, Runner


class TrtBackend:
    """Runs a TensorRT engine (and its sequence companion) for ``Session``."""

    def __init__(
        self, path, manifest: Manifest, cuda_graphs: bool | None = None, pool_keep: int | None = None, plugin=None
    ):
        self._lock = threading.RLock()
        self.path = Path(path)
        self.manifest = manifest
        self.device = "cuda"
        self.sidecar = read_sidecar(self.path)
        self.trt = loader.import_tensorrt()
        self.cuda = Cuda(loader.import_cuda_core())
        if cuda_graphs is None:
            cuda_graphs = os.environ.get(GRAPHS_ENV, "").strip().lower() in ("1", "true", "yes", "on")
        self.cuda_graphs = bool(cuda_graphs)
        self.log = trt_logger(self.trt)
        self._runners: dict = {}
        self._has: dict = {}
        self._layouts: dict = {}
        self._warned_capture = False
        # at least two free sets of every size (the double buffer), plus room for from_numpy's tensors
        self.pool = Pool(self.cuda, pool_keep or 2 * (len(manifest.state) + 1))
        # the runtime first (its logger is TensorRT's global one, which plugins log through), then the
        # plugin libraries, then the engines
        self.runtime = self.trt.Runtime(self.log)
        for lib in plugin_candidates(self.path, self.sidecar, plugin):
            load_plugin_library(self.trt, lib)
        self._runner(self.manifest.graph)  # fail early on a bad engine; a companion loads on first use

    # -- graphs ---------------------------------------------------------------------------------
    def graph_path(self, kind: str) -> Path:
        if self.manifest.graph == kind:
            return self.path
        name = self.manifest.companions.get(kind)
        p = self.path.with_name(name) if name else None
        if p is None or not p.is_file():
            raise RuntimeUserError(
                f"no {kind} engine for {self.path.name} (build-engine builds it when the "
                f"ONNX export has a {kind} graph)"
            )
        return p

    def has(self, kind: str) -> bool:
        if kind not in self._has:  # (asked every step: checked once)
            try:
                self.graph_path(kind)
                self._has[kind] = True
            except RuntimeUserError:
                self._has[kind] = False
        return self._has[kind]

    def _runner(self, kind: str) -> Runner:
        r = self._runners.get(kind)
        if r is None:
            r = self._runners[kind] = Runner(self, kind, self.graph_path(kind))
        return r

    # -- values ---------------------------------------------------------------------------------
    def from_numpy(self, arr) -> DeviceTensor:
        arr = np.ascontiguousarray(arr)
        with self._lock:
            self.cuda.bind()
            t = DeviceTensor(self.pool.take(arr.nbytes), 0, arr.shape, arr.dtype)
            if arr.nbytes:
                self.cuda.copy(t.ptr, arr.ctypes.data, arr.nbytes)
                self.cuda.sync()  # arr may be freed as soon as we return
        return t

    def to_numpy(self, value) -> np.ndarray:
        if not isinstance(value, DeviceTensor):
            return np.asarray(value)
        out = np.empty(value.shape, value.dtype)
        if out.nbytes:
            with self._lock:
                self.cuda.bind()
                self.cuda.copy(out.ctypes.data, value.ptr, out.nbytes)
                self.cuda.sync()
        return out

    def _layout(self, specs, B: int):
        """Offsets of every state tensor inside one output set for batch B (cached per specs list)."""
        key = (id(specs), B)
        lay = self._layouts.get(key)
        if lay is None:
            off, items = 0, []
            for s in specs:
                shape = s.concrete_shape(B)
                items.append((off, shape, np.dtype(s.dtype)))
                off += -(-int(np.prod(shape)) * np.dtype(s.dtype).itemsize // ALIGN) * ALIGN
            lay = self._layouts[key] = (items, max(off, 1), specs)  # specs kept alive: id() stays unique
        return lay[0], lay[1]

    # -- running --------------------------------------------------------------------------------
    def run(self, kind: str, tokens: np.ndarray, values: dict, specs: list):
        """tokens [B] (step) or [B, T] (sequence) -> (logits float32 on the host, new state values)."""
        with self._lock:
            self.cuda.bind()
            return self._run(kind, tokens, values, specs)

    def _run(self, kind: str, tokens: np.ndarray, values: dict, specs: list):
        if kind == "step" and not self.has("step") and self.has("sequence"):
            logits, new = self._run("sequence", tokens[:, None], values, specs)
            return (logits[:, -1] if logits.ndim == 3 else logits), new
        r = self._runner(kind)
        tokens = np.ascontiguousarray(tokens)
        if r.seq and tokens.shape[1] > r.max_seq:  # longer than the profile allows: chunks of max_seq
            parts = []
            for s in range(0, tokens.shape[1], r.max_seq):
                lg, values = self._run_once(r, tokens[:, s : s + r.max_seq], values, specs)
                parts.append(lg)
            return (np.concatenate(parts, axis=1) if parts[0].ndim == 3 else parts[-1]), values
        return self._run_once(r, tokens, values, specs)

    def _device_inputs(self, values: dict, specs: list, B: int) -> list:
        """The input state as DeviceTensors (numpy values, e.g. from another backend, are uploaded;
        the caller keeps the returned list alive until the run has finished)."""
        out = []
        for s in specs:
            v = values[s.name]
            if not isinstance(v, DeviceTensor):
                v = self.from_numpy(np.asarray(v, dtype=s.dtype))
            if v.shape != s.concrete_shape(B) or v.dtype != np.dtype(s.dtype):
                raise RuntimeUserError(
                    f"state tensor {s.name} is {list(v.shape)} {v.dtype}, expected "
                    f"{list(s.concrete_shape(B))} {s.dtype}"
                )
            out.append(v)
        return out

    def _run_once(self, r: Runner, tokens: np.ndarray, values: dict, specs: list):
        B = int(tokens.shape[0])
        T = int(tokens.shape[1]) if r.seq else None
        graphs = self.cuda_graphs and not r.seq
        ex = r.exec_for(B, T, graphs)
        inputs = self._device_inputs(values, specs, B)
        in_ptrs = tuple(v.ptr for v in inputs)
        items, total = self._layout(specs, B)
        lease = self.pool.take(total)  # never memory a live value uses: the double-buffering rule
        out = {s.name: DeviceTensor(lease, off, shape, dt) for s, (off, shape, dt) in zip(specs, items)}
        np.copyto(ex.io.tok_host.view(tokens.shape, r.tok_dtype), tokens, casting="unsafe")
        key = (in_ptrs, lease.ptr)
        graph = ex.graphs.get(key) if graphs else None
        if graph is None and graphs and ex.capturable and key in ex.seen:
            graph = self._capture(r, ex, specs, in_ptrs, out, key)
        if graph is not None:
            ex.graphs.move_to_end(key)
            self.cuda.call("launching a CUDA graph", graph.launch, self.cuda.stream)
        else:
            self._bind(r, ex, specs, in_ptrs, out)
            self._enqueue(r, ex, self.cuda.stream)
            if graphs and ex.capturable:
                if len(ex.seen) > 64:
                    ex.seen.clear()
                ex.seen.add(key)
        self.cuda.sync()
        del inputs  # (held until here: the engine read them)
        logits = ex.io.log_host.view(ex.logits_shape, r.log_dtype)
        return logits.astype(np.float32, copy=True), out

    def _bind(self, r: Runner, ex: Exec, specs, in_ptrs, out):
        ctx = ex.ctx
        ok = ctx.set_tensor_address(r.tokens, int(ex.io.tok_dev.handle)) and ctx.set_tensor_address(
            r.logits, int(ex.io.log_dev.handle)
        )
        for s, p in zip(specs, in_ptrs):
            ok = ctx.set_tensor_address(s.name, p) and ok
            ok = ctx.set_tensor_address(s.output, out[s.name].ptr) and ok
        if not ok:
            raise TensorRTError(f"{r.path.name}: TensorRT rejected a tensor address ({r.log.last_error()})")

    def _enqueue(self, r: Runner, ex: Exec, stream):
        """Token copy in, the engine, logits copy out, all on ``stream`` (ours, or a GraphBuilder while
        capturing: then exactly this is what the graph replays)."""
        B, T = ex.key
        stream = getattr(stream, "stream", stream)  # a GraphBuilder captures what runs on its stream
        self.cuda.copy(ex.io.tok_dev.handle, ex.io.tok_host.buf.handle, B * (T or 1) * r.tok_dtype.itemsize, stream)
        if not ex.ctx.execute_async_v3(int(stream.handle)):
            raise TensorRTError(f"{r.path.name}: TensorRT execution failed ({r.log.last_error()})")
        log_bytes = int(np.prod(ex.logits_shape)) * r.log_dtype.itemsize
        self.cuda.copy(ex.io.log_host.buf.handle, ex.io.log_dev.handle, log_bytes, stream)

    def _capture(self, r: Runner, ex: Exec, specs, in_ptrs, out, key):
        """Capture the step for these addresses (TensorRT's warm-up run happened when the key was first
        seen); None, and no more tries for this batch size, if the engine cannot be captured."""
        self._bind(r, ex, specs, in_ptrs, out)
        graph, why = None, ""
        builder = None
        self.pool.hold = True  # nothing may be freed while the stream captures
        try:
            builder = self.cuda.call("starting a CUDA graph capture", self.cuda.stream.create_graph_builder)
            self.cuda.call("starting a CUDA graph capture", builder.begin_building, "thread_local")
            try:
                self._enqueue(r, ex, builder)
            finally:
                self.cuda.call("ending a CUDA graph capture", builder.end_building)
            graph = self.cuda.call("instantiating a CUDA graph", builder.complete)
        except RuntimeUserError as e:
            why = str(e)
        finally:
            if builder is not None:
                try:
                    builder.close()
                except Exception:  # noqa: BLE001
                    pass
            self.pool.release_deferred()
        if graph is None:
            ex.capturable = False
            ex.seen.clear()
            if not self._warned_capture:
                self._warned_capture = True
                print(
                    f"warning: {r.path.name}: CUDA graph capture failed ({why}); running without CUDA graphs",
                    file=sys.stderr,
                )
            return None
        ex.keep_graph(key, graph)
        return graph

    # -- teardown -------------------------------------------------------------------------------
    def close(self):
        """Free the engines, contexts, graphs and cached buffers (live states free theirs when dropped).
        Safe on a half-constructed backend and when called twice."""
        with getattr(self, "_lock", None) or threading.RLock():
            self._close()

    def _close(self):
        cuda = getattr(self, "cuda", None)
        if cuda is None:
            return
        try:
            cuda.sync()
        except RuntimeUserError:
            pass
        for r in getattr(self, "_runners", {}).values():
            r.destroy()
        self._runners = {}
        if getattr(self, "pool", None) is not None:
            self.pool.close()
        cuda.close()
        self.cuda = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
