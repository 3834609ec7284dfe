"""TensorRT backend for ``rwkv_runtime.Session``: ``.engine`` / ``.plan`` / ``.trt`` files.

Needs ``tensorrt`` (>= 10) and ``cuda-python`` (``cuda.bindings.runtime``, or ``cuda.cudart`` from
older releases); never torch. An engine travels with a JSON sidecar ``MODEL.engine.json`` written by
``rwkv-export build-engine``: the manifest, the tokenizer JSON, a learned initial state, and the plugin
libraries the engine needs.

Buffers (see docs/tensorrt.md):

- The recurrent state lives on the GPU. A backend value is a :class:`DeviceTensor`: a view (offset,
  shape, dtype) into a device allocation it keeps alive. A step writes all its output state tensors
  into one allocation (a *state set*) laid out per batch size.
- Double buffering rule: a step never writes into memory that a live value refers to. Output sets
  come from a small pool; a set goes back to the pool only when the last value using it has been
  garbage-collected. In the usual loop ``logits, st = s.step(t, st)`` the old state is dropped each
  step, so two sets per batch size alternate (A -> B, B -> A) and the state never goes through the
  host. A state the caller still holds (``snapshot = st``, ``st.copy()``, stepping one state twice)
  keeps its set; the next step takes another set from the pool instead.
- Tokens and logits go through pinned host buffers, copied with ``cudaMemcpyAsync`` on the
  backend's own stream around ``execute_async_v3``; every ``run`` ends with a stream synchronisation.
- ``cuda_graphs=True`` (or ``RWKV_TRT_CUDA_GRAPHS=1``): the step (token copy, engine, logits copy)
  is captured into a CUDA graph per batch size and per (input set, output set) addresses, on an
  execution context of its own for that batch size; with double buffering that is two graphs per
  batch size. A key is captured the second time it is seen (the first run is TensorRT's warm-up).
  If capture fails (an engine with operations that cannot be captured), that batch size runs without
  graphs.

Not thread-safe: use one Session per thread.
"""
from __future__ import annotations

import ctypes
import json
import os
import sys
from collections import OrderedDict, deque
from pathlib import Path

import numpy as np

from .errors import BackendUnavailable, RuntimeUserError
from .manifest import Manifest, decode_state

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
SIDECAR_FORMAT = "rwkv-trt-engine"
SIDECAR_VERSION = 1
PLUGIN_ENV = "RWKV_TRT_PLUGIN"
GRAPHS_ENV = "RWKV_TRT_CUDA_GRAPHS"
VERBOSE_ENV = "RWKV_TRT_VERBOSE"
MIN_TRT_MAJOR = 10
RWKV_PLUGIN_LIBRARY = "librwkv_trt_plugins.so"  # exporter/trt_plugin.py's LIBRARY_NAME
TRT_INSTALL_HINT = ("pip install tensorrt (NVIDIA's wheels; the install downloads the libraries from "
                    "pypi.nvidia.com) or pip install 'rwkv-export[tensorrt]'")
CUDA_INSTALL_HINT = "pip install cuda-python (or the [tensorrt] extra)"

_ALIGN = 256  # state tensors start at 256-byte offsets inside a set (cudaMalloc's own alignment)
_MAX_CONTEXTS = 8  # CUDA-graph execution contexts kept per engine (one per batch size)
_MAX_GRAPHS = 4  # captured graphs kept per context (2 in the double-buffered loop)


class TensorRTError(RuntimeUserError):
    """TensorRT or CUDA refused something (engine, plugin, shapes, memory); one line."""


# ---------------------------------------------------------------------------------------------
# The sidecar: the manifest travels beside the engine
# ---------------------------------------------------------------------------------------------
def sidecar_path(engine_path) -> Path:
    """``model.engine`` -> ``model.engine.json``."""
    p = Path(engine_path)
    return p.with_name(p.name + ".json")


def read_sidecar(engine_path) -> dict:
    path = Path(engine_path)
    side = sidecar_path(path)
    if not side.is_file():
        raise RuntimeUserError(f"{path.name}: no {side.name} beside it (engines built by rwkv-export build-engine "
                               "carry their manifest in that file; copy it with the engine or rebuild)")
    try:
        d = json.loads(side.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RuntimeUserError(f"{side.name}: not valid JSON ({e})") from None
    if not isinstance(d, dict) or d.get("format") != SIDECAR_FORMAT or not isinstance(d.get("manifest"), dict):
        raise RuntimeUserError(f"{side.name}: not an rwkv-export engine sidecar")
    if d.get("format_version") != SIDECAR_VERSION:
        raise RuntimeUserError(f"{side.name}: sidecar format version {d.get('format_version')} is not supported "
                               f"(this runtime reads version {SIDECAR_VERSION}); rebuild the engine")
    return d


def read_engine_manifest(engine_path) -> tuple[Manifest, str | None]:
    """The manifest (and embedded tokenizer JSON) of an engine, from its sidecar. Needs no TensorRT."""
    d = read_sidecar(engine_path)
    return Manifest.from_json(json.dumps(d["manifest"])), d.get("tokenizer_json")


def read_engine_initial_state(engine_path) -> dict:
    """A learned initial state recorded in the sidecar ({} if none)."""
    text = read_sidecar(engine_path).get("initial_state")
    return decode_state(text) if text else {}


# ---------------------------------------------------------------------------------------------
# Optional imports
# ---------------------------------------------------------------------------------------------
def _major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return 0


def import_tensorrt():
    """``tensorrt``, or a one-line :class:`BackendUnavailable` saying what to install."""
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendUnavailable(f"TensorRT is not installed: {TRT_INSTALL_HINT}") from None
    except OSError as e:  # the Python module is there, libnvinfer is not
        raise BackendUnavailable(f"TensorRT's libraries could not be loaded ({str(e).splitlines()[0][:160]}): "
                                 f"{TRT_INSTALL_HINT}") from None
    version = getattr(trt, "__version__", "0")
    if _major(version) < MIN_TRT_MAJOR:
        raise BackendUnavailable(f"TensorRT {version} is too old: rwkv-export needs TensorRT >= {MIN_TRT_MAJOR} "
                                 f"(strongly typed networks, execute_async_v3): {TRT_INSTALL_HINT}")
    return trt


def import_cudart():
    """The CUDA runtime bindings of cuda-python (>= 12.6 names them ``cuda.bindings.runtime``)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError:
            raise BackendUnavailable(f"running TensorRT engines needs cuda-python: {CUDA_INSTALL_HINT}") from None
    return cudart


_LOGGER = None


def trt_logger(trt):
    """One ILogger for the process (TensorRT keeps the first logger it is given as its global one).

    It remembers the last errors (for our one-line messages) and echoes warnings to ``echo``
    (stderr by default; ``RWKV_TRT_VERBOSE=1`` adds info messages)."""
    global _LOGGER
    if _LOGGER is None or not isinstance(_LOGGER, trt.ILogger):  # (another tensorrt module: tests' stand-in)
        class _Log(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.errors = deque(maxlen=20)
                self.echo = lambda msg: print(msg, file=sys.stderr)
                self.echo_level = 2  # Severity: 0 internal error, 1 error, 2 warning, 3 info, 4 verbose

            def log(self, severity, msg):
                try:  # nothing may escape into TensorRT
                    level = int(severity)
                    if level <= 1:
                        self.errors.append(str(msg).strip())
                    limit = 3 if os.environ.get(VERBOSE_ENV, "") not in ("", "0") else self.echo_level
                    if self.echo is not None and level <= limit:
                        self.echo(f"[TensorRT] {str(msg).strip()}")
                except Exception:  # noqa: BLE001
                    pass

            def last_error(self, default: str = "see TensorRT's log above") -> str:
                return self.errors[-1].splitlines()[0][:300] if self.errors else default

        _LOGGER = _Log()
    return _LOGGER


_LOADED_PLUGINS: dict = {}  # resolved path -> handle (loading a library twice fails in TensorRT)


def load_plugin_library(trt, path, echo=None) -> bool:
    """Register a plugin library with ``IPluginRegistry.load_library`` (once per process).

    ``load_library`` returns None if the library fails to load, or if its plugins are already
    registered (e.g. by a ``ctypes.CDLL`` of the same file): a warning then, not an error; a missing
    plugin shows up when the engine is built or deserialized."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise TensorRTError(f"plugin library {p} does not exist")
    key = str(p.resolve())
    if key in _LOADED_PLUGINS:
        return True
    log = trt_logger(trt)
    handle = trt.get_plugin_registry().load_library(key)
    _LOADED_PLUGINS[key] = handle
    if handle is None:
        (echo or log.echo or (lambda m: None))(
            f"warning: TensorRT did not load {p.name} ({log.last_error('no message')}); harmless if its plugins "
            "were already registered")
        return False
    return True


def _plugin_candidates(engine_path: Path, sidecar: dict) -> list:
    """Where each plugin library recorded in the sidecar may be: $RWKV_TRT_PLUGIN, beside the engine,
    the path it was built with, rwkv_export's default build directory."""
    env = os.environ.get(PLUGIN_ENV, "").strip()
    out = []
    recorded = [p for p in sidecar.get("plugins") or [] if isinstance(p, dict) and p.get("name")]
    for rec in recorded:
        name = rec["name"]
        cands = []
        if env and (Path(env).name == name or len(recorded) == 1):
            cands.append(Path(env).expanduser())
        cands.append(engine_path.with_name(name))
        if rec.get("path"):
            cands.append(Path(rec["path"]))
        if name == RWKV_PLUGIN_LIBRARY:
            try:
                from rwkv_export.trt_plugin import default_plugin_path

                cands.append(default_plugin_path())
            except Exception:  # noqa: BLE001 - the exporter is optional for the runtime
                pass
        found = next((c for c in cands if c.is_file()), None)
        if found is None:
            if env and cands[0] == Path(env).expanduser():
                raise TensorRTError(f"{PLUGIN_ENV}={env} does not exist")
            raise TensorRTError(f"{engine_path.name} needs the TensorRT plugin library {name}: put it beside the "
                                f"engine or set {PLUGIN_ENV}=/path/to/{name}")
        out.append(found)
    if env and not recorded:
        p = Path(env).expanduser()
        if not p.is_file():
            raise TensorRTError(f"{PLUGIN_ENV}={env} does not exist")
        out.append(p)
    return out


# ---------------------------------------------------------------------------------------------
# CUDA helpers
# ---------------------------------------------------------------------------------------------
def _code(err) -> int:
    return int(getattr(err, "value", err))


class _Cuda:
    """Thin checked calls into cuda-python (every call returns ``(cudaError_t, *results)``)."""

    def __init__(self, rt):
        self.rt = rt
        self.H2D = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.D2H = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self.D2D = rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice

    def name(self, err) -> str:
        try:
            res = self.rt.cudaGetErrorName(err)
            n = res[1] if isinstance(res, tuple) else res
            return n.decode() if isinstance(n, bytes) else str(n)
        except Exception:  # noqa: BLE001
            return f"CUDA error {_code(err)}"

    def call(self, what: str, result):
        res = result if isinstance(result, tuple) else (result,)
        if _code(res[0]) != 0:
            raise TensorRTError(f"{what} failed: {self.name(res[0])}")
        rest = res[1:]
        return rest[0] if len(rest) == 1 else (rest or None)

    def device_count(self) -> tuple[int, str]:
        res = self.rt.cudaGetDeviceCount()
        if _code(res[0]) != 0:
            return 0, self.name(res[0])
        return int(res[1]), ""


class _Pinned:
    """A page-locked host buffer (copies from it are truly asynchronous and CUDA-graph capturable)."""

    def __init__(self, cuda: _Cuda, nbytes: int):
        self.cuda, self.nbytes = cuda, max(int(nbytes), 1)
        self.ptr = int(cuda.call("cudaMallocHost", cuda.rt.cudaMallocHost(self.nbytes)))
        self.bytes = np.ctypeslib.as_array((ctypes.c_ubyte * self.nbytes).from_address(self.ptr))

    def view(self, shape, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        return self.bytes[:n].view(dtype).reshape(shape)

    def free(self):
        if self.ptr:
            self.bytes = None
            self.cuda.rt.cudaFreeHost(self.ptr)
            self.ptr = 0


class _Lease:
    """Ownership of one pooled device allocation: it returns to the pool when the last value using it
    is garbage-collected (CPython frees it as soon as the last reference goes)."""

    __slots__ = ("ptr", "nbytes", "pool")

    def __init__(self, ptr: int, nbytes: int, pool):
        self.ptr, self.nbytes, self.pool = ptr, nbytes, pool

    def __del__(self):
        try:
            self.pool.give_back(self.ptr, self.nbytes)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class _Pool:
    """Device allocations by size. Free ones are reused last-in first-out, so a step loop keeps
    getting the same two sets (and their CUDA graphs); at most ``keep`` free ones per size are kept."""

    def __init__(self, cuda: _Cuda, keep: int):
        self.cuda, self.keep = cuda, max(int(keep), 2)
        self.free: dict = {}
        self.live = 0  # allocations handed out and not yet back
        self.closed = False
        self.hold = False  # while capturing a CUDA graph: no cudaFree (not allowed during capture)
        self._deferred: list = []

    def take(self, nbytes: int) -> _Lease:
        nbytes = max(int(nbytes), 1)
        lst = self.free.get(nbytes)
        if lst:
            ptr = lst.pop()
        else:
            res = self.cuda.rt.cudaMalloc(nbytes)
            if _code(res[0]) != 0:  # out of memory: give the cached blocks back and try once more
                self.trim()
                res = self.cuda.rt.cudaMalloc(nbytes)
            ptr = int(self.cuda.call(f"cudaMalloc({nbytes} bytes)", res))
        self.live += 1
        return _Lease(ptr, nbytes, self)

    def give_back(self, ptr: int, nbytes: int):
        self.live -= 1
        lst = self.free.setdefault(nbytes, [])
        if not self.closed and len(lst) < self.keep:
            lst.append(ptr)
        elif self.hold:
            self._deferred.append(ptr)
        else:
            self.cuda.rt.cudaFree(ptr)

    def release_deferred(self):
        self.hold = False
        while self._deferred:
            self.cuda.rt.cudaFree(self._deferred.pop())

    def trim(self):
        for lst in self.free.values():
            while lst:
                self.cuda.rt.cudaFree(lst.pop())

    def close(self):
        self.trim()
        self.release_deferred()
        self.closed = True


class DeviceTensor:
    """A state tensor on the GPU: ``shape``/``dtype`` at byte ``offset`` of an allocation it keeps alive.

    Immutable from Python: ``to_numpy`` copies it to the host; the runtime never writes into it again."""

    __slots__ = ("lease", "offset", "shape", "dtype")

    def __init__(self, lease: _Lease, offset: int, shape: tuple, dtype):
        self.lease, self.offset, self.shape, self.dtype = lease, int(offset), tuple(shape), np.dtype(dtype)

    @property
    def ptr(self) -> int:
        return self.lease.ptr + self.offset

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def __repr__(self):
        return f"DeviceTensor(shape={list(self.shape)}, dtype={self.dtype}, ptr=0x{self.ptr:x})"


# ---------------------------------------------------------------------------------------------
# One engine (step or sequence graph)
# ---------------------------------------------------------------------------------------------
class _IO:
    """Device + pinned host buffers for the tokens and the logits; ``fixed`` ones never move (CUDA
    graphs hold their addresses), the shared ones grow when a larger shape comes."""

    def __init__(self, cuda: _Cuda, fixed: bool):
        self.cuda, self.fixed = cuda, fixed
        self.cap = (0, 0)
        self.tok_dev = self.log_dev = 0
        self.tok_host = self.log_host = None

    def ensure(self, tok_bytes: int, log_bytes: int):
        if tok_bytes <= self.cap[0] and log_bytes <= self.cap[1]:
            return
        if self.fixed and self.cap != (0, 0):
            raise TensorRTError("internal error: a CUDA-graph I/O buffer would have to move")
        self.free()
        tok_bytes, log_bytes = max(tok_bytes, 8), max(log_bytes, 8)
        rt = self.cuda.rt
        self.tok_dev = int(self.cuda.call("cudaMalloc", rt.cudaMalloc(tok_bytes)))
        self.log_dev = int(self.cuda.call("cudaMalloc", rt.cudaMalloc(log_bytes)))
        self.tok_host = _Pinned(self.cuda, tok_bytes)
        self.log_host = _Pinned(self.cuda, log_bytes)
        self.cap = (tok_bytes, log_bytes)

    def free(self):
        rt = self.cuda.rt
        for p in (self.tok_dev, self.log_dev):
            if p:
                rt.cudaFree(p)
        for h in (self.tok_host, self.log_host):
            if h is not None:
                h.free()
        self.tok_dev = self.log_dev = 0
        self.tok_host = self.log_host = None
        self.cap = (0, 0)


class _Exec:
    """An execution context with input shapes set for one (batch, T), and, when it is the context of
    a CUDA-graph batch size, its captured graphs."""

    def __init__(self, runner: "_Runner", ctx, own: bool):
        self.runner, self.ctx, self.own = runner, ctx, own
        self.key = None
        self.logits_shape: tuple = ()
        self.io = _IO(runner.cuda, fixed=own)
        self.graphs: OrderedDict = OrderedDict()  # (input ptrs, output set ptr) -> cudaGraphExec_t
        self.seen: set = set()
        self.capturable = own

    def set_shapes(self, B: int, T):
        r = self.runner
        if self.key == (B, T):
            return
        tok_shape = (B,) if T is None else (B, T)
        if not self.ctx.set_input_shape(r.tokens, tok_shape):
            raise TensorRTError(f"{r.path.name}: TensorRT rejected tokens of shape {list(tok_shape)} "
                                f"({r.log.last_error('outside the optimization profile')})")
        for s in r.specs:
            if not self.ctx.set_input_shape(s.name, s.concrete_shape(B)):
                raise TensorRTError(f"{r.path.name}: TensorRT rejected {s.name} of shape "
                                    f"{list(s.concrete_shape(B))} ({r.log.last_error('outside the profile')})")
        shape = tuple(int(d) for d in self.ctx.get_tensor_shape(r.logits))
        if any(d < 0 for d in shape):
            raise TensorRTError(f"{r.path.name}: TensorRT could not infer the logits shape ({r.log.last_error()})")
        tok_bytes = int(np.prod(tok_shape)) * r.tok_dtype.itemsize
        self.io.ensure(tok_bytes, int(np.prod(shape)) * r.log_dtype.itemsize)
        self.key, self.logits_shape = (B, T), shape

    def destroy(self):
        rt = self.runner.cuda.rt
        for g in self.graphs.values():
            rt.cudaGraphExecDestroy(g)
        self.graphs.clear()
        self.io.free()
        self.ctx = None


class _Runner:
    """A deserialized engine, its I/O names and profile limits, and its execution contexts."""

    def __init__(self, backend: "TrtBackend", kind: str, path: Path):
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
            hint = (f" (built with TensorRT {built}, this is {trt.__version__})"
                    if built and built != trt.__version__ else "")
            raise TensorRTError(f"{path.name}: TensorRT could not deserialize this engine{hint}: "
                                f"{self.log.last_error()}; engines are specific to a TensorRT version and GPU, "
                                "rebuild it with rwkv-export build-engine")
        self.engine = engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        mode = {n: engine.get_tensor_mode(n) for n in names}
        want_in = [self.tokens] + [s.name for s in self.specs]
        want_out = [self.logits] + [s.output for s in self.specs]
        for n in want_in + want_out:
            if n not in mode:
                raise TensorRTError(f"{path.name}: the engine has no tensor {n!r}, which the manifest names "
                                    "(was it built from this model?)")
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
        lo, _, hi = (tuple(int(d) for d in dims) for dims in engine.get_tensor_profile_shape(self.tokens, 0))
        self.min_batch, self.max_batch = lo[0], hi[0]
        self.max_seq = hi[1] if self.seq and len(hi) > 1 else 1
        self.shared = None  # the context for plain runs (every shape)
        self.graph_execs: OrderedDict = OrderedDict()  # batch -> _Exec with its own context

    def new_context(self):
        ctx = self.engine.create_execution_context()
        if ctx is None:
            raise TensorRTError(f"{self.path.name}: TensorRT could not create an execution context "
                                f"({self.log.last_error('out of GPU memory?')})")
        return ctx

    def exec_for(self, B: int, T, graphs: bool) -> _Exec:
        if not self.min_batch <= B <= self.max_batch:
            raise TensorRTError(f"a batch of {B} is outside this engine's profile ({self.min_batch}..{self.max_batch}): "
                                f"rebuild it with rwkv-export build-engine --max-batch {B}")
        if graphs and not self.seq:
            ex = self.graph_execs.get(B)
            if ex is None:
                ex = _Exec(self, self.new_context(), own=True)
                ex.set_shapes(B, T)
                self.graph_execs[B] = ex
                while len(self.graph_execs) > _MAX_CONTEXTS:
                    self.graph_execs.popitem(last=False)[1].destroy()
            else:
                self.graph_execs.move_to_end(B)
            return ex
        if self.shared is None:
            self.shared = _Exec(self, self.new_context(), own=False)
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


# ---------------------------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------------------------
class TrtBackend:
    """Runs a TensorRT engine (and its sequence companion) for ``Session``; see the module docstring."""

    def __init__(self, path, manifest: Manifest, cuda_graphs: bool | None = None, pool_keep: int | None = None):
        self.path = Path(path)
        self.manifest = manifest
        self.device = "cuda"
        self.sidecar = read_sidecar(self.path)
        self.trt = import_tensorrt()
        self.cuda = _Cuda(import_cudart())
        n, why = self.cuda.device_count()
        if n < 1:
            raise BackendUnavailable(f"no CUDA device for TensorRT ({why or 'none found'})")
        if cuda_graphs is None:
            cuda_graphs = os.environ.get(GRAPHS_ENV, "").strip().lower() in ("1", "true", "yes", "on")
        self.cuda_graphs = bool(cuda_graphs)
        self.log = trt_logger(self.trt)
        self._runners: dict = {}
        self._has: dict = {}
        self._layouts: dict = {}
        self._warned_capture = False
        # at least two free sets of every size (the double buffer), plus room for from_numpy's tensors
        self.pool = _Pool(self.cuda, pool_keep or 2 * (len(manifest.state) + 1))
        self.stream = None
        self.stream = self.cuda.call("cudaStreamCreate", self.cuda.rt.cudaStreamCreate())
        self.stream_handle = int(self.stream)
        # the runtime first (its logger is TensorRT's global one, which plugins log through), then the
        # plugin libraries, then the engines
        self.runtime = self.trt.Runtime(self.log)
        for lib in _plugin_candidates(self.path, self.sidecar):
            load_plugin_library(self.trt, lib)
        self._runner(self.manifest.graph)  # fail early on a bad engine; a companion loads on first use

    # -- graphs ---------------------------------------------------------------------------------
    def graph_path(self, kind: str) -> Path:
        if self.manifest.graph == kind:
            return self.path
        name = self.manifest.companions.get(kind)
        p = self.path.with_name(name) if name else None
        if p is None or not p.is_file():
            raise RuntimeUserError(f"no {kind} engine for {self.path.name} (build-engine builds it when the "
                                   f"ONNX export has a {kind} graph)")
        return p

    def has(self, kind: str) -> bool:
        if kind not in self._has:  # (asked every step: checked once)
            try:
                self.graph_path(kind)
                self._has[kind] = True
            except RuntimeUserError:
                self._has[kind] = False
        return self._has[kind]

    def _runner(self, kind: str) -> _Runner:
        r = self._runners.get(kind)
        if r is None:
            r = self._runners[kind] = _Runner(self, kind, self.graph_path(kind))
        return r

    def initial_state(self) -> dict:
        text = self.sidecar.get("initial_state")
        return decode_state(text) if text else {}

    # -- values ---------------------------------------------------------------------------------
    def from_numpy(self, arr) -> DeviceTensor:
        arr = np.ascontiguousarray(arr)
        t = DeviceTensor(self.pool.take(arr.nbytes), 0, arr.shape, arr.dtype)
        if arr.nbytes:
            self.cuda.call("cudaMemcpyAsync", self.cuda.rt.cudaMemcpyAsync(
                t.ptr, arr.ctypes.data, arr.nbytes, self.cuda.H2D, self.stream))
            self._sync()  # arr may be freed as soon as we return
        return t

    def to_numpy(self, value) -> np.ndarray:
        if not isinstance(value, DeviceTensor):
            return np.asarray(value)
        out = np.empty(value.shape, value.dtype)
        if out.nbytes:
            self.cuda.call("cudaMemcpyAsync", self.cuda.rt.cudaMemcpyAsync(
                out.ctypes.data, value.ptr, out.nbytes, self.cuda.D2H, self.stream))
            self._sync()
        return out

    def _sync(self):
        self.cuda.call("cudaStreamSynchronize", self.cuda.rt.cudaStreamSynchronize(self.stream))

    def _layout(self, specs, B: int):
        """Offsets of every state tensor inside one output set for batch B (cached per specs list)."""
        key = (id(specs), B)
        lay = self._layouts.get(key)
        if lay is None:
            off, items = 0, []
            for s in specs:
                shape = s.concrete_shape(B)
                items.append((off, shape, np.dtype(s.dtype)))
                off += -(-int(np.prod(shape)) * np.dtype(s.dtype).itemsize // _ALIGN) * _ALIGN
            lay = self._layouts[key] = (items, max(off, 1), specs)  # specs kept alive: id() stays unique
        return lay[0], lay[1]

    # -- running --------------------------------------------------------------------------------
    def run(self, kind: str, tokens: np.ndarray, values: dict, specs: list):
        """tokens [B] (step) or [B, T] (sequence) -> (logits float32 on the host, new state values)."""
        if kind == "step" and not self.has("step") and self.has("sequence"):
            logits, new = self.run("sequence", tokens[:, None], values, specs)
            return (logits[:, -1] if logits.ndim == 3 else logits), new
        r = self._runner(kind)
        tokens = np.ascontiguousarray(tokens)
        if r.seq and tokens.shape[1] > r.max_seq:  # longer than the profile allows: chunks of max_seq
            parts = []
            for s in range(0, tokens.shape[1], r.max_seq):
                lg, values = self._run_once(r, tokens[:, s:s + r.max_seq], values, specs)
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
                raise RuntimeUserError(f"state tensor {s.name} is {list(v.shape)} {v.dtype}, expected "
                                       f"{list(s.concrete_shape(B))} {s.dtype}")
            out.append(v)
        return out

    def _run_once(self, r: _Runner, tokens: np.ndarray, values: dict, specs: list):
        B = int(tokens.shape[0])
        T = int(tokens.shape[1]) if r.seq else None
        graphs = self.cuda_graphs and not r.seq
        ex = r.exec_for(B, T, graphs)
        inputs = self._device_inputs(values, specs, B)
        in_ptrs = tuple(v.ptr for v in inputs)
        items, total = self._layout(specs, B)
        lease = self.pool.take(total)  # never memory a live value uses: the double-buffering rule
        out = {s.name: DeviceTensor(lease, off, shape, dt) for s, (off, shape, dt) in zip(specs, items)}
        tok_host = ex.io.tok_host.view(tokens.shape, r.tok_dtype)
        np.copyto(tok_host, tokens, casting="unsafe")
        key = (in_ptrs, lease.ptr)
        gexec = ex.graphs.get(key) if graphs else None
        if gexec is None and graphs and ex.capturable and key in ex.seen:
            gexec = self._capture(r, ex, specs, in_ptrs, out, key)
        if gexec is not None:
            ex.graphs.move_to_end(key)
            self.cuda.call("cudaGraphLaunch", self.cuda.rt.cudaGraphLaunch(gexec, self.stream))
        else:
            self._bind(r, ex, specs, in_ptrs, out)
            self._enqueue(r, ex)
            if graphs and ex.capturable:
                if len(ex.seen) > 64:
                    ex.seen.clear()
                ex.seen.add(key)
        self._sync()
        del inputs  # (held until here: the engine read them)
        logits = ex.io.log_host.view(ex.logits_shape, r.log_dtype)
        return logits.astype(np.float32, copy=True), out

    def _bind(self, r: _Runner, ex: _Exec, specs, in_ptrs, out):
        ctx = ex.ctx
        ok = ctx.set_tensor_address(r.tokens, ex.io.tok_dev) and ctx.set_tensor_address(r.logits, ex.io.log_dev)
        for s, p in zip(specs, in_ptrs):
            ok = ctx.set_tensor_address(s.name, p) and ok
            ok = ctx.set_tensor_address(s.output, out[s.name].ptr) and ok
        if not ok:
            raise TensorRTError(f"{r.path.name}: TensorRT rejected a tensor address ({r.log.last_error()})")

    def _enqueue(self, r: _Runner, ex: _Exec):
        """Token copy in, the engine, logits copy out: all on our stream (also what a graph captures)."""
        rt, cuda = self.cuda.rt, self.cuda
        B, T = ex.key
        tok_bytes = B * (T or 1) * r.tok_dtype.itemsize
        cuda.call("cudaMemcpyAsync", rt.cudaMemcpyAsync(ex.io.tok_dev, ex.io.tok_host.ptr, tok_bytes, cuda.H2D,
                                                        self.stream))
        if not ex.ctx.execute_async_v3(self.stream_handle):
            raise TensorRTError(f"{r.path.name}: TensorRT execution failed ({r.log.last_error()})")
        log_bytes = int(np.prod(ex.logits_shape)) * r.log_dtype.itemsize
        cuda.call("cudaMemcpyAsync", rt.cudaMemcpyAsync(ex.io.log_host.ptr, ex.io.log_dev, log_bytes, cuda.D2H,
                                                        self.stream))

    def _capture(self, r: _Runner, ex: _Exec, specs, in_ptrs, out, key):
        """Capture the step for these addresses (TensorRT's warm-up run happened when the key was first
        seen); None, and no more tries for this batch size, if the engine cannot be captured."""
        rt = self.cuda.rt
        self._bind(r, ex, specs, in_ptrs, out)
        mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self.cuda.call("cudaStreamBeginCapture", rt.cudaStreamBeginCapture(self.stream, mode))
        self.pool.hold = True
        ok, why = False, ""
        try:
            self._enqueue(r, ex)
            ok = True
        except RuntimeUserError as e:
            why = str(e)
        finally:
            res = rt.cudaStreamEndCapture(self.stream)
            self.pool.release_deferred()
        err, graph = res[0], (res[1] if len(res) > 1 else None)
        gexec = None
        if _code(err) == 0 and graph is not None:
            if ok:
                ires = rt.cudaGraphInstantiateWithFlags(graph, 0)
                if _code(ires[0]) == 0:
                    gexec = ires[1]
                else:
                    why = f"cudaGraphInstantiate: {self.cuda.name(ires[0])}"
            rt.cudaGraphDestroy(graph)
        elif not why:
            why = f"cudaStreamEndCapture: {self.cuda.name(err)}"
        if gexec is None:
            rt.cudaGetLastError()  # clear the capture error so later calls do not see it
            ex.capturable = False
            ex.seen.clear()
            if not self._warned_capture:
                self._warned_capture = True
                print(f"warning: {r.path.name}: CUDA graph capture failed ({why}); running without CUDA graphs",
                      file=sys.stderr)
            return None
        ex.graphs[key] = gexec
        while len(ex.graphs) > _MAX_GRAPHS:
            rt.cudaGraphExecDestroy(ex.graphs.popitem(last=False)[1])
        return gexec

    # -- teardown -------------------------------------------------------------------------------
    def close(self):
        """Free the engines, contexts, graphs and cached buffers (live states free theirs when dropped).
        Safe on a half-constructed backend and when called twice."""
        if getattr(self, "stream", None) is None:
            return
        try:
            self._sync()
        except RuntimeUserError:
            pass
        for r in getattr(self, "_runners", {}).values():
            r.destroy()
        self._runners = {}
        self.pool.close()
        self.cuda.rt.cudaStreamDestroy(self.stream)
        self.stream = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


