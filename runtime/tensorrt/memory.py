"""The CUDA side of the TensorRT backend, through NVIDIA's ``cuda.core``: one device and stream,
device buffers from the device's (stream-ordered) memory resource, pinned host buffers from
``LegacyPinnedMemoryResource``, and CUDA graphs from ``Stream.create_graph_builder``.

What is ours is the double-buffering rule (docs/tensorrt.md): a run writes its new state into a
*state set* that no live value refers to. A set is handed back when the last value using it is
garbage-collected, and kept (a few per size) for reuse, so that a step loop alternates between the
same two addresses -- which is what lets a captured CUDA graph be launched again.
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np

from ..errors import BackendUnavailable
from .loader import TensorRTError

ALIGN = 256  # state tensors start at 256-byte offsets inside a set (the allocators' own alignment)


def _why(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


class Cuda:
    """The device, its stream and the two memory resources the backend uses.

    The current CUDA context is a per-thread setting (cuda.core's ``Device.set_current`` binds the
    device's primary context to the calling thread only), and a Session may be created on one thread
    and stepped on another (the server creates it on the main thread and steps on its scheduler
    thread). So every entry point calls ``bind()``, which makes the context current on the calling
    thread the first time that thread comes through."""

    def __init__(self, cc, device_id: int = 0):
        self.cc = cc
        self._bound = threading.local()
        try:
            self.device = cc.Device(device_id)
            self.bind()
            self.stream = self.device.create_stream()
        except Exception as e:  # noqa: BLE001 - no driver, no device, or a broken install
            raise BackendUnavailable(f"no CUDA device for TensorRT ({_why(e)})") from None
        self.pinned = cc.LegacyPinnedMemoryResource()
        self.handle = int(self.stream.handle)  # what TensorRT's execute_async_v3 takes

    def bind(self):
        """Make the device's context current on the calling thread (once per thread)."""
        if not getattr(self._bound, "done", False):
            self.device.set_current()
            self._bound.done = True

    def call(self, what: str, fn, *args, **kw):
        """A cuda.core call with its failure turned into one line."""
        try:
            return fn(*args, **kw)
        except TensorRTError:
            raise
        except Exception as e:  # noqa: BLE001 - cuda.core raises CUDAError and friends
            raise TensorRTError(f"{what} failed: {_why(e)}") from None

    def allocate(self, nbytes: int):
        """A device Buffer; on failure the cached free sets go back first (see Pool.trim)."""
        self.bind()
        return self.call(
            f"allocating {nbytes} bytes on the GPU", self.device.allocate, max(int(nbytes), 1), stream=self.stream
        )

    def copy(self, dst: int, src: int, nbytes: int, stream=None):
        """``nbytes`` from address ``src`` to ``dst`` (host or device: unified addressing), asynchronous
        on ``stream`` (default: ours). The addresses are wrapped as Buffers without a memory resource,
        so the wrappers never free anything."""
        if nbytes <= 0:
            return
        self.bind()
        wrap = self.cc.Buffer.from_handle
        self.call(
            "copy", wrap(int(dst), int(nbytes)).copy_from, wrap(int(src), int(nbytes)), stream=stream or self.stream
        )

    def sync(self):
        self.bind()
        self.call("stream synchronization", self.stream.sync)

    def close(self):
        try:
            self.bind()
            self.stream.sync()
            self.stream.close()
        except Exception:  # noqa: BLE001 - teardown
            pass


class Pinned:
    """A page-locked host buffer and a numpy view of it (copies from it are truly asynchronous and
    can be captured into a CUDA graph; copies from pageable memory cannot)."""

    def __init__(self, cuda: Cuda, nbytes: int):
        self.nbytes = max(int(nbytes), 1)
        self.buf = cuda.call("allocating pinned host memory", cuda.pinned.allocate, self.nbytes)
        self.bytes = np.ctypeslib.as_array((ctypes.c_ubyte * self.nbytes).from_address(int(self.buf.handle)))

    def view(self, shape, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        return self.bytes[:n].view(dtype).reshape(shape)

    def close(self):
        if self.buf is not None:
            self.bytes = None
            self.buf.close()
            self.buf = None


class Lease:
    """Ownership of one pooled device Buffer: it returns to the pool when the last value using it is
    garbage-collected (CPython frees it as soon as the last reference goes)."""

    __slots__ = ("buf", "ptr", "nbytes", "pool")

    def __init__(self, buf, nbytes: int, pool: Pool):
        self.buf, self.ptr, self.nbytes, self.pool = buf, int(buf.handle), nbytes, pool

    def __del__(self):
        try:
            self.pool.give_back(self.buf, self.nbytes)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class Pool:
    """Free device Buffers by size, reused last-in first-out (a step loop keeps getting the same two
    sets, hence the same CUDA graphs); at most ``keep`` per size, the rest are closed."""

    def __init__(self, cuda: Cuda, keep: int):
        self.cuda, self.keep = cuda, max(int(keep), 2)
        self.free: dict = {}
        self.live = 0  # buffers handed out and not yet back
        self.closed = False
        self.hold = False  # while capturing a CUDA graph: nothing is freed (not allowed during capture)
        self._deferred: list = []
        self._lock = threading.RLock()  # a Lease may be dropped (and given back) on any thread

    def take(self, nbytes: int) -> Lease:
        nbytes = max(int(nbytes), 1)
        with self._lock:
            lst = self.free.get(nbytes)
            buf = lst.pop() if lst else None
        if buf is None:
            try:
                buf = self.cuda.allocate(nbytes)
            except TensorRTError:  # out of memory: give the cached sets back and try once more
                self.trim()
                buf = self.cuda.allocate(nbytes)
        with self._lock:
            self.live += 1
        return Lease(buf, nbytes, self)

    def give_back(self, buf, nbytes: int):
        # may run on any thread: the one that drops a state's last reference
        with self._lock:
            self.live -= 1
            lst = self.free.setdefault(nbytes, [])
            if not self.closed and len(lst) < self.keep:
                lst.append(buf)
                return
            if self.hold:
                self._deferred.append(buf)
                return
        self.cuda.bind()
        buf.close(self.cuda.stream)

    def release_deferred(self):
        self.hold = False
        self.cuda.bind()
        while self._deferred:
            self._deferred.pop().close(self.cuda.stream)

    def trim(self):
        self.cuda.bind()
        for lst in self.free.values():
            while lst:
                lst.pop().close(self.cuda.stream)

    def close(self):
        self.trim()
        self.release_deferred()
        self.closed = True


class DeviceTensor:
    """A state tensor on the GPU: ``shape``/``dtype`` at byte ``offset`` of a buffer it keeps alive.

    Immutable from Python: ``to_numpy`` copies it to the host; the runtime never writes into it again."""

    __slots__ = ("lease", "offset", "shape", "dtype")

    def __init__(self, lease: Lease, offset: int, shape: tuple, dtype):
        self.lease, self.offset, self.shape, self.dtype = lease, int(offset), tuple(shape), np.dtype(dtype)

    @property
    def ptr(self) -> int:
        return self.lease.ptr + self.offset

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def __repr__(self):
        return f"DeviceTensor(shape={list(self.shape)}, dtype={self.dtype}, ptr=0x{self.ptr:x})"


class IOBuffers:
    """Device + pinned host buffers for the tokens and the logits; ``fixed`` ones never move (CUDA
    graphs hold their addresses), the shared ones grow when a larger shape comes."""

    def __init__(self, cuda: Cuda, fixed: bool):
        self.cuda, self.fixed = cuda, fixed
        self.cap = (0, 0)
        self.tok_dev = self.log_dev = None
        self.tok_host = self.log_host = None

    def ensure(self, tok_bytes: int, log_bytes: int):
        if tok_bytes <= self.cap[0] and log_bytes <= self.cap[1]:
            return
        if self.fixed and self.cap != (0, 0):
            raise TensorRTError("internal error: a CUDA-graph I/O buffer would have to move")
        self.close()
        tok_bytes, log_bytes = max(tok_bytes, 8), max(log_bytes, 8)
        self.tok_dev, self.log_dev = self.cuda.allocate(tok_bytes), self.cuda.allocate(log_bytes)
        self.tok_host, self.log_host = Pinned(self.cuda, tok_bytes), Pinned(self.cuda, log_bytes)
        self.cap = (tok_bytes, log_bytes)

    def close(self):
        for b in (self.tok_dev, self.log_dev):
            if b is not None:
                b.close(self.cuda.stream)
        for h in (self.tok_host, self.log_host):
            if h is not None:
                h.close()
        self.tok_dev = self.log_dev = None
        self.tok_host = self.log_host = None
        self.cap = (0, 0)
