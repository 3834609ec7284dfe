"""Loading what the TensorRT backend needs: the ``tensorrt`` module, NVIDIA's ``cuda.core``, one
process-wide TensorRT logger, and plugin libraries.

The plugin library an engine needs is located here, from what the engine's sidecar recorded and what
the user passes -- never through the exporter package (the runtime installs without it).
"""

from __future__ import annotations

import os
import sys
from collections import deque
from pathlib import Path

from ..errors import BackendUnavailable, RuntimeUserError

PLUGIN_ENV = "RWKV_TRT_PLUGIN"
GRAPHS_ENV = "RWKV_TRT_CUDA_GRAPHS"
VERBOSE_ENV = "RWKV_TRT_VERBOSE"
MIN_TRT_MAJOR = 10
RWKV_PLUGIN_LIBRARY = "librwkv_trt_plugins.so"  # the loadLibrary library of plugins/ (see plugins/README.md)
RWKV_AUTOREGISTER_LIBRARY = "librwkv_trt_plugins_autoregister.so"  # for ctypes loaders only: no getCreators
TRT_INSTALL_HINT = (
    "pip install tensorrt (NVIDIA's wheels; the install downloads the libraries from "
    "pypi.nvidia.com) or pip install 'rwkv-runtime[tensorrt]'"
)
CUDA_INSTALL_HINT = "pip install cuda-core cuda-bindings (or the [tensorrt] extra)"


class TensorRTError(RuntimeUserError):
    """TensorRT or CUDA refused something (engine, plugin, shapes, memory); one line."""


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
        raise BackendUnavailable(
            f"TensorRT's libraries could not be loaded ({str(e).splitlines()[0][:160]}): {TRT_INSTALL_HINT}"
        ) from None
    version = getattr(trt, "__version__", "0")
    if _major(version) < MIN_TRT_MAJOR:
        raise BackendUnavailable(
            f"TensorRT {version} is too old: rwkv-export needs TensorRT >= {MIN_TRT_MAJOR} "
            f"(strongly typed networks, execute_async_v3): {TRT_INSTALL_HINT}"
        )
    return trt


def import_cuda_core():
    """NVIDIA's ``cuda.core`` (Device, Stream, Buffer, memory resources, graphs), or a one-line
    :class:`BackendUnavailable`."""
    try:
        import cuda.core as cc

        if not hasattr(cc, "Device"):  # older cuda-core (0.3.x) keeps the API in cuda.core.experimental
            import cuda.core.experimental as cc
    except Exception:  # noqa: BLE001 - ImportError, or cuda.bindings missing underneath
        raise BackendUnavailable(f"running TensorRT engines needs NVIDIA's cuda.core: {CUDA_INSTALL_HINT}") from None
    return cc


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
    registered (e.g. by the autoregister library loaded with ctypes): a warning then, not an error; a
    missing plugin shows up when the engine is built or deserialized."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise TensorRTError(f"plugin library {p} does not exist")
    if p.name == RWKV_AUTOREGISTER_LIBRARY:  # TensorRT would only say "SymbolAddress for getCreators ..."
        raise TensorRTError(
            f"{p.name} is for loaders that only dlopen (ctypes, Polygraphy --plugins); "
            f"TensorRT's load_library needs {RWKV_PLUGIN_LIBRARY} from the same directory"
        )
    key = str(p.resolve())
    if key in _LOADED_PLUGINS:
        return True
    log = trt_logger(trt)
    handle = trt.get_plugin_registry().load_library(key)
    _LOADED_PLUGINS[key] = handle
    if handle is None:
        (echo or log.echo or (lambda m: None))(
            f"warning: TensorRT did not load {p.name} ({log.last_error('no message')}); harmless if its plugins "
            "were already registered"
        )
        return False
    return True


def plugin_candidates(engine_path: Path, sidecar: dict, plugin=None) -> list:
    """The plugin libraries an engine needs, located: for each library the sidecar records, the first
    that exists of ``plugin`` (a path the caller passes), ``$RWKV_TRT_PLUGIN``, the file of that name
    beside the engine. A one-line error names what to do otherwise.

    Loading a library runs its code, so a path read from the sidecar is confined to the engine's folder
    (``artifact.confined_path``, links included): the recorded name is looked up beside the engine, and
    the ``path`` build-engine recorded is followed only where it resolves inside that folder (a
    ``plugins/`` folder beside the engine); anywhere else it is not loaded."""
    from ..artifact import confined_path, outside_reason

    engine_path = Path(engine_path)
    given = str(plugin) if plugin else os.environ.get(PLUGIN_ENV, "").strip()
    origin = "plugin=" if plugin else f"{PLUGIN_ENV}="
    recorded = [p for p in sidecar.get("plugins") or [] if isinstance(p, dict) and p.get("name")]
    out = []
    for rec in recorded:
        name = str(rec["name"])
        cands = []
        if given and (Path(given).name == name or len(recorded) == 1):
            cands.append(Path(given).expanduser())
        cands.append(confined_path(engine_path, name, "plugin library"))
        far = bool(rec.get("path")) and outside_reason(engine_path, Path(str(rec["path"]))) is not None
        if rec.get("path") and not far:
            cands.append(Path(str(rec["path"])))
        found = next((c for c in cands if c.is_file()), None)
        if found is None:
            if given and cands[0] == Path(given).expanduser():
                raise TensorRTError(f"{origin}{given} does not exist")
            built = (
                f" (built with {str(rec['path'])[:160]}, outside the engine's folder: not loaded from there)"
                if far
                else ""
            )
            raise TensorRTError(
                f"{engine_path.name} needs the TensorRT plugin library {name}{built}: copy it beside "
                f"the engine, or pass it (plugin=..., --plugin) or set {PLUGIN_ENV}=/path/to/{name}"
            )
        out.append(found)
    if given and not recorded:  # an engine that needs none: a given library is still loaded (custom plugins)
        p = Path(given).expanduser()
        if not p.is_file():
            raise TensorRTError(f"{origin}{given} does not exist")
        out.append(p)
    return out
