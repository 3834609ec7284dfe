"""TensorRT: `rwkv-export build-engine` and the TensorRT backend of rwkv_runtime.

Three kinds of test:
- without TensorRT (always run): the one-line errors, the sidecar manifest;
- against a stand-in for `tensorrt` and cuda-python (always run; tests/tensorrt/fakes.py): the stand-in mirrors the documented
  API that engine.py / rwkv_runtime.tensorrt call, keeps "device" memory in host allocations, records CUDA
  graph captures, and computes with onnxruntime on the ONNX file the engine was built from. It checks
  our logic (profiles, sidecars, plugins, buffers, double buffering, graph capture), not TensorRT;
- with TensorRT and a CUDA device (skipped otherwise): real engines against BlinkDL's logits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import rwkv_runtime
from rwkv_runtime import BackendUnavailable, RuntimeUserError
from rwkv_runtime import artifact as art
from rwkv_runtime import tensorrt as rtrt
from rwkv_runtime.manifest import Manifest, StateSpec, encode_state
from rwkv_runtime.tensorrt import loader as trt_loader

from ..conftest import PROMPTS, ref_logits
from ..helpers import step_all
from .fakes import FakeCudaCore, make_fake_trt

NAME = "golden-rwkv4"
_REAL_IMPORT_CUDA_CORE = trt_loader.import_cuda_core


def _manifest(**kw) -> Manifest:
    state = [StateSpec("state.0.x", "new_state.0.x", ["batch", 4], init=-1e30, layer=0)]
    return Manifest(
        architecture="rwkv4", n_layer=1, n_embd=4, vocab_size=8, state=state, companions={"step": "m.engine"}, **kw
    )


def _write_fake_engine(d: Path, manifest: Manifest, **extra) -> Path:
    eng = d / "m.engine"
    eng.write_bytes(b"not a real engine")
    side = {
        "format": art.SIDECAR_FORMAT,
        "format_version": art.SIDECAR_VERSION,
        "manifest": json.loads(manifest.to_json()),
        **extra,
    }
    art.sidecar_path(eng).write_text(json.dumps(side))
    return eng


# ---------------------------------------------------------------------------------------------
# Without TensorRT
# ---------------------------------------------------------------------------------------------
def test_build_engine_without_tensorrt_is_one_line(tmp_path, monkeypatch):
    from rwkv_export.targets.tensorrt.engine import build_engine_command

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    res = CliRunner().invoke(build_engine_command, [str(model), "-o", str(tmp_path / "m.engine")])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: TensorRT is not installed: pip install tensorrt")
    assert "[tensorrt]" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_build_engine_rejects_a_non_engine_suffix(tmp_path):
    from rwkv_export.targets.tensorrt.engine import build_engine_command

    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    res = CliRunner().invoke(build_engine_command, [str(model), "-o", str(tmp_path / "m.bin")])
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1 and ".engine" in res.output


def test_session_on_engine_without_tensorrt_is_backend_unavailable(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    eng = _write_fake_engine(tmp_path, _manifest())
    with pytest.raises(BackendUnavailable) as e:
        rwkv_runtime.Session(eng)
    msg = str(e.value)
    assert "\n" not in msg and "pip install tensorrt" in msg


def test_sidecar_manifest_round_trip(tmp_path):
    man = _manifest(precision="fp16", tokenizer={"kind": "hf-json", "name": "tokenizer.json"})
    init = {"state.0.x": np.arange(4, dtype=np.float32)[None]}
    eng = _write_fake_engine(tmp_path, man, tokenizer_json='{"model": {}}', initial_state=encode_state(init))
    got, tok = art.read_engine_manifest(eng)
    assert got.to_json() == man.to_json() and tok == '{"model": {}}'
    np.testing.assert_array_equal(art.read_engine_initial_state(eng)["state.0.x"], init["state.0.x"])


def test_sidecar_errors_are_one_line(tmp_path):
    eng = tmp_path / "m.engine"
    eng.write_bytes(b"x")
    with pytest.raises(RuntimeUserError, match="m.engine.json"):
        art.read_engine_manifest(eng)
    art.sidecar_path(eng).write_text("{nope")
    with pytest.raises(RuntimeUserError, match="not valid JSON"):
        art.read_engine_manifest(eng)
    art.sidecar_path(eng).write_text(json.dumps({"format": art.SIDECAR_FORMAT, "format_version": 99, "manifest": {}}))
    with pytest.raises(RuntimeUserError, match="version 99"):
        art.read_engine_manifest(eng)


def test_inspect_reads_the_engine_sidecar(tmp_path):
    from rwkv_export.cli import main

    eng = _write_fake_engine(tmp_path, _manifest())
    res = CliRunner().invoke(main, ["inspect", str(eng)])
    assert res.exit_code == 0, res.output
    assert "rwkv4" in res.output and "state.0.x" in res.output


# ---------------------------------------------------------------------------------------------
# Against the stand-in for tensorrt + cuda-python (tests/tensorrt/fakes.py)
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def fake(monkeypatch):
    """Install the stand-in: returns a function (capturable=..., fail_build=...) -> (trt, fake cuda.core)."""
    monkeypatch.setattr(trt_loader, "_LOGGER", None)
    monkeypatch.setattr(trt_loader, "_LOADED_PLUGINS", {})
    monkeypatch.delenv(rtrt.PLUGIN_ENV, raising=False)
    monkeypatch.delenv(rtrt.GRAPHS_ENV, raising=False)

    def install(**kw):
        cudart = FakeCudaCore()
        trt = make_fake_trt(cudart, **kw)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        monkeypatch.setattr(trt_loader, "import_cuda_core", lambda: cudart)
        return trt, cudart

    return install


def _build(tmp_path, onnx_path, *args):
    from rwkv_export.targets.tensorrt.engine import build_engine_command

    out = tmp_path / "m.engine"
    res = CliRunner().invoke(build_engine_command, [str(onnx_path), "-o", str(out), *args])
    return res, out


def test_build_engine_writes_engines_sidecars_and_profiles(tmp_path, fake, rwkv4_exports):
    trt, _ = fake()
    cache = tmp_path / "timing.cache"
    res, out = _build(
        tmp_path,
        rwkv4_exports["plain"],
        "--max-batch",
        "4",
        "--opt-batch",
        "2",
        "--max-seq",
        "16",
        "--timing-cache",
        str(cache),
        "--workspace",
        "64",
    )
    assert res.exit_code == 0, res.output
    seq = tmp_path / "m.seq.engine"
    assert out.is_file() and seq.is_file() and cache.read_bytes() == b"fresh+"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".rwkv-engine-")]
    assert "Building engine" in res.output and f"wrote {out}" in res.output
    side = json.loads(art.sidecar_path(out).read_text())
    assert side["profile"]["tokens"] == [[1], [2], [4]]
    assert side["profile"]["state.0.wkv_pp"] == [[1, 64], [2, 64], [4, 64]]
    assert side["plugins"] == [] and side["source_onnx"] == rwkv4_exports["plain"].name
    sside = json.loads(art.sidecar_path(seq).read_text())
    assert sside["profile"]["tokens"] == [[1, 1], [2, 16], [4, 16]]
    man, _ = art.read_engine_manifest(out)
    assert man.graph == "step" and man.companions == {"step": "m.engine", "sequence": "m.seq.engine"}
    assert art.read_engine_manifest(seq)[0].graph == "sequence"
    # strongly typed on TensorRT 10, TF32 off, the cache shared by both builds
    assert all(n.flags == 1 << 1 for n in trt.calls["networks"])
    assert all(c.flags_cleared == ["tf32"] and c.pool == {"workspace": 64 << 20} for c in trt.calls["configs"])
    assert trt.calls["configs"][0].cache is trt.calls["configs"][1].cache


@pytest.mark.parametrize("what", ["engine", "cache"])
def test_an_output_linked_to_an_input_is_refused_before_building(tmp_path, fake, rwkv4_exports, what):
    """-o (or --timing-cache) a link to the export's weights file: one line before TensorRT builds anything
    (was: refused only when the engines were committed, after the build)."""
    trt, _ = fake()
    model = rwkv4_exports["plain"]
    weights = model.with_name(model.name + ".data")
    assert weights.is_file()
    before = weights.read_bytes()
    link = tmp_path / ("m.engine" if what == "engine" else "timing.cache")
    link.symlink_to(weights)
    args = ["--timing-cache", str(link)] if what == "cache" else []
    out = link if what == "engine" else tmp_path / "x.engine"
    from rwkv_export.targets.tensorrt.engine import build_engine_command

    res = CliRunner().invoke(build_engine_command, [str(model), "-o", str(out), *args])
    assert res.exit_code == 1 and res.output.startswith("Error:") and "input" in res.output, res.output
    assert not trt.calls["networks"], "TensorRT was asked to build"
    assert weights.read_bytes() == before


def test_failed_build_leaves_nothing_behind(tmp_path, fake, rwkv4_exports):
    fake(fail_build=".seq.onnx")
    res, out = _build(tmp_path, rwkv4_exports["plain"], "-q")
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == [
        f"Error: TensorRT could not build {rwkv4_exports['plain'].name.replace('.onnx', '.seq.onnx')}: "
        "out of tactics (stand-in failure)"
    ]
    assert list(tmp_path.iterdir()) == []


def _sessions(tmp_path, rwkv4_exports, wkv="plain", build_args=()):
    res, out = _build(tmp_path, rwkv4_exports[wkv], "-q", *build_args)
    assert res.exit_code == 0, res.output
    return rwkv_runtime.Session(out), rwkv_runtime.Session(rwkv4_exports[wkv])


@pytest.mark.parametrize("graphs", [False, True])
def test_stand_in_engine_matches_onnxruntime(tmp_path, fake, rwkv4_exports, graphs):
    _, cudart = fake()
    eng, ref = _sessions(tmp_path, rwkv4_exports, build_args=("--max-seq", "5"))
    eng.backend.cuda_graphs = graphs
    tokens = list(PROMPTS["atom"])
    a, sa = step_all(eng, tokens)
    b, sb = step_all(ref, tokens)
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert np.abs(a - ref_logits(NAME, "atom")).max() <= 1e-5
    for k in sa.keys():
        np.testing.assert_allclose(sa[k], sb[k], atol=1e-6)
    # prefill: 34 tokens through a T <= 5 profile (split into chunks by the backend)
    la, pa = eng.prefill(np.array([tokens]), chunk_size=256)
    lb, _ = ref.prefill(np.array([tokens]))
    np.testing.assert_allclose(la, lb, atol=1e-5)
    # batch 3 (one batch size after another)
    prompts = [b"abc", b"xyz", b"hel"]
    s3e, s3r = eng.new_state(3), ref.new_state(3)
    for j in range(3):
        le, s3e = eng.step(np.array([p[j] for p in prompts]), s3e)
        lr, s3r = ref.step(np.array([p[j] for p in prompts]), s3r)
    np.testing.assert_allclose(le, lr, atol=1e-6)
    if graphs:  # the step loop reached the two captured graphs (A->B, B->A) of batch 1
        assert cudart.instantiated >= 2 and cudart.launches >= len(tokens) - 4
    else:
        assert cudart.launches == 0


def test_double_buffering_never_overwrites_a_held_state(tmp_path, fake, rwkv4_exports):
    _, cudart = fake()
    eng, _ = _sessions(tmp_path, rwkv4_exports)
    eng.backend.cuda_graphs = True
    _, st = step_all(eng, b"The atom")
    held = st.numpy()
    snapshot = st.copy()
    l1, a = eng.step(np.array([5]), st)
    l2, b = eng.step(np.array([5]), st)  # the same state stepped twice
    _, c = eng.step(np.array([7]), a)
    _, d = eng.step(np.array([7]), b)
    np.testing.assert_array_equal(l1, l2)
    for k, v in held.items():
        np.testing.assert_array_equal(st[k], v)  # untouched by four later steps
        np.testing.assert_array_equal(snapshot[k], v)
        np.testing.assert_array_equal(c[k], d[k])
    # a long loop: the pool settles on two sets, the allocations stop growing
    state = eng.new_state(1)
    sizes = []
    for i in range(40):
        _, state = eng.step(np.array([i % 200]), state)
        sizes.append(len(cudart.dev))
    assert len(set(sizes[5:])) == 1


def test_capture_failure_falls_back(tmp_path, fake, rwkv4_exports, capsys):
    _, cudart = fake(capturable=False)
    eng, ref = _sessions(tmp_path, rwkv4_exports)
    eng.backend.cuda_graphs = True
    a, _ = step_all(eng, PROMPTS["atom"])
    b, _ = step_all(ref, PROMPTS["atom"])
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert cudart.launches == 0 and "CUDA graph capture failed" in capsys.readouterr().err


def test_batch_outside_the_profile_is_one_line(tmp_path, fake, rwkv4_exports):
    fake()
    eng, _ = _sessions(tmp_path, rwkv4_exports, build_args=("--max-batch", "2"))
    with pytest.raises(RuntimeUserError, match=r"outside this engine's profile \(1..2\).*--max-batch 3"):
        eng.step(np.array([1, 2, 3]))


def test_plugin_library_is_recorded_and_loaded(tmp_path, fake, rwkv4_exports, monkeypatch):
    trt, _ = fake()
    lib = tmp_path / "plugins" / "librwkv_trt_plugins.so"
    lib.parent.mkdir()
    lib.write_text("rwkv::WKV4:1 rwkv::WKV4Seq:1")  # what the stand-in registry registers
    res, out = _build(tmp_path, rwkv4_exports["plugin"], "-q", "--plugin", str(lib))
    assert res.exit_code == 0, res.output
    side = json.loads(art.sidecar_path(out).read_text())
    assert side["plugins"] == [{"name": lib.name, "path": str(lib.resolve())}]
    assert side["plugin_layers"] == _custom_nodes(rwkv4_exports["plugin"]) > 0  # each rwkv::WKV4 node: a plugin
    assert trt.calls["creator_misses"] == 0  # the registry was read, never probed with get_creator
    # a fresh process: the engine loads the recorded library before deserializing
    monkeypatch.setattr(trt_loader, "_LOADED_PLUGINS", {})
    trt2, _ = fake()
    eng = rwkv_runtime.Session(out)
    assert trt2.calls["loaded"] == [str(lib.resolve())]
    logits, _ = step_all(eng, PROMPTS["in"])
    assert np.abs(logits - ref_logits(NAME, "in")).max() <= 1e-5
    # moved without its library: one line naming the variable to set
    monkeypatch.setattr(trt_loader, "_LOADED_PLUGINS", {})
    fake()
    lib.rename(tmp_path / "elsewhere.so")
    with pytest.raises(RuntimeUserError, match=f"needs the TensorRT plugin library {lib.name}.*{rtrt.PLUGIN_ENV}"):
        rwkv_runtime.Session(out)
    monkeypatch.setenv(rtrt.PLUGIN_ENV, str(tmp_path / "elsewhere.so"))
    rwkv_runtime.Session(out)


def test_plugin_export_without_plugin_builds_function_bodies(tmp_path, fake, rwkv4_exports, monkeypatch):
    import rwkv_export.targets.tensorrt.loader as loader_mod

    fake()
    monkeypatch.setattr(loader_mod, "default_plugin", lambda: None)
    res, out = _build(tmp_path, rwkv4_exports["plugin"])
    assert res.exit_code == 0, res.output
    assert "no TensorRT plugin registered for rwkv::WKV4" in res.output
    assert json.loads(art.sidecar_path(out).read_text())["plugins"] == []


def _fake_plugin_library(tmp_path) -> Path:
    lib = tmp_path / "plugins" / "librwkv_trt_plugins.so"
    lib.parent.mkdir(exist_ok=True)
    lib.write_text("rwkv::WKV4:1 rwkv::WKV4Seq:1")  # what the stand-in registry registers
    return lib


def test_parser_10_1_precedence_is_refused_with_the_version(tmp_path, fake, rwkv4_exports):
    """TensorRT 10.0-10.6 build the function bodies even with the plugin loaded: an explicit --plugin is
    refused with the version and what to do; without it the build uses the bodies and needs no library."""
    trt, _ = fake(version="10.6.0")
    lib = _fake_plugin_library(tmp_path)
    res, out = _build(tmp_path, rwkv4_exports["plugin"], "-q", "--plugin", str(lib))
    assert res.exit_code == 1
    (line,) = res.output.strip().splitlines()
    assert (
        line.startswith(
            "Error: TensorRT 10.6.0's ONNX parser builds the rwkv::WKV* nodes from their ONNX function bodies"
        )
        and "10.7" in line
        and "drop --plugin" in line
    )
    assert not out.exists() and trt.calls["loaded"] == []
    res, out = _build(tmp_path, rwkv4_exports["plugin"])
    assert res.exit_code == 0, res.output
    assert "building the function bodies, no plugin library needed" in res.output
    side = json.loads(art.sidecar_path(out).read_text())
    assert side["plugins"] == [] and side["plugin_layers"] == 0 and trt.calls["loaded"] == []


def test_network_without_plugin_layers_is_an_error_naming_the_version(tmp_path, fake, rwkv4_exports):
    """A parser that keeps the function bodies although the plugin is registered (10.1-style precedence
    behind a newer version number): the count of plugin layers catches it; nothing is written."""
    fake(version="10.8.0", parser="10.1")
    lib = _fake_plugin_library(tmp_path)
    res, out = _build(tmp_path, rwkv4_exports["plugin"], "-q", "--plugin", str(lib))
    assert res.exit_code == 1
    (line,) = res.output.strip().splitlines()
    assert "TensorRT 10.8.0's ONNX parser built the network without any plugin layer" in line
    assert "--wkv plain" in line and "10.7" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plugins"]


def _custom_nodes(path) -> int:
    import onnx

    return sum(n.domain == "rwkv" for n in onnx.load(str(path), load_external_data=False).graph.node)


@pytest.mark.parametrize("parser,plugins_win", [("10.1", False), ("11", True)])
def test_stand_in_parser_precedence(tmp_path, fake, rwkv4_exports, parser, plugins_win):
    """The stand-in follows each version's rule for a node that is both a plugin and a local function."""
    from rwkv_export.targets.tensorrt.loader import plugin_layers as _plugin_layers

    trt, _ = fake(parser=parser)
    lib = _fake_plugin_library(tmp_path)
    trt.get_plugin_registry().load_library(str(lib))
    network = trt.Builder(None).create_network()
    assert trt.OnnxParser(network, None).parse_from_file(str(rwkv4_exports["plugin"]))
    layers = _custom_nodes(rwkv4_exports["plugin"]) if plugins_win else 0
    assert _plugin_layers(trt, network) == layers == len(network.custom)


def test_validate_and_build_engine_build_through_one_loader_with_one_profile(
    tmp_path, fake, rwkv4_exports, monkeypatch
):
    """build-engine and validate --backend tensorrt make their engines with the same function
    (targets.tensorrt.loader.EngineLoader.build): asked for the same ranges (batch 1, T 1..6 tuned for 6),
    TensorRT receives the same profile, the same plugin registration and builds the same engine."""
    import polygraphy.backend.trt as polygraphy_trt

    from rwkv_export.targets.tensorrt.loader import EngineLoader, Profile
    from rwkv_export.verify.runners import backend_runner
    from rwkv_export.verify.target import load_target

    trt, _ = fake()
    lib = _fake_plugin_library(tmp_path)
    calls = []
    real_build = EngineLoader.build

    def spy(self, onnx, manifest, profile, **kw):
        calls.append((Path(onnx).name, profile))
        return real_build(self, onnx, manifest, profile, **kw)

    monkeypatch.setattr(EngineLoader, "build", spy)
    model = rwkv4_exports["plugin"].with_name(rwkv4_exports["plugin"].stem + ".seq.onnx")
    res, out = _build(
        tmp_path,
        model,
        "-q",
        "--no-companions",
        "--max-batch",
        "1",
        "--max-seq",
        "6",
        "--opt-seq",
        "6",
        "--plugin",
        str(lib),
    )
    assert res.exit_code == 0, res.output
    # validate: the engine bytes go to Polygraphy's TrtRunner (recorded here: the stand-in is not TensorRT)
    monkeypatch.setattr(polygraphy_trt, "EngineFromBytes", lambda data: lambda: ("engine", bytes(data)))
    monkeypatch.setattr(polygraphy_trt, "TrtRunner", lambda engine, name: (engine, name))
    (_, data), name = backend_runner(load_target(model), "tensorrt", (str(lib),), 6)
    assert calls == [
        (model.name, Profile(max_batch=1, opt_batch=1, max_seq=6, opt_seq=6)),
        (model.name, Profile.for_validation(6)),
    ]
    built, checked = (c.profiles[0].shapes for c in trt.calls["configs"])
    assert built == checked and built["tokens"] == [[1, 1], [1, 6], [1, 6]]
    assert data == out.read_bytes() and name == f"trt-{model.name}"
    assert json.loads(data)["plugins"] and trt.calls["loaded"] == [str(lib.resolve())]  # plugin layers, once


def test_sidecar_never_lists_a_plugin_the_network_does_not_contain(tmp_path, fake, rwkv4_exports):
    fake()
    lib = _fake_plugin_library(tmp_path)
    res, out = _build(tmp_path, rwkv4_exports["plain"], "-q", "--plugin", str(lib))  # nothing to use it
    assert res.exit_code == 0, res.output
    for eng in (out, tmp_path / "m.seq.engine"):
        side = json.loads(art.sidecar_path(eng).read_text())
        assert side["plugins"] == [] and side["plugin_layers"] == 0
    lib.unlink()  # so the runtime must not need it
    rwkv_runtime.Session(out)


def test_autoregister_library_given_to_load_library_is_one_line(tmp_path, fake, rwkv4_exports):
    trt, _ = fake()
    lib = tmp_path / "librwkv_trt_plugins_autoregister.so"
    lib.write_text("rwkv::WKV4:1 rwkv::WKV4Seq:1")
    res, out = _build(tmp_path, rwkv4_exports["plugin"], "-q", "--plugin", str(lib))
    assert res.exit_code == 1 and trt.calls["loaded"] == []
    (line,) = res.output.strip().splitlines()
    assert "is for loaders that only dlopen" in line and "librwkv_trt_plugins.so" in line


def test_unreadable_timing_cache_is_one_line(tmp_path, fake, rwkv4_exports):
    fake()
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"corrupt bytes")
    res, out = _build(tmp_path, rwkv4_exports["plain"], "-q", "--timing-cache", str(cache))
    assert res.exit_code == 1
    (line,) = res.output.strip().splitlines()
    assert line.startswith(f"Error: --timing-cache {cache}: TensorRT cannot read this file as a timing cache")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["timing.cache"]


def test_missing_cuda_core_or_no_device_is_backend_unavailable(tmp_path, fake, monkeypatch):
    eng = _write_fake_engine(tmp_path, _manifest())
    fake()
    monkeypatch.setattr(trt_loader, "import_cuda_core", _REAL_IMPORT_CUDA_CORE)
    for mod in ("cuda", "cuda.core", "cuda.bindings"):
        monkeypatch.setitem(sys.modules, mod, None)
    with pytest.raises(BackendUnavailable, match="needs NVIDIA's cuda.core: pip install cuda-core"):
        rwkv_runtime.Session(eng)
    monkeypatch.setattr(trt_loader, "import_cuda_core", lambda: FakeCudaCore(devices=0))
    with pytest.raises(BackendUnavailable, match="no CUDA device for TensorRT"):
        rwkv_runtime.Session(eng)


def test_trt_backend_implements_the_backend_protocol(tmp_path, fake, rwkv4_exports):
    from rwkv_runtime.backend import Backend

    _, cudart = fake()
    eng, _ = _sessions(tmp_path, rwkv4_exports)
    b = eng.backend
    assert isinstance(b, Backend) and b.device == "cuda" and b.has("step") and b.has("sequence")
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    v = b.from_numpy(arr)
    arr[:] = -1  # from_numpy copied it
    assert cudart.is_device(v.ptr, v.nbytes)
    np.testing.assert_array_equal(b.to_numpy(v), np.arange(12, dtype=np.float32).reshape(3, 4))


def test_runtime_tensorrt_never_imports_the_exporter(tmp_path):
    """The TensorRT backend imports and locates plugin libraries with rwkv_export (and torch, onnx) blocked."""
    side = {"plugins": [{"name": "librwkv_trt_plugins.so", "path": str(tmp_path / "gone" / "x.so")}]}
    (tmp_path / "librwkv_trt_plugins.so").write_bytes(b"")
    code = (
        "import sys, pathlib\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('rwkv_export', 'torch', 'onnx', 'tensorrt'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import rwkv_runtime.tensorrt\n"
        "from rwkv_runtime.tensorrt import loader\n"
        f"side = {side!r}\n"
        f"d = pathlib.Path({str(tmp_path)!r})\n"
        "print(loader.plugin_candidates(d / 'm.engine', side)[0].name)\n"
        "print(loader.plugin_candidates(d / 'm.engine', side, plugin=d / 'librwkv_trt_plugins.so')[0])\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('rwkv_export', 'torch', 'onnx')]\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "RWKV_TRT_PLUGIN": ""}
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["librwkv_trt_plugins.so", str(tmp_path / "librwkv_trt_plugins.so")]


def test_user_passed_plugin_path(tmp_path):
    side = {"plugins": [{"name": "librwkv_trt_plugins.so", "path": "/nonexistent/librwkv_trt_plugins.so"}]}
    eng = tmp_path / "m.engine"
    with pytest.raises(RuntimeUserError, match="needs the TensorRT plugin library librwkv_trt_plugins.so"):
        trt_loader.plugin_candidates(eng, side)
    with pytest.raises(RuntimeUserError, match="plugin=/nowhere.so does not exist"):
        trt_loader.plugin_candidates(eng, side, plugin="/nowhere.so")
    lib = tmp_path / "elsewhere" / "librwkv_trt_plugins.so"
    lib.parent.mkdir()
    lib.write_bytes(b"")
    assert trt_loader.plugin_candidates(eng, side, plugin=lib) == [lib]


def test_runtime_tensorrt_modules_are_small():
    pkg = Path(rtrt.__file__).parent
    sizes = {p.name: len(p.read_text().splitlines()) for p in pkg.glob("*.py")}
    assert set(sizes) >= {"__init__.py", "loader.py", "memory.py", "runner.py", "backend.py"}
    assert max(sizes.values()) <= 400, sizes


def test_engine_not_built_from_this_manifest_is_one_line(tmp_path, fake, rwkv4_exports):
    fake()
    res, out = _build(tmp_path, rwkv4_exports["plain"], "-q")
    side = json.loads(art.sidecar_path(out).read_text())
    side["manifest"]["state"][0]["name"] = "state.0.nope"
    art.sidecar_path(out).write_text(json.dumps(side))
    with pytest.raises(RuntimeUserError, match="no tensor 'state.0.nope'"):
        rwkv_runtime.Session(out)
    out.write_bytes(b"garbage")
    with pytest.raises(RuntimeUserError, match="could not deserialize"):
        rwkv_runtime.Session(out)


# ---------------------------------------------------------------------------------------------
# Real TensorRT on a CUDA device
# ---------------------------------------------------------------------------------------------
def _need_tensorrt_and_gpu():
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install tensorrt)")
    try:
        cc = rtrt.import_cuda_core()
        cc.Device(0)
    except BackendUnavailable:
        pytest.skip("cuda.core is not installed (pip install cuda-core cuda-bindings)")
    except Exception as e:  # noqa: BLE001 - no driver / no device
        pytest.skip(f"no CUDA device ({str(e).splitlines()[0][:100]})")


@pytest.fixture(scope="session")
def rwkv4_engines(rwkv4_exports, tmp_path_factory):
    """The RWKV-4 reference exports built with TensorRT (step + sequence), plain and plugin mode."""
    _need_tensorrt_and_gpu()
    from rwkv_export.targets.tensorrt.engine import EngineOptions, build_engine
    from rwkv_export.targets.tensorrt.plugin import find_plugin

    d = tmp_path_factory.mktemp("trt")
    out = {"plain": build_engine(rwkv4_exports["plain"], d / "plain.engine", EngineOptions(max_batch=4))[0]}
    lib = find_plugin()
    if lib is not None:
        out["plugin"] = build_engine(
            rwkv4_exports["plugin"], d / "plugin.engine", EngineOptions(max_batch=4, plugins=(lib,))
        )[0]
    return out


def _engine(engines, wkv):
    if wkv not in engines:
        pytest.skip("the rwkv TensorRT plugin library is not built (plugins/README.md)")
    return engines[wkv]


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("wkv", ["plain", "plugin"])
def test_engine_matches_blinkdl(rwkv4_engines, wkv, graphs, monkeypatch):
    monkeypatch.setenv(rtrt.GRAPHS_ENV, "1" if graphs else "0")
    s = rwkv_runtime.Session(_engine(rwkv4_engines, wkv))
    assert s.backend.cuda_graphs is graphs
    for prompt in PROMPTS:
        logits, _ = step_all(s, PROMPTS[prompt])
        err = np.abs(logits - ref_logits(NAME, prompt)).max(axis=1)
        assert err.max() <= 1e-4, f"{prompt}: first bad step {int(np.argmax(err > 1e-4))}: {err.max():.2e}"
    pl, _ = s.prefill(np.array([list(PROMPTS["atom"])]))
    assert np.abs(pl[0] - ref_logits(NAME, "atom")[-1]).max() <= 1e-4


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("wkv", ["plain", "plugin"])
def test_engine_batch_3_matches_onnxruntime(rwkv4_engines, rwkv4_exports, wkv, graphs, monkeypatch):
    monkeypatch.setenv(rtrt.GRAPHS_ENV, "1" if graphs else "0")
    s = rwkv_runtime.Session(_engine(rwkv4_engines, wkv))
    ref = rwkv_runtime.Session(rwkv4_exports[wkv])
    prompts = [PROMPTS["atom"][:12], b"hello, world", PROMPTS["atom"][12:24]]
    se, sr = s.new_state(3), ref.new_state(3)
    for j in range(12):
        toks = np.array([p[j] for p in prompts])
        le, se = s.step(toks, se)
        lr, sr = ref.step(toks, sr)
        np.testing.assert_allclose(le, lr, atol=1e-4, err_msg=f"step {j}")
    held = se.numpy()
    _, a = s.step(np.array([1, 2, 3]), se)
    _, b = s.step(np.array([1, 2, 3]), se)  # the held state is not overwritten by double buffering
    for k, v in held.items():
        np.testing.assert_array_equal(se[k], v)
        np.testing.assert_array_equal(a[k], b[k])
    pe, _ = s.prefill(np.array([list(p) for p in prompts]))
    pr, _ = ref.prefill(np.array([list(p) for p in prompts]))
    np.testing.assert_allclose(pe, pr, atol=1e-4)
