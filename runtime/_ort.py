"""Which ONNX Runtime wheel is installed: exactly one of onnxruntime / onnxruntime-gpu must be.

Both wheels install the same `onnxruntime` module; with both present, whichever pip wrote last wins and
the CUDA provider may silently be missing. rwkv-runtime's extras ([cpu] / [gpu]) pick one; this check
catches environments where both (or neither) ended up installed.
"""

from __future__ import annotations

from importlib import metadata

from .errors import RuntimeUserError

_WHEELS = ("onnxruntime", "onnxruntime-gpu")


def installed_wheels() -> list[str]:
    found = []
    for name in _WHEELS:
        try:
            metadata.version(name)
            found.append(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def import_onnxruntime():
    """``import onnxruntime`` with a one-line error that says how to fix a missing or doubled install."""
    wheels = installed_wheels()
    if len(wheels) > 1:
        raise RuntimeUserError(
            "both onnxruntime and onnxruntime-gpu are installed (they overwrite each other): "
            "pip uninstall -y onnxruntime onnxruntime-gpu, then pip install 'rwkv-runtime[cpu]' "
            "or 'rwkv-runtime[gpu]'"
        )
    try:
        import onnxruntime
    except ImportError:
        raise RuntimeUserError(
            "onnxruntime is not installed: pip install 'rwkv-runtime[cpu]' (or 'rwkv-runtime[gpu]' for CUDA)"
        ) from None
    return onnxruntime
