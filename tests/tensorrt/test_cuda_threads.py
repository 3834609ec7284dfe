"""The TensorRT backend's CUDA side from several threads (issue: the server creates the Session on the
main thread and steps on its scheduler thread; cuda.core's current context is per thread).

A stand-in for cuda.core that, like the driver, refuses any call from a thread on which the device's
context was never made current. The real-device version of this check is in plugins/tests/gpu_check.py."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from rwkv_runtime.tensorrt import memory

_current = threading.local()


class _NoContext(RuntimeError):
    pass


def _need_context():
    if not getattr(_current, "device", None):
        raise _NoContext("CUDA_ERROR_INVALID_CONTEXT")


class _Buffer:
    def __init__(self, nbytes):
        self._mem = np.zeros(nbytes, np.uint8)
        self.handle = self._mem.ctypes.data
        self.closed = False

    @classmethod
    def from_handle(cls, ptr, nbytes):
        b = cls.__new__(cls)
        b.handle, b._mem, b.closed = (
            ptr,
            np.ctypeslib.as_array((np.ctypeslib.ctypes.c_ubyte * nbytes).from_address(ptr)),
            False,
        )
        return b

    def copy_from(self, src, stream=None):
        _need_context()
        self._mem[:] = src._mem

    def close(self, stream=None):
        _need_context()
        self.closed = True


class _Stream:
    handle = 1

    def sync(self):
        _need_context()

    def close(self):
        _need_context()


class _Device:
    set_current_threads: list = []

    def __init__(self, i=0):
        pass

    def set_current(self):
        _Device.set_current_threads.append(threading.get_ident())
        _current.device = True

    def create_stream(self):
        _need_context()
        return _Stream()

    def allocate(self, nbytes, stream=None):
        _need_context()
        return _Buffer(nbytes)


class _CudaCore:
    Device = _Device
    Buffer = _Buffer

    @staticmethod
    def LegacyPinnedMemoryResource():
        return object()


def _in_thread(fn):
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join(10)
    if "error" in out:
        raise out["error"]
    return out.get("value")


def test_stand_in_refuses_a_thread_without_context():
    """The stand-in is strict, as the driver is: without bind() a second thread fails."""
    _Device.set_current_threads.clear()
    cuda = memory.Cuda(_CudaCore())
    with pytest.raises(_NoContext):
        _in_thread(lambda: cuda.stream.sync())  # bypasses Cuda's entry points on purpose


def test_every_entry_point_works_from_another_thread():
    _Device.set_current_threads.clear()
    cuda = memory.Cuda(_CudaCore())  # created here, on the main thread
    pool = memory.Pool(cuda, keep=2)
    a = np.arange(64, dtype=np.float32)

    def worker():
        lease = pool.take(a.nbytes)
        cuda.copy(lease.ptr, a.ctypes.data, a.nbytes)
        back = np.empty_like(a)
        cuda.copy(back.ctypes.data, lease.ptr, a.nbytes)
        cuda.sync()
        del lease  # given back on this thread
        pool.trim()
        return back

    back = _in_thread(worker)
    assert np.array_equal(back, a)
    main = threading.get_ident()
    assert main in _Device.set_current_threads
    assert any(t != main for t in _Device.set_current_threads), "the worker thread never made the context current"
    # once per thread, not once per call
    assert len(_Device.set_current_threads) == 2
    _in_thread(cuda.close)
