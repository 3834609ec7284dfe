"""`rwkv-export triton` writes repositories whose config.pbtxt parses against Triton's own schema
(tritonclient's model_config_pb2) and whose state blocks agree with the exported graph itself."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

pytest.importorskip("tritonclient.grpc", reason="tritonclient not installed (pip install 'rwkv-export[triton]')")
from google.protobuf import text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2  # noqa: E402

import rwkv_runtime  # noqa: E402
from rwkv_export.cli import main  # noqa: E402
from rwkv_export.targets.triton import write_repository  # noqa: E402


def parse(model_dir: Path):
    """The repository's config read by protobuf's text parser (unknown fields/enums/oneofs raise)."""
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def graph_io(path: Path) -> dict:
    """{name: (elem_type, dims)} of the ONNX graph's inputs and outputs, from the graph itself."""
    g = onnx.load(str(path), load_external_data=False).graph
    return {
        v.name: (v.type.tensor_type.elem_type, [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim])
        for v in list(g.input) + list(g.output)
    }


def check_implicit_state(model_dir: Path, graph: Path, expect_start: dict):
    """Every state input/output pair of the graph is one `state` entry with the graph's dims minus batch,
    and its initial_state holds `expect_start[name]` (a data file) or zeros."""
    cfg = parse(model_dir)
    io = graph_io(graph)
    states = {s.input_name: s for s in cfg.sequence_batching.state}
    graph_states = sorted(n for n in io if n.startswith("state."))
    assert sorted(states) == graph_states and graph_states
    for name, s in states.items():
        elem, dims = io[name]
        assert dims[0] == "batch" and list(s.dims) == dims[1:]
        assert s.output_name in io and io[s.output_name][1][1:] == dims[1:]
        assert s.data_type == model_config_pb2.TYPE_FP32 and elem == onnx.TensorProto.FLOAT
        (init,) = s.initial_state
        assert list(init.dims) == list(s.dims) and init.data_type == s.data_type
        if name in expect_start:
            assert init.WhichOneof("state_data") == "data_file"
            raw = np.fromfile(model_dir / "initial_state" / init.data_file, dtype=np.float32)
            assert raw.size == int(np.prod(s.dims))  # exactly the bytes Triton expects, no more
            np.testing.assert_array_equal(raw, expect_start[name].reshape(-1))
        else:
            assert init.WhichOneof("state_data") == "zero_data" and init.zero_data
    return cfg


def nonzero_start(step_graph: Path) -> dict:
    """What the runtime itself starts a sequence from, for the tensors that are not all zeros."""
    st = rwkv_runtime.Session(step_graph).new_state(1).numpy()
    return {k: v[0] for k, v in st.items() if np.any(v != 0)}


def test_rwkv4_onnxruntime(triton_exports, tmp_path):
    g = triton_exports["rwkv4"]
    d = write_repository(g, tmp_path, "onnxruntime", max_batch=4, name="tiny4")
    start = nonzero_start(g)
    n_layer = rwkv_runtime.read_manifest(g)[0].n_layer
    assert sorted(start) == [f"state.{i}.wkv_pp" for i in range(n_layer)]
    assert all((v == -1e30).all() for v in start.values())
    cfg = check_implicit_state(d, g, start)
    assert cfg.backend == "onnxruntime" and cfg.max_batch_size == 4
    (tok,) = cfg.input
    assert (tok.name, list(tok.dims), tok.data_type) == ("tokens", [1], model_config_pb2.TYPE_INT64)
    assert tok.HasField("reshape") and list(tok.reshape.shape) == []  # [1] per request -> the graph's [batch]
    (out,) = cfg.output
    assert (out.name, list(out.dims)) == ("logits", [256])
    sb = cfg.sequence_batching
    assert sb.WhichOneof("strategy_choice") == "oldest" and sb.max_sequence_idle_microseconds == 300_000_000
    assert not sb.control_input  # Triton resets the state from initial_state: the graph needs no controls
    # the manifest travels: as a parameter and as a sidecar, both the model's own
    man = json.loads(cfg.parameters["rwkv.manifest"].string_value)
    assert man == json.loads((d / "rwkv_manifest.json").read_text())
    assert man["state"] == json.loads(rwkv_runtime.Session(g).manifest.to_json())["state"]
    assert (d / "1" / "model.onnx").read_bytes() == g.read_bytes()


def test_rwkv7_head_states(triton_exports, tmp_path):
    g = triton_exports["rwkv7"]
    d = write_repository(g, tmp_path, "onnxruntime", max_batch=2)
    cfg = check_implicit_state(d, g, {})
    wkv = [s for s in cfg.sequence_batching.state if s.input_name.endswith(".wkv")]
    man = rwkv_runtime.read_manifest(g)[0]
    # [H, N, N] with H * N = n_embd
    assert len(wkv) == man.n_layer and all(
        len(s.dims) == 3 and s.dims[1] == s.dims[2] and s.dims[0] * s.dims[1] == man.n_embd for s in wkv
    )
    assert not (d / "initial_state").exists()


def test_state_tuned_start_becomes_data_files(triton_exports, tmp_path):
    g = triton_exports["tuned6"]
    d = write_repository(g, tmp_path, "onnxruntime", max_batch=2, name="tuned")
    start = nonzero_start(g)  # the learned wkv states (the runtime's own reading of the export)
    assert sorted(start) == sorted(f"state.{i}.wkv" for i in range(rwkv_runtime.read_manifest(g)[0].n_layer))
    check_implicit_state(d, g, start)


def test_python_backend(triton_exports, tmp_path):
    g = triton_exports["rwkv4"]
    d = write_repository(g, tmp_path, "python", max_batch=4, name="py4")
    cfg = parse(d)
    assert cfg.backend == "python" and not cfg.sequence_batching.state  # model.py keeps the state
    controls = {c.name: c.control[0].kind for c in cfg.sequence_batching.control_input}
    K = model_config_pb2.ModelSequenceBatching.Control
    assert controls == {
        "START": K.CONTROL_SEQUENCE_START,
        "END": K.CONTROL_SEQUENCE_END,
        "CORRID": K.CONTROL_SEQUENCE_CORRID,
    }
    (tok,) = cfg.input
    assert list(tok.dims) == [-1] and tok.allow_ragged_batch
    files = sorted(p.name for p in (d / "1").iterdir())
    # companions and the weights file both graphs share keep their names
    assert files == ["model.py", "tiny4.onnx", "tiny4.onnx.data", "tiny4.seq.onnx"]
    assert cfg.parameters["rwkv.model_file"].string_value == "tiny4.onnx"


def test_tensorrt_engine_with_plugin(triton_exports, tmp_path):
    """A stand-in engine (no TensorRT here): bytes + the sidecar build-engine writes; schema-validated only."""
    g = triton_exports["rwkv4"]
    eng = tmp_path / "tiny4.engine"
    eng.write_bytes(b"not a real plan")
    plugin = tmp_path / "librwkv_trt_plugins.so"
    plugin.write_bytes(b"\x7fELF")
    man = rwkv_runtime.Session(g).manifest
    (tmp_path / "tiny4.engine.json").write_text(
        json.dumps(
            {
                "format": "rwkv-trt-engine",
                "format_version": 1,
                "manifest": json.loads(man.to_json()),
                "plugins": [{"name": plugin.name, "path": str(plugin)}],
            }
        )
    )
    d = write_repository(eng, tmp_path / "repo", "tensorrt", max_batch=8)
    cfg = check_implicit_state(d, g, nonzero_start(g))
    assert cfg.platform == "tensorrt_plan" and (d / "1" / "model.plan").read_bytes() == eng.read_bytes()
    assert (d / "plugins" / plugin.name).is_file()
    assert cfg.parameters["rwkv.plugins"].string_value == f"plugins/{plugin.name}"
    assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU


def stand_in_engine(graph: Path, where: Path) -> Path:
    """An engine file (not a real plan: no TensorRT here) with the sidecar build-engine writes."""
    eng = where / (graph.stem + ".engine")
    eng.write_bytes(b"not a real plan")
    man = rwkv_runtime.Session(graph).manifest
    side = {"format": "rwkv-trt-engine", "format_version": 1, "manifest": json.loads(man.to_json())}
    props = {p.key: p.value for p in onnx.load(str(graph), load_external_data=False).metadata_props}
    if "rwkv.initial_state" in props:
        side["initial_state"] = props["rwkv.initial_state"]
    if "rwkv.tokenizer_json" in props:
        side["tokenizer_json"] = props["rwkv.tokenizer_json"]
    (where / (eng.name + ".json")).write_text(json.dumps(side))
    return eng


@pytest.mark.parametrize("key", ["rwkv4", "rwkv7", "tuned6"])
@pytest.mark.parametrize("backend", ["onnxruntime", "tensorrt", "python"])
def test_every_config_parses(triton_exports, tmp_path, key, backend):
    g = triton_exports[key]
    model = stand_in_engine(g, tmp_path) if backend == "tensorrt" else g
    d = write_repository(model, tmp_path / "repo", backend, max_batch=4)
    cfg = parse(d)
    if backend == "python":
        assert cfg.backend == "python" and (d / "1" / "model.py").is_file()
    else:
        check_implicit_state(d, g, nonzero_start(g))  # learned start states come through engines too


def test_the_schema_check_can_fail(triton_exports, tmp_path):
    d = write_repository(triton_exports["rwkv4"], tmp_path, "onnxruntime")
    text = (d / "config.pbtxt").read_text()
    for broken in (
        text.replace("zero_data: true", 'zero_data: true\n      data_file: "x"', 1),  # oneof
        text.replace("KIND_CPU", "KIND_TPU"),
        text.replace("max_batch_size", "max_batch"),
    ):
        with pytest.raises(text_format.ParseError):
            text_format.Parse(broken, model_config_pb2.ModelConfig())


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli(triton_exports, tmp_path):
    g = triton_exports["rwkv7"]
    r = run_cli("triton", g, "-o", tmp_path, "--max-batch", 3, "--name", "m7", "--idle-timeout", 30)
    assert r.exit_code == 0, r.output
    cfg = parse(tmp_path / "m7")
    assert cfg.max_batch_size == 3 and cfg.sequence_batching.max_sequence_idle_microseconds == 30_000_000
    assert cfg.sequence_batching.oldest.max_candidate_sequences == 12


@pytest.mark.parametrize(
    "args, expect",
    [
        (("--name", "m7"), "already exists (pass --force"),
        (("--backend", "tensorrt"), "needs an engine from 'rwkv-export build-engine'"),
        (("--max-batch", 4, "--max-sequences", 2), "must be at least --max-batch"),
        (("--name", ".hidden"), "not a usable model name"),
    ],
)
def test_cli_errors_are_one_line_and_leave_nothing(triton_exports, tmp_path, args, expect):
    assert run_cli("triton", triton_exports["rwkv7"], "-o", tmp_path, "--name", "m7").exit_code == 0
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    r = run_cli("triton", triton_exports["rwkv7"], "-o", tmp_path, *args)
    assert r.exit_code == 1 and expect in r.output
    assert r.output.startswith("Error: ") and r.output.count("\n") == 1 and "Traceback" not in r.output
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_cli_repository_is_a_file(triton_exports, tmp_path):
    (tmp_path / "repo").write_text("x")
    r = run_cli("triton", triton_exports["rwkv7"], "-o", tmp_path / "repo")
    assert (
        r.exit_code == 1
        and r.output == f"Error: {tmp_path / 'repo'}: exists and is not a folder (the model repository is a folder)\n"
    )


def test_cli_missing_model(tmp_path):
    r = run_cli("triton", tmp_path / "none.onnx", "-o", tmp_path / "repo")
    assert r.exit_code == 1 and r.output == f"Error: {tmp_path / 'none.onnx'}: no such file\n"
    assert not (tmp_path / "repo").exists()


def test_external_data_fp16_and_sequence_graph_input(rwkv4_ref, tmp_path):
    """A graph with external weights travels with its data file (onnxruntime loads it from the repository);
    the logits dtype is the graph's; given the sequence graph, the step companion is served."""
    import onnxruntime as ort

    from rwkv_export.export import ExportOptions, export

    step, seq = export(rwkv4_ref, tmp_path / "ext.onnx", ExportOptions(precision="fp16", external_data=True))
    assert (tmp_path / "ext.onnx.data").is_file()
    d = write_repository(seq, tmp_path / "repo", "onnxruntime", name="ext")
    assert sorted(p.name for p in (d / "1").iterdir()) == ["ext.onnx.data", "model.onnx"]
    assert graph_io(d / "1" / "model.onnx")["tokens"][1] == ["batch"]  # the step graph, not [batch, T]
    sess = ort.InferenceSession(str(d / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    out = {o.name: o.type for o in sess.get_outputs()}
    want = {"tensor(float)": model_config_pb2.TYPE_FP32, "tensor(float16)": model_config_pb2.TYPE_FP16}
    assert parse(d).output[0].data_type == want[out["logits"]]
    check_implicit_state(d, step, nonzero_start(step))
    p = write_repository(step, tmp_path / "repo", "python", name="extpy")
    assert sorted(x.name for x in (p / "1").iterdir()) == ["ext.onnx", "ext.onnx.data", "ext.seq.onnx", "model.py"]


# ---------------------------------------------------------------------------------------------
# Confinement: no file outside the model's folder is read, nothing is written outside the repository,
# and --force replaces only a model folder this command wrote (regressions of issue #24)
# ---------------------------------------------------------------------------------------------
def relocate(graph: Path, location: str) -> None:
    """Point every external-data reference of ``graph`` at ``location`` (what a crafted file would say)."""
    m = onnx.load(str(graph), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save(m, str(graph))


def tree(root: Path) -> list:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def ext_export(rwkv4_ref, tmp_path):
    """A step-only export with external weights in root/a/b/c/models/ (a deep folder, so '..' can climb)."""
    from rwkv_export.export import ExportOptions, export

    models = tmp_path / "a" / "b" / "c" / "models"
    models.mkdir(parents=True)
    (step,) = export(rwkv4_ref, models / "ext.onnx", ExportOptions(graphs=("step",), external_data=True))
    return step


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_external_data_outside_the_model_folder_is_refused(ext_export, tmp_path, how):
    """Was: the file a location names was copied into the repository from anywhere (a '..' or absolute
    location, or a link beside the model), and a '..' location was also written outside the repository."""
    data = ext_export.with_name("ext.onnx.data")
    secret = tmp_path / "secret.bin"  # a file outside the model's folder, shaped like the weights
    secret.write_bytes(data.read_bytes())
    if how == "dotdot":  # models/../../../../secret.bin; from REPO/.tmp/1/ the same climb lands in root/r1/
        relocate(ext_export, "../../../../secret.bin")
    elif how == "absolute":
        relocate(ext_export, str(secret))
    else:
        data.unlink()
        data.symlink_to(secret)
    repo = tmp_path / "r1" / "r2" / "repo"
    repo.mkdir(parents=True)
    r = run_cli("triton", ext_export, "-o", repo, "--name", "m")
    assert r.exit_code == 1 and r.output.startswith("Error: ext.onnx: external data file ")
    assert "outside the model's folder" in r.output and r.output.count("\n") == 1
    assert tree(tmp_path / "r1") == ["r2", "r2/repo"]  # nothing read into it, nothing written beside it


def test_external_data_in_a_subfolder_travels(ext_export, tmp_path):
    """A location inside the folder (a subfolder) is fine: copied under the same relative path."""
    data = ext_export.with_name("ext.onnx.data")
    (data.parent / "w").mkdir()
    data.rename(data.parent / "w" / "weights.bin")
    relocate(ext_export, "w/weights.bin")
    d = write_repository(ext_export, tmp_path / "repo", "onnxruntime", name="m")
    assert (d / "1" / "w" / "weights.bin").read_bytes() == (data.parent / "w" / "weights.bin").read_bytes()
    import onnxruntime as ort

    ort.InferenceSession(str(d / "1" / "model.onnx"), providers=["CPUExecutionProvider"])  # it loads from there


def test_force_never_deletes_the_folder_holding_the_model(triton_exports, tmp_path):
    """Was: `triton tiny/tiny.onnx -o . --force` (name = the file's stem) deleted tiny/ with the model and
    everything else kept there."""
    import shutil

    folder = tmp_path / "tiny"
    folder.mkdir()
    model = folder / "tiny.onnx"
    shutil.copyfile(triton_exports["rwkv7"], model)
    (folder / "notes.txt").write_text("mine")
    before = {p: p.read_bytes() for p in folder.iterdir()}
    r = run_cli("triton", model, "-o", tmp_path, "--force")
    assert r.exit_code == 1 and r.output.count("\n") == 1
    assert r.output.startswith(f"Error: {folder}: holds tiny.onnx, an input of this command; --force never deletes")
    assert {p: p.read_bytes() for p in folder.iterdir()} == before
    assert tree(tmp_path) == ["tiny", "tiny/notes.txt", "tiny/tiny.onnx"]


def test_force_replaces_only_folders_this_command_wrote(triton_exports, tmp_path):
    g = triton_exports["rwkv7"]
    theirs = tmp_path / "m7"
    theirs.mkdir()
    (theirs / "keep.txt").write_text("not a model")
    r = run_cli("triton", g, "-o", tmp_path, "--name", "m7", "--force")
    assert r.exit_code == 1 and "was not written by rwkv-export triton" in r.output and r.output.count("\n") == 1
    assert tree(theirs) == ["keep.txt"]
    # a folder it wrote (the marker) is replaced, and the new one is complete
    (theirs / "keep.txt").unlink()
    theirs.rmdir()
    assert run_cli("triton", g, "-o", tmp_path, "--name", "m7", "--max-batch", 2).exit_code == 0
    marker = json.loads((theirs / ".rwkv-export-triton").read_text())
    assert marker["written_by"] == "rwkv-export triton" and marker["model"] == g.name
    r = run_cli("triton", g, "-o", tmp_path, "--name", "m7", "--max-batch", 3, "--force")
    assert r.exit_code == 0, r.output
    assert parse(theirs).max_batch_size == 3 and (theirs / "1" / "model.onnx").read_bytes() == g.read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("force", [False, True])
def test_a_symlinked_model_folder_is_one_clear_line(triton_exports, tmp_path, force):
    """Was: `--force` onto a link printed only `Error: ... OSError`."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("x")
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "m7").symlink_to(elsewhere)
    r = run_cli("triton", triton_exports["rwkv7"], "-o", repo, "--name", "m7", *(["--force"] if force else []))
    assert r.exit_code == 1 and r.output == (
        f"Error: {repo / 'm7'}: is a symbolic link; rwkv-export triton neither "
        "writes through nor replaces a link: remove it or choose another --name\n"
    )
    assert (repo / "m7").is_symlink() and tree(elsewhere) == ["keep.txt"]


def test_engine_plugin_recorded_outside_its_folder_is_not_copied(triton_exports, tmp_path):
    """A sidecar's recorded plugin path is read only inside the engine's folder: a library elsewhere is not
    copied into the repository (and the error says how to pass it)."""
    g = triton_exports["rwkv4"]
    where = tmp_path / "engine"
    where.mkdir()
    eng = stand_in_engine(g, where)
    outside = tmp_path / "librwkv_trt_plugins.so"
    outside.write_bytes(b"\x7fELF outside")
    side = json.loads(eng.with_name(eng.name + ".json").read_text())
    side["plugins"] = [{"name": outside.name, "path": str(outside)}]
    eng.with_name(eng.name + ".json").write_text(json.dumps(side))
    r = run_cli("triton", eng, "-o", tmp_path / "repo", "--backend", "tensorrt")
    assert r.exit_code == 1 and "needs the plugin library librwkv_trt_plugins.so" in r.output
    assert not (tmp_path / "repo").exists()
    # the same name as a link beside the engine, pointing out: refused as a path outside the folder
    (where / outside.name).symlink_to(outside)
    r = run_cli("triton", eng, "-o", tmp_path / "repo", "--backend", "tensorrt")
    assert r.exit_code == 1 and "plugin library 'librwkv_trt_plugins.so' is outside the model's folder" in r.output
    # beside the engine, a real file: shipped
    (where / outside.name).unlink()
    (where / outside.name).write_bytes(b"\x7fELF beside")
    d = write_repository(eng, tmp_path / "repo", "tensorrt")
    assert (d / "plugins" / outside.name).read_bytes() == b"\x7fELF beside"
