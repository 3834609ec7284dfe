"""The TensorRT plugin part (plugins/, rwkv_export.trt_plugin), tested without TensorRT:

- the WKV math the CUDA kernel runs, compiled for the CPU, against numpy;
- nvcc compiles the kernels (skipped without nvcc);
- with TensorRT headers ($TENSORRT_INCLUDE_DIR), the plugin library builds, exports the right
  symbols and registers/behaves correctly against a stand-in libnvinfer (plugins/tests/mock_*);
- with a CUDA device (torch or CuPy), the kernels against numpy.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rwkv_export import trt_plugin as tp

REPO = Path(__file__).resolve().parents[1]
PLUGIN_TESTS = REPO / "plugins" / "tests"
sys.path.insert(0, str(PLUGIN_TESTS))
import mock_build  # noqa: E402
import wkv4_reference as ref  # noqa: E402

CASES = [(1, 1, 64), (3, 7, 768), (8, 64, 64), (2, 33, 100)]  # (B, T, C); C=100: not a multiple of a warp
EXPORTED = {"getCreators", "setLoggerFinder", "rwkvTrtRegisterPlugins", "rwkvTrtPluginInfo", "rwkvWkv4Forward"}


# -- the Python module ----------------------------------------------------------------------------
def test_module_imports_without_torch_or_tensorrt():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'tensorrt'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import rwkv_export.trt_plugin as tp\n"
        "assert tp.OP_TYPES == ('WKV4', 'WKV4Seq')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_find_plugin(monkeypatch, tmp_path):
    lib = tmp_path / tp.LIBRARY_NAME
    monkeypatch.setattr(tp, "default_plugin_path", lambda: lib)
    monkeypatch.delenv(tp.ENV_VAR, raising=False)
    assert tp.find_plugin() is None
    lib.write_bytes(b"")
    assert tp.find_plugin() == lib
    other = tmp_path / "other.so"
    other.write_bytes(b"")
    monkeypatch.setenv(tp.ENV_VAR, str(other))
    assert tp.find_plugin() == other.resolve()
    monkeypatch.setenv(tp.ENV_VAR, str(tmp_path / "missing.so"))
    with pytest.raises(tp.PluginNotFound, match="missing.so"):
        tp.find_plugin()


def test_default_plugin_path_is_in_repo():
    assert tp.default_plugin_path() == REPO / "plugins" / "build" / "librwkv_trt_plugins.so"


def test_gencode_flags():
    assert tp._gencode_flags("80;90") == ["-gencode=arch=compute_80,code=sm_80",
                                          "-gencode=arch=compute_90,code=sm_90",
                                          "-gencode=arch=compute_90,code=compute_90"]
    assert tp._gencode_flags([86, "sm_89"])[-1] == "-gencode=arch=compute_89,code=compute_89"
    assert len(tp._gencode_flags(None)) == len(tp.DEFAULT_CUDA_ARCHITECTURES) + 1
    with pytest.raises(tp.PluginBuildError):
        tp._gencode_flags("ampere")


def test_build_plugin_reports_missing_headers(tmp_path):
    with pytest.raises(tp.PluginBuildError) as e:
        tp.build_plugin(tmp_path, build_dir=tmp_path / "b")
    assert "NvInfer.h" in str(e.value) and "\n" not in str(e.value)


# -- the kernel's math, compiled for the CPU ------------------------------------------------------
@pytest.fixture(scope="session")
def host_lib(tmp_path_factory):
    if not any(shutil.which(c) for c in (os.environ.get("CXX") or "g++", "c++", "clang++")):
        pytest.skip("no C++ compiler")
    return ref.host_library(tp.compile_host_reference(tmp_path_factory.mktemp("wkv4_host")))


@pytest.mark.parametrize("B,T,C", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
def test_host_math_matches_numpy(host_lib, B, T, C, dtype):
    if dtype == np.float16 and not host_lib.rwkvWkv4HasHalf():
        pytest.skip("cuda_fp16.h not found: the CPU build has no float16 path")
    rng = np.random.default_rng(B * 1000 + T * 10 + C)
    k, v, w, u, state = ref.random_case(rng, B, T, C, dtype)
    errs = ref.compare(ref.run_host(host_lib, k, v, w, u, state), k, v, w, u, state)
    assert ref.within(errs, dtype), errs


def test_host_math_large_keys_long_sequence(host_lib):
    # |k| up to ~30 exercises the running-maximum trick (exp would overflow without it).
    rng = np.random.default_rng(7)
    k, v, w, u, state = ref.random_case(rng, 2, 256, 64, np.float32, k_scale=8.0)
    got = ref.run_host(host_lib, k, v, w, u, state)
    assert all(np.isfinite(g).all() for g in got)
    errs = ref.compare(got, k, v, w, u, state)
    assert ref.within(errs, np.float32), errs


def test_host_first_token_from_initial_state(host_lib):
    # From pp = -1e30 and a zero state, the first output is exactly v.
    rng = np.random.default_rng(3)
    k, v, w, u, _ = ref.random_case(rng, 2, 3, 16, np.float32, warmup=0)
    state = (np.zeros((2, 16), np.float32), np.zeros((2, 16), np.float32), np.full((2, 16), ref.PP_INIT, np.float32))
    y, aa, bb, pp = ref.run_host(host_lib, k, v, w, u, state)
    np.testing.assert_array_equal(y[:, 0], v[:, 0])
    assert np.isfinite(pp).all() and (pp > -1e29).all()


def test_host_chunked_equals_unchunked(host_lib):
    rng = np.random.default_rng(11)
    k, v, w, u, state = ref.random_case(rng, 3, 12, 48, np.float32)
    y_all, *s_all = ref.run_host(host_lib, k, v, w, u, state)
    y1, *s1 = ref.run_host(host_lib, k[:, :7].copy(), v[:, :7].copy(), w, u, state)
    y2, *s2 = ref.run_host(host_lib, k[:, 7:].copy(), v[:, 7:].copy(), w, u, tuple(s1))
    np.testing.assert_array_equal(np.concatenate([y1, y2], axis=1), y_all)
    for a, b in zip(s2, s_all):
        np.testing.assert_array_equal(a, b)


def test_host_outputs_may_alias_inputs(host_lib):
    rng = np.random.default_rng(5)
    k, v, w, u, state = ref.random_case(rng, 2, 5, 32, np.float32)
    want = ref.run_host(host_lib, k, v, w, u, state)
    k2 = k.copy()
    st = tuple(s.copy() for s in state)
    got = ref.run_host(host_lib, k2, v, w, u, st, out_state=st, y=k2)  # y over k, states in place
    for g, x in zip(got, want):
        np.testing.assert_array_equal(g, x)


def test_host_zero_tokens_passes_state_through(host_lib):
    rng = np.random.default_rng(2)
    k, v, w, u, state = ref.random_case(rng, 2, 0, 8, np.float32)
    y, *out = ref.run_host(host_lib, k, v, w, u, state)
    assert y.shape == (2, 0, 8)
    for a, b in zip(out, state):
        np.testing.assert_array_equal(a, b)


def test_host_rejects_bad_arguments(host_lib):
    z = np.zeros(4, np.float32)
    p = z.ctypes.data
    assert host_lib.rwkvWkv4ForwardHost(1, 1, 4, 2, *[p] * 11) == 1  # dtype
    assert host_lib.rwkvWkv4ForwardHost(-1, 1, 4, 0, *[p] * 11) == 1  # size
    assert host_lib.rwkvWkv4ForwardHost(1, 1, 4, 0, *([p] * 10 + [None])) == 1  # null pointer


# -- nvcc -------------------------------------------------------------------------------------------
def test_nvcc_compiles_kernels(tmp_path):
    if tp.find_nvcc() is None:
        pytest.skip("nvcc not found")
    lib = tp.compile_kernels_only(tmp_path, cuda_architectures=80)  # one architecture: a few seconds
    assert lib.is_file()
    if shutil.which("nm"):
        syms = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True).stdout
        assert re.search(r"\bT rwkvWkv4Forward\b", syms), syms


# -- the TensorRT plugin library, with headers only -------------------------------------------------
def _trt_include() -> Path:
    d = os.environ.get("TENSORRT_INCLUDE_DIR", "")
    if not d or not (Path(d) / "NvInfer.h").is_file():
        pytest.skip("TensorRT headers not available (set TENSORRT_INCLUDE_DIR to a directory with NvInfer.h)")
    return Path(d)


@pytest.fixture(scope="module")
def trt_build(tmp_path_factory):
    """librwkv_trt_plugins.so built with CMake, the stand-in libnvinfer and the C++ driver."""
    include = _trt_include()
    try:
        return mock_build.build_harness(tp, include, tmp_path_factory.mktemp("trt_plugin"), cuda_architectures=80)
    except mock_build.HarnessUnavailable as e:
        pytest.skip(str(e))


def test_plugin_library_exports(trt_build):
    if shutil.which("nm") is None:
        pytest.skip("nm not found")
    nm = lambda *a: subprocess.run(["nm", "-D", *a, str(trt_build["plugin"])],  # noqa: E731
                                   capture_output=True, text=True, check=True).stdout
    defined = {ln.split()[-1] for ln in nm("--defined-only").splitlines() if ln.strip()}
    assert defined == EXPORTED
    undefined = nm("--undefined-only")
    assert "getPluginRegistry" not in undefined  # looked up at run time, never linked
    assert "libnvinfer" not in subprocess.run(["ldd", str(trt_build["plugin"])], capture_output=True,
                                             text=True).stdout


@pytest.mark.parametrize("scenario", ["loadlibrary", "dlopen-then-loadlibrary", "two-copies",
                                      "loadlibrary-then-copy", "exercise"])
def test_plugin_against_mock_tensorrt(trt_build, scenario):
    r = subprocess.run([str(trt_build["driver"]), scenario, str(trt_build["plugin"]), str(trt_build["copy"])],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "FAIL" not in r.stdout, r.stdout + r.stderr


def test_enqueue_reports_launch_failure_without_gpu(trt_build):
    if Path("/dev/nvidiactl").exists() or ref.cuda_backend()[0] is not None:
        pytest.skip("a CUDA device exists; this checks the no-device error path")
    r = subprocess.run([str(trt_build["driver"]), "enqueue-without-gpu", str(trt_build["plugin"])],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "FAIL" not in r.stdout, r.stdout + r.stderr
    assert "kernel launch failed" in r.stderr


@pytest.mark.parametrize("scenario", ["trt-first", "plugin-first", "autoload", "loadlibrary", "version-mismatch"])
def test_plugin_loaded_with_ctypes(trt_build, scenario):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RWKV_TRT_PLUGIN")}
    if scenario == "plugin-first":
        env["RWKV_TRT_PLUGIN_NO_AUTOLOAD"] = "1"
    if scenario == "autoload":
        env["LD_LIBRARY_PATH"] = str(trt_build["mock"].parent)
    if scenario == "version-mismatch":
        env["MOCK_TRT_VERSION"] = str((trt_build["major"] - 1) * 10000 + 800)
    r = subprocess.run([sys.executable, str(PLUGIN_TESTS / "mock_ctypes_scenarios.py"), scenario,
                        str(trt_build["mock"]), str(trt_build["plugin"])],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0 and "FAIL" not in r.stdout, r.stdout + r.stderr
    if scenario == "plugin-first":
        assert "were not registered" in r.stderr
    elif scenario == "version-mismatch":
        assert "rebuild the plugin library" in r.stderr
    else:
        assert "[rwkv-trt-plugins]" not in r.stderr, r.stderr


# -- the CUDA kernels on a GPU --------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpu(tmp_path_factory):
    backend, reason = ref.cuda_backend()
    if backend is None:
        pytest.skip(reason)
    if tp.find_nvcc() is None:
        pytest.skip("nvcc not found")
    lib = tp.compile_kernels_only(tmp_path_factory.mktemp("wkv4_gpu"), cuda_architectures=backend.arch())
    return backend, ref.kernels_library(lib)


@pytest.mark.gpu
@pytest.mark.parametrize("B,T,C", CASES + [(8, 64, 768)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
def test_kernels_on_gpu_match_numpy(gpu, B, T, C, dtype):
    backend, lib = gpu
    rng = np.random.default_rng(B * 1000 + T * 10 + C)
    k, v, w, u, state = ref.random_case(rng, B, T, C, dtype)
    errs = ref.compare(ref.run_device(lib, backend, k, v, w, u, state), k, v, w, u, state)
    assert ref.within(errs, dtype), errs


@pytest.mark.gpu
def test_plugin_enqueue_on_gpu(trt_build):
    """IPluginV3OneRuntime::enqueue on device buffers, against the CPU build of the same math."""
    backend, reason = ref.cuda_backend()
    if backend is None and not Path("/dev/nvidiactl").exists():
        pytest.skip(reason)
    r = subprocess.run([str(trt_build["driver"]), "enqueue-gpu", str(trt_build["plugin"])],
                       capture_output=True, text=True, timeout=120)
    if r.stdout.startswith("skip:"):
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0 and "FAIL" not in r.stdout, r.stdout + r.stderr
