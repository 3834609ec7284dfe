"""Loads the rwkv plugin libraries from Python with ctypes -- the way Polygraphy's --plugins does --
next to mock_nvinfer.cpp's stand-in libnvinfer. Run in a fresh process per scenario:

    python mock_ctypes_scenarios.py <scenario> <mock libnvinfer.so.N> <plugin .so> <autoregister .so>

Scenarios:
  trt-first           mock loaded (RTLD_LOCAL, by path, like the tensorrt wheel), then the autoregister library
  plugin-first        autoregister library before any TensorRT: warning, then rwkvTrtRegisterPlugins()
  no-second-tensorrt  as plugin-first with libnvinfer.so.N findable by soname: the plugin must not load it
  loadlibrary         registry.loadLibrary(plugin) from Python (like registry.load_library); a later
                      ctypes load of the plain library adds nothing
  version-mismatch    mock reports another major version (MOCK_TRT_VERSION): nothing registered
Prints one line per check; exit status 1 on failure.
"""

import ctypes
import sys

failures = 0


def check(ok, what):
    global failures
    print(("ok  : " if ok else "FAIL: ") + what, flush=True)
    failures += not ok


def load_mock(path):
    m = ctypes.CDLL(path)
    m.mockCreatorCount.restype = ctypes.c_int32
    m.mockCreatorCountFromLibraries.restype = ctypes.c_int32
    m.mockErrorCount.restype = ctypes.c_int32
    m.mockLoadLibrary.restype = ctypes.c_void_p
    m.mockLoadLibrary.argtypes = [ctypes.c_char_p]
    m.mockHasCreator.argtypes = [ctypes.c_char_p] * 3
    return m


NB = 8  # WKV4, WKV5, WKV6, WKV7 and their Seq forms
OPS = (b"WKV4", b"WKV4Seq", b"WKV5", b"WKV5Seq", b"WKV6", b"WKV6Seq", b"WKV7", b"WKV7Seq")


def loaded(soname_prefix):
    """Paths of the loaded shared objects whose file name starts with soname_prefix."""
    with open("/proc/self/maps") as f:
        return {ln.split()[-1] for ln in f if ln.rstrip().split("/")[-1].startswith(soname_prefix)}


def main(scenario, mock_path, plugin_path, autoregister_path):
    if scenario == "trt-first":
        m = load_mock(mock_path)
        ctypes.CDLL(autoregister_path)
        check(
            m.mockCreatorCount() == NB,
            f"autoregister library found the already-loaded TensorRT by soname and registered {NB} creators",
        )
        check(
            all(m.mockHasCreator(op, b"1", b"rwkv") == 1 for op in OPS),
            "rwkv::WKV4/5/6/7 and their Seq forms, version 1",
        )
        p = ctypes.CDLL(plugin_path)
        p.rwkvTrtRegisterPlugins.restype = ctypes.c_int32
        check(p.rwkvTrtRegisterPlugins() == NB and m.mockCreatorCount() == NB, "rwkvTrtRegisterPlugins() is idempotent")
        check(m.mockErrorCount() == 0, "no errors logged (no 'Cannot find plugin' from probing the registry)")
    elif scenario in ("plugin-first", "no-second-tensorrt"):
        ctypes.CDLL(autoregister_path)  # the test checks stderr for the warning
        p = ctypes.CDLL(plugin_path)  # the same library the autoregister one depends on
        p.rwkvTrtRegisterPlugins.restype = ctypes.c_int32
        check(not loaded("libnvinfer"), "no TensorRT was loaded by the plugin libraries")
        check(p.rwkvTrtRegisterPlugins() == -1, "rwkvTrtRegisterPlugins() returns -1 while no TensorRT is loaded")
        m = load_mock(mock_path)
        check(m.mockCreatorCount() == 0, "nothing registered before TensorRT was loaded")
        check(
            p.rwkvTrtRegisterPlugins() == NB and m.mockCreatorCount() == NB,
            "rwkvTrtRegisterPlugins() registers all once TensorRT is loaded",
        )
        check(len(loaded("libnvinfer")) == 1, "exactly one TensorRT in the process")
    elif scenario == "loadlibrary":
        m = load_mock(mock_path)
        check(bool(m.mockLoadLibrary(plugin_path.encode())), "loadLibrary succeeds")
        check(m.mockCreatorCountFromLibraries() == NB, "all creators came from getCreators()")
        ctypes.CDLL(plugin_path)
        check(m.mockCreatorCount() == NB and m.mockErrorCount() == 0, "a later ctypes load adds nothing, no errors")
    elif scenario == "version-mismatch":
        m = load_mock(mock_path)
        ctypes.CDLL(autoregister_path)  # the test checks stderr for the explanation
        check(m.mockCreatorCount() == 0, "nothing registered into a TensorRT of another major version")
    else:
        print(f"unknown scenario {scenario}", file=sys.stderr)
        return 2
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
