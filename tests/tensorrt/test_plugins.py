"""The TensorRT plugin part (plugins/, rwkv_export.targets.tensorrt.plugin), tested without TensorRT:

- the WKV math the CUDA kernel runs, compiled for the CPU, against numpy;
- RWKV-5/6/7 (plugins/wkvhead): the CPU build against numpy, against the exporter's own ONNX
  function bodies run by onnxruntime (random inputs, and the nodes' real inputs in the exported
  reference models), and the CUDA kernels themselves run on the CPU by an emulator (also under
  AddressSanitizer);
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

from rwkv_export.targets.tensorrt import plugin as tp

REPO = Path(__file__).resolve().parents[2]
PLUGIN_TESTS = REPO / "plugins" / "tests"
sys.path.insert(0, str(PLUGIN_TESTS))
import build_helpers  # noqa: E402
import mock_build  # noqa: E402
import wkv4_reference as ref  # noqa: E402
import wkvhead_reference as href  # noqa: E402

CASES = [(1, 1, 64), (3, 7, 768), (8, 64, 64), (2, 33, 100)]  # (B, T, C); C=100: not a multiple of a warp
EXPORTED = {
    "getCreators",
    "setLoggerFinder",
    "rwkvTrtRegisterPlugins",
    "rwkvTrtPluginInfo",
    "rwkvWkv4Forward",
    "rwkvWkv5Forward",
    "rwkvWkv6Forward",
    "rwkvWkv7Forward",
}
DOCUMENTED_LOADERS = (
    "trtexec --dynamicPlugins",
    "load_library",
    "Polygraphy `--plugins",
    "ctypes.CDLL",
    "--staticPlugins",
)
REF_MODELS = REPO / "tests" / "golden"  # the golden models (in the repository)


# -- the Python module ----------------------------------------------------------------------------
def test_module_imports_without_torch_or_tensorrt():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'tensorrt'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import rwkv_export.targets.tensorrt.plugin as tp\n"
        "assert tp.OP_TYPES[:2] == ('WKV4', 'WKV4Seq') and 'WKV7Seq' in tp.OP_TYPES\n"
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
    assert tp._gencode_flags("80;90") == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
    ]
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
    return ref.host_library(build_helpers.compile_host_reference(tmp_path_factory.mktemp("wkv4_host")))


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


# -- RWKV-5/6/7: the kernels' math, compiled for the CPU ---------------------------------------------
# (B, T, H, N): N = 64 and 128, 16, 32 take the kernels' register path, 8 and 48 the generic one.
HEAD_CASES = [(1, 1, 2, 64), (3, 7, 2, 8), (2, 33, 1, 48), (2, 16, 4, 16), (1, 5, 1, 128), (4, 12, 2, 32)]
HEAD_DTYPES = {"f32": (np.float32, None), "f16": (np.float16, None), "f16-w32": (np.float16, np.float32)}
# (family, dtype key); f16-w32 (float16 activations, float32 per-token decay) only where w is per token
FAM_DTYPES = [(f, d) for f in href.OPS for d in HEAD_DTYPES if d != "f16-w32" or href.OPS[f].w_arg]


@pytest.fixture(scope="session")
def head_host(tmp_path_factory):
    if not any(shutil.which(c) for c in (os.environ.get("CXX") or "g++", "c++", "clang++")):
        pytest.skip("no C++ compiler")
    lib = href.host_library(
        build_helpers.compile_host_reference(tmp_path_factory.mktemp("wkvhead_host"), family="wkvhead", warnings=True)
    )
    if not lib.rwkvWkvHeadHasHalf():
        pytest.skip("cuda_fp16.h not found: the CPU build has no float16 path")
    return lib


@pytest.mark.parametrize("case", HEAD_CASES, ids=lambda c: "B{}T{}H{}N{}".format(*c))
@pytest.mark.parametrize("fam,dkey", FAM_DTYPES)
def test_head_host_matches_numpy(head_host, fam, dkey, case):
    act, wd = HEAD_DTYPES[dkey]
    rng = np.random.default_rng(sum(case) * 7 + len(fam))
    ins = href.random_case(rng, fam, *case, act, wd)
    errs = href.compare(fam, href.run_host(head_host, fam, ins), ins)
    assert href.within(errs, act), errs


@pytest.mark.parametrize("fam", list(href.OPS))
def test_head_host_long_sequence_stays_accurate(head_host, fam):
    rng = np.random.default_rng(17)
    ins = href.random_case(rng, fam, 2, 512, 1, 64, np.float32)
    got = href.run_host(head_host, fam, ins)
    assert all(np.isfinite(g).all() for g in got)
    errs = href.compare(fam, got, ins)
    assert href.within(errs, np.float32), errs


@pytest.mark.parametrize("fam", list(href.OPS))
def test_head_host_chunked_equals_unchunked(head_host, fam):
    rng = np.random.default_rng(11)
    ins = href.random_case(rng, fam, 3, 12, 2, 64, np.float16)
    y_all, s_all = href.run_host(head_host, fam, ins)
    tok = href.OPS[fam].token
    first = {n: (a[:, :5].copy() if n in tok else a) for n, a in ins.items()}
    y1, s1 = href.run_host(head_host, fam, first)
    second = {n: (a[:, 5:].copy() if n in tok else a) for n, a in ins.items()}
    second["state"] = s1
    y2, s2 = href.run_host(head_host, fam, second)
    np.testing.assert_array_equal(np.concatenate([y1, y2], axis=1), y_all)
    np.testing.assert_array_equal(s2, s_all)


@pytest.mark.parametrize("N", [64, 48])
@pytest.mark.parametrize("fam", list(href.OPS))
def test_head_host_outputs_may_alias_inputs(head_host, fam, N):
    rng = np.random.default_rng(5)
    ins = href.random_case(rng, fam, 2, 5, 2, N, np.float32)
    want = href.run_host(head_host, fam, ins)
    ins2 = {n: a.copy() for n, a in ins.items()}
    got = href.run_host(head_host, fam, ins2, y=ins2["v"], state_out=ins2["state"])  # y over v, state in place
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("fam", list(href.OPS))
def test_head_host_zero_tokens_passes_state_through(head_host, fam):
    rng = np.random.default_rng(2)
    ins = href.random_case(rng, fam, 2, 0, 2, 16, np.float32)
    y, s = href.run_host(head_host, fam, ins)
    assert y.shape == (2, 0, 2, 16)
    np.testing.assert_array_equal(s, ins["state"])


def test_head_first_token_from_zero_state(head_host):
    # From S = 0: WKV5/6 y_j = sum_i r_i u_i k_i v_j; WKV7 y_i = v_i (k . r) and S' = v k^T.
    rng = np.random.default_rng(3)
    for fam in href.OPS:
        ins = href.random_case(rng, fam, 2, 1, 2, 8, np.float32, warmup=0)
        y, s = href.run_host(head_host, fam, ins)
        r, k, v = (ins[n][:, 0].astype(np.float64) for n in ("r", "k", "v"))
        if fam == "WKV7":
            want = v * (k * r).sum(-1, keepdims=True)
            np.testing.assert_allclose(s, v[..., :, None] * k[..., None, :], rtol=1e-6, atol=1e-7)
        else:
            want = (r * ins["u"] * k).sum(-1, keepdims=True) * v
            np.testing.assert_allclose(s, k[..., :, None] * v[..., None, :], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(y[:, 0], want, rtol=1e-5, atol=1e-5)


def test_head_host_rejects_bad_arguments(head_host):
    z = np.zeros(64, np.float32)
    p = z.ctypes.data
    assert head_host.rwkvWkv5ForwardHost(1, 1, 1, 4, 2, *[p] * 8) == 1  # dtype
    assert head_host.rwkvWkv6ForwardHost(1, 1, 1, 4, 0, 1, *[p] * 8) == 1  # float16 w with float32 activations
    assert head_host.rwkvWkv7ForwardHost(1, 1, 1, 2048, 0, 0, *[p] * 9) == 1  # N > 1024
    assert head_host.rwkvWkv7ForwardHost(-1, 1, 1, 4, 0, 0, *[p] * 9) == 1  # size
    assert head_host.rwkvWkv5ForwardHost(1, 1, 1, 4, 0, *([p] * 7 + [None])) == 1  # null state_out
    assert head_host.rwkvWkv7ForwardHost(1, 0, 1, 4, 0, 0, *([None] * 6 + [p, None, p])) == 0  # T = 0: no tokens read


# -- RWKV-5/6/7: against the exporter's own ONNX function bodies (onnxruntime) -----------------------
@pytest.fixture(scope="session")
def ort_available():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("rwkv_export.arch.headwise")


@pytest.mark.parametrize("dkey", ["f32", "f16"])
@pytest.mark.parametrize("op", href.OP_TYPES)
def test_head_host_matches_function_body(head_host, ort_available, op, dkey):
    """The CPU build against ONNX Runtime running the op's model-local function (built by
    exporter/arch/headwise.wkv_node): same input order, shapes and index order. float16: the inputs
    are float16-rounded; the body computes in float32 and y is compared after rounding."""
    fam = href.family(op)
    act, _ = HEAD_DTYPES[dkey]
    seq = op.endswith("Seq")
    rng = np.random.default_rng(len(op) * 13 + len(dkey))
    for B, T, H, N in [(1, 1, 2, 64), (3, 9, 2, 8), (2, 20, 1, 48)] if seq else [(1, 1, 2, 64), (4, 1, 2, 8)]:
        ins = href.random_case(rng, fam, B, T, H, N, act)
        got_y, got_s = href.run_host(head_host, fam, ins)
        feeds = {n: a.astype(np.float32) for n, a in ins.items()}
        y, s = href.run_function_body(op, feeds if seq else href.step_shapes(feeds))
        y = y if seq else y[:, None]
        assert y.shape == got_y.shape and s.shape == got_s.shape
        assert href.scaled_error(got_y, y.astype(act)) <= href.TOL_Y[np.dtype(act)], (B, T, H, N)
        assert href.scaled_error(got_s, s) <= href.TOL_STATE, (B, T, H, N)


@pytest.fixture(scope="session")
def head_model_exports(tmp_path_factory, ort_available):
    """The RWKV-5.0, 5.2, 6 and 7 reference models exported with --wkv plugin (step + sequence)."""
    from rwkv_export.export import ExportOptions, export

    out = {}
    d = tmp_path_factory.mktemp("wkvhead_models")
    for name in ("golden-rwkv5", "golden-rwkv5.2", "golden-rwkv6", "golden-rwkv7"):
        p = REF_MODELS / f"{name}.pth"
        if p.is_file():
            out[name] = export(p, d / f"{name}.onnx", ExportOptions(wkv="plugin"))
    if not out:
        pytest.skip(f"reference models not available in {REF_MODELS}")
    return out


def _model_feeds(model_path, B, T, rng):
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    feeds = {}
    for i in m.graph.input:
        dims = [d.dim_value or None for d in i.type.tensor_type.shape.dim]
        if i.name == "tokens":
            feeds["tokens"] = rng.integers(0, 256, (B, T) if len(dims) == 2 else (B,)).astype(np.int64)
        else:  # a non-zero state, so that the WKV state input matters
            feeds[i.name] = rng.normal(0.0, 0.5, [B if d is None else d for d in dims]).astype(np.float32)
    return feeds


@pytest.mark.parametrize("name", ["golden-rwkv5", "golden-rwkv5.2", "golden-rwkv6", "golden-rwkv7"])
def test_head_host_on_reference_model_nodes(head_host, head_model_exports, name):
    """The first and last rwkv::WKV* node of each exported reference model (step and sequence
    graphs): their real inputs (trained decays, bonuses, the model's own r/k/v/a/b) and outputs,
    captured from onnxruntime running the whole model; the CPU build must reproduce the outputs.
    5v1 (per-head time_first, exp'ed) and 5v2 (time_faaaa) reach the op alike: w, u [H, N] computed."""
    if name not in head_model_exports:
        pytest.skip(f"{name} not available")
    rng = np.random.default_rng(7)
    for path in head_model_exports[name]:
        seq = path.name.endswith(".seq.onnx")
        feeds = _model_feeds(path, 2, 6 if seq else 1, rng)
        for node_index in (0, -1):
            op, ins, (y, s) = href.capture_node_io(path, feeds, node_index)
            fam = href.family(op)
            assert fam == "WKV" + name.split("rwkv")[1][0] and op.endswith("Seq") == seq  # e.g. 5v1 -> WKV5
            ins4 = {n: (a[:, None] if not seq and n in href.OPS[fam].token else a) for n, a in ins.items()}
            got_y, got_s = href.run_host(head_host, fam, ins4)
            got_y = got_y if seq else got_y[:, 0]
            assert href.scaled_error(got_y, y) <= 1e-5 and href.scaled_error(got_s, s) <= 1e-5, (path.name, op)
            # float16 activations: the same node inputs, rounded
            act16 = {n: (a.astype(np.float16) if n in href.OPS[fam].token else a) for n, a in ins4.items()}
            errs = href.compare(fam, href.run_host(head_host, fam, act16), act16)
            assert href.within(errs, np.float16), (path.name, op, errs)


# -- RWKV-5/6/7: the CUDA kernels themselves, run on the CPU by an emulator ----------------------------
@pytest.fixture(scope="session")
def head_emulated(tmp_path_factory):
    if tp.cuda_include_dir() is None:
        pytest.skip("CUDA headers not found (the emulator compiles the kernel sources with them)")
    if not any(shutil.which(c) for c in (os.environ.get("CXX") or "g++", "c++")):
        pytest.skip("no C++ compiler")
    return href.kernels_library(build_helpers.compile_kernel_emulator(tmp_path_factory.mktemp("wkvhead_emu")))


@pytest.mark.parametrize("case", HEAD_CASES + [(2, 3, 1, 1), (1, 4, 1, 100)], ids=lambda c: "B{}T{}H{}N{}".format(*c))
@pytest.mark.parametrize("fam", list(href.OPS))
def test_emulated_kernels_equal_host_build(head_host, head_emulated, fam, case):
    """The kernels (thread blocks, shared-memory staging, register lines, launch dispatch) compute
    exactly what the CPU build computes: bit-identical here (no FMA contraction on the CPU)."""
    rng = np.random.default_rng(sum(case))
    for dkey in HEAD_DTYPES:
        act, wd = HEAD_DTYPES[dkey]
        if wd is not None and not href.OPS[fam].w_arg:
            continue
        ins = href.random_case(rng, fam, *case, act, wd)
        got = href.run_device(head_emulated, href.HostBackend(), fam, ins)
        want = href.run_host(head_host, fam, ins)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("fam", list(href.OPS))
def test_emulated_kernels_alias_and_alignment(head_emulated, fam):
    """y over r and state_out over state give the same result; so does a state 4 bytes off
    16-byte alignment (WKV7's vectorised state loads fall back to scalar ones)."""
    be = href.HostBackend()
    rng = np.random.default_rng(23)
    ins = href.random_case(rng, fam, 2, 5, 2, 64, np.float32)
    want = href.run_device(head_emulated, be, fam, ins)
    f = getattr(head_emulated, f"rwkv{fam.capitalize()}Forward")
    arrs = {n: ins[n].copy() for n in href.OPS[fam].inputs}
    assert (
        f(
            None,
            *href.size_args(fam, ins),
            *(arrs[n].ctypes.data for n in href.OPS[fam].inputs),
            arrs["r"].ctypes.data,
            arrs["state"].ctypes.data,
        )
        == 0
    )
    np.testing.assert_array_equal(arrs["r"], want[0])
    np.testing.assert_array_equal(arrs["state"], want[1])
    n_state = ins["state"].size
    buf_in, buf_out = np.zeros(n_state + 4, np.float32), np.zeros(n_state + 4, np.float32)
    assert buf_in.ctypes.data % 16 == 0 and buf_out.ctypes.data % 16 == 0  # numpy aligns to 16 bytes
    s_in, s_out = buf_in[1 : 1 + n_state], buf_out[1 : 1 + n_state]  # 4 bytes past alignment
    s_in[:] = ins["state"].ravel()
    y = np.zeros_like(ins["r"])
    arrs = {n: ins[n].copy() for n in href.OPS[fam].inputs}
    ptrs = [arrs[n].ctypes.data if n != "state" else s_in.ctypes.data for n in href.OPS[fam].inputs]
    assert f(None, *href.size_args(fam, ins), *ptrs, y.ctypes.data, s_out.ctypes.data) == 0
    np.testing.assert_array_equal(y, want[0])
    np.testing.assert_array_equal(s_out.reshape(ins["state"].shape), want[1])


def test_emulated_launchers_check_arguments(head_emulated):
    z = np.zeros(64, np.float32)
    p = z.ctypes.data
    assert head_emulated.rwkvWkv7Forward(None, 1, 1, 1, 2048, 0, 0, *[p] * 9) == 1  # cudaErrorInvalidValue
    assert head_emulated.rwkvWkv6Forward(None, 1, 1, 1, 4, 0, 1, *[p] * 8) == 1
    assert head_emulated.rwkvWkv5Forward(None, 1, 1, 1, 4, 0, *([p] * 7 + [None])) == 1
    assert head_emulated.rwkvWkv5Forward(None, 0, 1, 1, 4, 0, *[None] * 8) == 0  # empty: nothing to do


def test_emulated_kernels_under_address_sanitizer(tmp_path):
    """The emulated kernels built with -fsanitize=address,undefined, loaded into a fresh python
    with libasan preloaded: no out-of-bounds access in global or shared memory (the shared buffer
    beyond the launch's size is poisoned), no undefined behaviour, over every path."""
    asan = build_helpers.asan_runtime()
    if asan is None or tp.cuda_include_dir() is None:
        pytest.skip("libasan or the CUDA headers not found")
    lib = build_helpers.compile_kernel_emulator(tmp_path, sanitize=True)
    code = (
        "import sys, numpy as np\n"
        f"sys.path.insert(0, {str(PLUGIN_TESTS)!r})\n"
        "import wkvhead_reference as R\n"
        f"lib = R.kernels_library({str(lib)!r})\n"
        "rng = np.random.default_rng(9)\n"
        "n = 0\n"
        "for fam in R.OPS:\n"
        "    for case in [(1, 1, 2, 64), (3, 3, 2, 8), (2, 2, 1, 48), (1, 2, 1, 128), (2, 2, 1, 16)]:\n"
        "        for act, wd in [(np.float32, None), (np.float16, None), (np.float16, np.float32)]:\n"
        "            if wd is not None and not R.OPS[fam].w_arg:\n"
        "                continue\n"
        "            ins = R.random_case(rng, fam, *case, act, wd)\n"
        "            got = R.run_device(lib, R.HostBackend(), fam, ins)\n"
        "            assert R.within(R.compare(fam, got, ins), act), (fam, case)\n"
        "            n += 1\n"
        "print('cases', n)\n"
    )
    env = {
        **os.environ,
        "LD_PRELOAD": str(asan),
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0",
        "UBSAN_OPTIONS": "print_stacktrace=1",
    }
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "cases 40" in r.stdout, r.stdout + r.stderr[-4000:]
    assert "runtime error" not in r.stderr and "AddressSanitizer" not in r.stderr, r.stderr[-4000:]


# -- nvcc -------------------------------------------------------------------------------------------
def test_nvcc_compiles_kernels(tmp_path):
    if tp.find_nvcc() is None:
        pytest.skip("nvcc not found")
    lib = tp.compile_kernels_only(tmp_path, cuda_architectures=80)  # one architecture: a few seconds
    assert lib.is_file()
    if shutil.which("nm"):
        syms = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True).stdout
        assert re.search(r"\bT rwkvWkv4Forward\b", syms), syms


def test_nvcc_compiles_head_kernels(tmp_path):
    if tp.find_nvcc() is None:
        pytest.skip("nvcc not found")
    lib = tp.compile_kernels(tmp_path, "wkvhead", cuda_architectures=80)  # three files in parallel
    assert lib.is_file()
    if shutil.which("nm"):
        syms = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True).stdout
        for fam in ("Wkv5", "Wkv6", "Wkv7"):
            assert re.search(rf"\bT rwkv{fam}Forward\b", syms), syms


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
    nm = lambda *a: (
        subprocess.run(
            ["nm", "-D", *a, str(trt_build["plugin"])],  # noqa: E731
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    defined = {ln.split()[-1] for ln in nm("--defined-only").splitlines() if ln.strip()}
    assert defined == EXPORTED
    undefined = nm("--undefined-only")
    assert "getPluginRegistry" not in undefined  # looked up at run time, never linked
    assert "libnvinfer" not in subprocess.run(["ldd", str(trt_build["plugin"])], capture_output=True, text=True).stdout
    # the autoregister companion: exports nothing, needs only the plugin library (found beside it)
    auto = subprocess.run(
        ["nm", "-D", "--defined-only", str(trt_build["autoregister"])], capture_output=True, text=True, check=True
    ).stdout
    assert not [ln for ln in auto.splitlines() if ln.split()[-1].startswith(("rwkv", "get", "set"))], auto
    needed = subprocess.run(["readelf", "-d", str(trt_build["autoregister"])], capture_output=True, text=True).stdout
    assert "[librwkv_trt_plugins.so]" in needed and "libnvinfer" not in needed and "$ORIGIN" in needed, needed


def test_plugins_readme_documents_each_loader():
    text = (REPO / "plugins" / "README.md").read_text()
    loading = text[text.index("## Loading") :]
    loading = loading[: loading.find("\n## ", 3)] if "\n## " in loading[3:] else loading
    for loader in DOCUMENTED_LOADERS:
        assert loader in loading, loader
    assert tp.LIBRARY_NAME in loading and tp.AUTOREGISTER_LIBRARY_NAME in loading
    assert "10.7" in loading  # the minimum TensorRT version for plugin-mode exports


@pytest.mark.parametrize(
    "scenario",
    [
        "loadlibrary",
        "dlopen-registers-nothing",
        "autoregister",
        "autoregister-then-loadlibrary",
        "loadlibrary-then-autoregister",
        "loadlibrary-then-copy",
        "exercise",
    ],
)
def test_plugin_against_mock_tensorrt(trt_build, scenario):
    second = trt_build["copy"] if scenario.endswith("copy") else trt_build["autoregister"]
    r = subprocess.run(
        [str(trt_build["driver"]), scenario, str(trt_build["plugin"]), str(second)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and "FAIL" not in r.stdout, r.stdout + r.stderr
    assert "ok  :" in r.stdout  # the scenario ran its checks
    if scenario != "exercise":  # (exercise provokes rejections on purpose)
        assert "Cannot find plugin" not in r.stderr, r.stderr  # registry probes never log misses


def test_mock_registry_catches_registration_inside_loadlibrary(trt_build, tmp_path):
    """The stand-in is strict where TensorRT is: a library that registers from its static initializer
    while loadLibrary holds the registry lock is caught (real TensorRT would deadlock or fail)."""
    src = tmp_path / "bad.cpp"
    src.write_text(
        'extern "C" int rwkvTrtRegisterPlugins();\n'
        "static int registered = rwkvTrtRegisterPlugins();\n"
        'extern "C" __attribute__((visibility("default"))) void* getCreators(int& n) { n = 0; return 0; }\n'
    )
    bad = tmp_path / "libbad.so"
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    subprocess.run(
        [
            cxx,
            "-shared",
            "-fPIC",
            str(src),
            "-o",
            str(bad),
            str(trt_build["plugin"]),
            f"-Wl,-rpath,{trt_build['plugin'].parent}",
        ],
        check=True,
        capture_output=True,
    )
    r = subprocess.run([str(trt_build["driver"]), "loadlibrary", str(bad)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "FAIL: IPluginRegistry::getAllCreators called from inside another registry call" in r.stdout, r.stdout


def test_enqueue_reports_launch_failure_without_gpu(trt_build):
    if Path("/dev/nvidiactl").exists() or ref.cuda_backend()[0] is not None:
        pytest.skip("a CUDA device exists; this checks the no-device error path")
    r = subprocess.run(
        [str(trt_build["driver"]), "enqueue-without-gpu", str(trt_build["plugin"])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and "FAIL" not in r.stdout, r.stdout + r.stderr
    assert "kernel launch failed" in r.stderr


@pytest.mark.parametrize(
    "scenario", ["trt-first", "plugin-first", "no-second-tensorrt", "loadlibrary", "version-mismatch"]
)
def test_plugin_loaded_with_ctypes(trt_build, scenario):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RWKV_TRT_PLUGIN")}
    if scenario == "no-second-tensorrt":  # a TensorRT is findable by soname, but none is loaded
        env["LD_LIBRARY_PATH"] = str(trt_build["mock"].parent)
    if scenario == "version-mismatch":
        env["MOCK_TRT_VERSION"] = str((trt_build["major"] - 1) * 10000 + 800)
    r = subprocess.run(
        [
            sys.executable,
            str(PLUGIN_TESTS / "mock_ctypes_scenarios.py"),
            scenario,
            str(trt_build["mock"]),
            str(trt_build["plugin"]),
            str(trt_build["autoregister"]),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert r.returncode == 0 and "FAIL" not in r.stdout and "ok  :" in r.stdout, r.stdout + r.stderr
    if scenario in ("plugin-first", "no-second-tensorrt"):
        assert "were not registered" in r.stderr
    elif scenario == "version-mismatch":
        assert "rebuild the plugin library" in r.stderr
    else:
        assert "[rwkv-trt-plugins]" not in r.stderr, r.stderr


# -- the CUDA kernels on a GPU --------------------------------------------------------------------
def _gpu_kernels(tmp_path_factory, family: str, wrap):
    """(CUDA buffer backend, the family's kernels compiled for this GPU); skips without a GPU or nvcc."""
    backend, reason = ref.cuda_backend()
    if backend is None:
        pytest.skip(reason)
    if tp.find_nvcc() is None:
        pytest.skip("nvcc not found")
    lib = tp.compile_kernels(tmp_path_factory.mktemp(f"{family}_gpu"), family, cuda_architectures=backend.arch())
    return backend, wrap(lib)


@pytest.fixture(scope="module")
def gpu(tmp_path_factory):
    return _gpu_kernels(tmp_path_factory, "wkv4", ref.kernels_library)


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
    r = subprocess.run(
        [str(trt_build["driver"]), "enqueue-gpu", str(trt_build["plugin"])], capture_output=True, text=True, timeout=120
    )
    if r.stdout.startswith("skip:"):
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0 and "FAIL" not in r.stdout, r.stdout + r.stderr


@pytest.fixture(scope="module")
def head_gpu(tmp_path_factory):
    return _gpu_kernels(tmp_path_factory, "wkvhead", href.kernels_library)


@pytest.mark.gpu
@pytest.mark.parametrize("case", HEAD_CASES + [(8, 64, 4, 64), (1, 3, 1, 256)], ids=lambda c: "B{}T{}H{}N{}".format(*c))
@pytest.mark.parametrize("fam,dkey", FAM_DTYPES)
def test_head_kernels_on_gpu_match_numpy(head_gpu, fam, dkey, case):
    backend, lib = head_gpu
    act, wd = HEAD_DTYPES[dkey]
    rng = np.random.default_rng(sum(case) * 7 + len(fam))
    ins = href.random_case(rng, fam, *case, act, wd)
    errs = href.compare(fam, href.run_device(lib, backend, fam, ins), ins)
    assert href.within(errs, act), errs


# -- the slow lane --------------------------------------------------------------------------------
# Every test that needs a library compiled for it (g++, nvcc, CMake: seconds to a minute on two cores)
# is `slow`; the rest run in the fast lane (-m "not slow").
_COMPILED_FIXTURES = {"host_lib", "head_host", "head_emulated", "head_model_exports", "trt_build", "gpu", "head_gpu"}
_COMPILING_TESTS = {
    "test_emulated_kernels_under_address_sanitizer",
    "test_nvcc_compiles_kernels",
    "test_nvcc_compiles_head_kernels",
}


def _mark_compiling_tests_slow():
    import inspect

    for name, fn in list(globals().items()):
        if (
            name.startswith("test_")
            and callable(fn)
            and (name in _COMPILING_TESTS or _COMPILED_FIXTURES & set(inspect.signature(fn).parameters))
        ):
            globals()[name] = pytest.mark.slow(fn)


_mark_compiling_tests_slow()
