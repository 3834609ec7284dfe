"""Load order of TensorRT and the plugin libraries under Polygraphy, with a stand-in `tensorrt` module.

Our plugin libraries register into the TensorRT already loaded in the process, so TensorRT must be
imported before the library is opened. Polygraphy's own loader chain opens `--plugins` libraries first
(first test: documents why `polygraphy run --plugins` alone registers nothing); the wrapper
`python -m rwkv_export.targets.tensorrt.polygraphy_run` imports TensorRT first (second test)."""

from __future__ import annotations

import ctypes
import sys
import types

import pytest

pytest.importorskip("polygraphy")


@pytest.fixture
def events(monkeypatch):
    """A stand-in `tensorrt` whose import, Builder and plugin registry are recorded, and a recording
    ctypes.CDLL; both in one ordered list."""
    log: list = []
    for k in [k for k in sys.modules if k == "tensorrt" or k.startswith("tensorrt.")]:
        monkeypatch.delitem(sys.modules, k)

    class _Finder:
        def find_spec(self, name, path=None, target=None):
            if name != "tensorrt":
                return None
            import importlib.machinery

            return importlib.machinery.ModuleSpec(name, _Loader())

    class _Loader:
        def create_module(self, spec):
            return None

        def exec_module(self, m):
            log.append("import tensorrt")
            m.__version__ = "10.7.0"

            class Registry:
                def load_library(self, path):
                    log.append(f"loadLibrary {path.rsplit('/', 1)[-1]}")
                    return object()

            class Logger:
                WARNING, ERROR, INFO, VERBOSE, INTERNAL_ERROR = range(5)

                def __init__(self, *a):
                    pass

            class ILogger:
                Severity = Logger

                def __init__(self, *a):
                    pass

            def builder(*a, **k):
                log.append("trt.Builder")
                raise RuntimeError("stand-in stops here")

            m.Builder = builder
            m.Logger = Logger
            m.ILogger = ILogger
            m.get_plugin_registry = lambda: Registry()

    finder = _Finder()
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    monkeypatch.setattr(ctypes, "CDLL", lambda path, *a, **k: log.append(f"dlopen {str(path).rsplit('/', 1)[-1]}"))
    return log


def test_polygraphy_opens_plugin_libraries_before_it_imports_tensorrt(events, tmp_path):
    from polygraphy.backend.trt import LoadPlugins, NetworkFromOnnxPath

    lib = tmp_path / "librwkv_trt_plugins_autoregister.so"
    lib.write_bytes(b"")
    loader = NetworkFromOnnxPath(LoadPlugins(plugins=[str(lib)], obj=str(tmp_path / "m.onnx")))
    with pytest.raises(RuntimeError, match="stand-in stops here"):
        loader()
    assert events[0] == "dlopen librwkv_trt_plugins_autoregister.so", events
    assert events.index("import tensorrt") > 0, events


def test_the_wrapper_imports_tensorrt_before_any_plugin_library(events, tmp_path, monkeypatch):
    from rwkv_export.targets.tensorrt import loader as trt_loader
    from rwkv_export.targets.tensorrt import polygraphy_run

    monkeypatch.setattr(
        trt_loader, "load_plugin_library", lambda trt, p, echo=None: trt.get_plugin_registry().load_library(str(p))
    )
    main_lib = tmp_path / "librwkv_trt_plugins.so"
    auto_lib = tmp_path / "librwkv_trt_plugins_autoregister.so"
    for p in (main_lib, auto_lib):
        p.write_bytes(b"")
    ran = {}
    fake_tools = types.ModuleType("polygraphy.tools._main")
    fake_tools.main = lambda: ran.setdefault("argv", list(sys.argv)) and 0
    monkeypatch.setitem(sys.modules, "polygraphy.tools._main", fake_tools)
    monkeypatch.setattr(sys, "argv", ["x"])
    argv = ["run", "m.onnx", "--trt", "--plugins", str(main_lib), str(auto_lib), "--atol", "1e-4"]
    assert polygraphy_run.main(argv) == 0
    assert events == [
        "import tensorrt",
        "loadLibrary librwkv_trt_plugins.so",
        "dlopen librwkv_trt_plugins_autoregister.so",
    ], events
    assert ran["argv"] == ["polygraphy", *argv]  # Polygraphy gets the arguments unchanged


def test_the_wrapper_names_a_missing_library_in_one_line(events, tmp_path, capsys):
    from rwkv_export.targets.tensorrt import polygraphy_run

    assert polygraphy_run.main(["run", "m.onnx", "--trt", "--plugins", str(tmp_path / "nope.so")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: plugin library") and "nope.so" in err and "Traceback" not in err


def test_plugins_argument_forms():
    from rwkv_export.targets.tensorrt.polygraphy_run import plugin_paths

    assert plugin_paths(["run", "m", "--plugins", "a.so", "b.so", "--trt", "--plugins=c.so"]) == [
        "a.so",
        "b.so",
        "c.so",
    ]
