"""The artifact reader: metadata read from the protobuf bytes, the manifest schema, companions bound to
their export, the manifest checked against the graph, engine sidecars. Every damaged or foreign input
is a RuntimeUserError with one line, never another exception."""

from __future__ import annotations

import copy
import json
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rwkv_runtime import RuntimeUserError, Session
from rwkv_runtime.artifact import (
    ENGINE_SUFFIXES,
    open_artifact,
    parse_manifest,
    read_engine_manifest,
    read_onnx_metadata,
)

from .conftest import copy_export, manifest_dict, set_metadata, write_manifest


def test_metadata_matches_onnx_and_needs_neither_onnx_nor_onnxruntime(rwkv4_exports, monkeypatch):
    """The hand-rolled protobuf reader returns exactly what onnx reads, with onnx/onnxruntime blocked."""
    import onnx

    for p in (rwkv4_exports["plain"], rwkv4_exports["plain"].with_name("tiny4-plain.seq.onnx")):
        want = {e.key: e.value for e in onnx.load(str(p), load_external_data=False).metadata_props}
        monkeypatch.setitem(sys.modules, "onnx", None)
        monkeypatch.setitem(sys.modules, "onnxruntime", None)
        assert read_onnx_metadata(p) == want
        art = open_artifact(p)
        monkeypatch.undo()
        assert art.manifest.vocab_size == json.loads(want["rwkv.manifest"])["vocab_size"]


def test_metadata_reader_skips_the_graph_by_length(rwkv4_exports, monkeypatch):
    """The graph (field 7) is seeked over, never read: total bytes read stay far below the file size."""
    import builtins

    path = rwkv4_exports["plain"]
    read_total = []
    real_open = builtins.open

    def counting_open(*a, **k):
        f = real_open(*a, **k)
        if str(a[0]) == str(path):
            orig = f.read
            f.read = lambda n=-1: (lambda b: (read_total.append(len(b)), b)[1])(orig(n))
        return f

    monkeypatch.setattr(builtins, "open", counting_open)
    read_onnx_metadata(path)
    monkeypatch.undo()
    assert 0 < sum(read_total) < path.stat().st_size / 4


@pytest.mark.parametrize("cut", [1, 7, 100, -10])
def test_truncated_or_garbage_files_are_clear_errors(tiny, cut):
    data = tiny.read_bytes()
    tiny.write_bytes(data[:cut] if cut > 0 else data[:cut] + b"\xff\xff\xff\xff\x0f")
    with pytest.raises(RuntimeUserError):
        Session(tiny)


def test_garbage_and_directories(tmp_path):
    (tmp_path / "g.onnx").write_bytes(bytes(range(256)) * 8)
    with pytest.raises(RuntimeUserError):
        Session(tmp_path / "g.onnx")
    (tmp_path / "d.onnx").mkdir()
    with pytest.raises(RuntimeUserError, match="directory"):
        Session(tmp_path / "d.onnx")


def test_engine_suffixes_defined_once():
    import rwkv_runtime.session as session

    assert ENGINE_SUFFIXES == (".engine", ".plan", ".trt")
    assert "ENGINE_SUFFIXES" not in vars(session) or session.ENGINE_SUFFIXES is ENGINE_SUFFIXES


# -- companions -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../x.onnx", "/etc/passwd", "sub/x.onnx", "..", "", "a\\b.onnx", 5, None])
def test_companion_must_be_a_plain_file_name(tiny, name):
    d = manifest_dict(tiny)
    d["companions"]["sequence"] = name
    write_manifest(tiny, d)
    with pytest.raises(RuntimeUserError, match="companion|damaged"):
        Session(tiny)


def _set_export_id(path, value):
    d = manifest_dict(path)
    d["export_id"] = value
    write_manifest(path, d)


def test_companion_from_another_export_is_refused(tiny):
    seq = tiny.with_name("tiny4-plain.seq.onnx")
    _set_export_id(tiny, "export-a")
    _set_export_id(seq, "export-b")
    with pytest.raises(RuntimeUserError, match="another export"):
        Session(tiny).prefill([[1, 2, 3]])


def test_companion_with_the_same_export_id_is_used(tiny, tiny_session):
    seq = tiny.with_name("tiny4-plain.seq.onnx")
    _set_export_id(tiny, "export-a")
    _set_export_id(seq, "export-a")
    got, _ = Session(tiny).prefill([[1, 2, 3]])
    want, _ = tiny_session.prefill([[1, 2, 3]])
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_companion_without_id_next_to_one_with_id_is_refused(tiny):
    _set_export_id(tiny, "export-a")  # the sequence graph keeps an empty (old) id
    with pytest.raises(RuntimeUserError, match="another export"):
        Session(tiny).prefill([[1, 2]])


def test_companion_of_the_wrong_kind_is_refused(tiny):
    d = manifest_dict(tiny)
    d["companions"]["sequence"] = tiny.name  # the step graph posing as the sequence graph
    write_manifest(tiny, d)
    with pytest.raises(RuntimeUserError, match="is a step graph"):
        Session(tiny, decode_graph="step")  # companions are checked when the session opens


# -- the manifest against the graph ---------------------------------------------------------------
@pytest.mark.parametrize(
    "field,value,match",
    [
        ("vocab_size", 300, "vocab"),
        ("tokens_input", "ids", "no input"),
        ("logits_output", "out", "no output"),
    ],
)
def test_manifest_checked_against_the_graph(tiny, field, value, match):
    for p in (tiny, tiny.with_name("tiny4-plain.seq.onnx")):
        d = manifest_dict(p)
        d[field] = value
        write_manifest(p, d)
    with pytest.raises(RuntimeUserError, match=match):
        Session(tiny)


def test_state_spec_checked_against_the_graph(tiny):
    for p in (tiny, tiny.with_name("tiny4-plain.seq.onnx")):
        d = manifest_dict(p)
        d["state"][0]["name"] = "state.0.renamed"
        write_manifest(p, d)
    with pytest.raises(RuntimeUserError, match="does not match"):
        Session(tiny)


def test_missing_embedded_initial_state_is_a_clear_error(tiny):
    for p in (tiny, tiny.with_name("tiny4-plain.seq.onnx")):
        d = manifest_dict(p)
        d["initial_state"] = "embedded"
        write_manifest(p, d)
    with pytest.raises(RuntimeUserError, match="initial state"):
        Session(tiny)
    set_metadata(tiny, "rwkv.initial_state", "not base64 !!")
    with pytest.raises(RuntimeUserError, match="initial state"):
        Session(tiny)


# -- generated damage -----------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


def _mutate(d: dict, data) -> dict:
    d = copy.deepcopy(d)
    kind = data.draw(st.sampled_from(["drop", "retype", "state", "state_field", "companion", "raw"]))
    if kind == "drop":
        d.pop(data.draw(st.sampled_from(sorted(d))), None)
    elif kind == "retype":
        d[data.draw(st.sampled_from(sorted(d)))] = data.draw(json_values)
    elif kind == "state":
        d["state"] = data.draw(
            st.sampled_from([[], d["state"][:1], d["state"] + d["state"][:1], [None], "state", {"a": 1}])
        )
    elif kind == "state_field":
        i = data.draw(st.integers(0, len(d["state"]) - 1))
        field = data.draw(st.sampled_from(["name", "output", "shape", "dtype", "init", "layer", "doc"]))
        d["state"][i][field] = data.draw(
            json_values | st.sampled_from([["batch", -1], ["batch", 0], [4, "batch"], ["batch"], "float64", 1e400])
        )
    elif kind == "companion":
        d["companions"] = data.draw(
            st.dictionaries(
                st.sampled_from(["step", "sequence", "other"]),
                json_values | st.sampled_from(["../x", "a/b", "x.onnx"]),
                max_size=2,
            )
        )
    else:
        return data.draw(st.sampled_from(["", "{", "[]", "null", "1", '"x"', "{" * 5000, json.dumps(d)[:-3]]))
    return d


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_manifests_never_raise_anything_else(tiny, data):
    """Generated damage to the manifest: a clean RuntimeUserError, or a model that runs correctly."""
    original = manifest_dict(tiny)
    damaged = _mutate(original, data)
    write_manifest(tiny, damaged)
    try:
        s = Session(tiny)
        logits, st_ = s.step([1])
        assert logits.shape == (1, s.vocab_size) and np.isfinite(logits).all()
        s.prefill([[1, 2]], st_)
    except RuntimeUserError as e:
        assert "\n" not in str(e) and str(e)
    finally:
        write_manifest(tiny, original)


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=50) | json_values.map(json.dumps))
def test_parse_manifest_never_raises_anything_else(text):
    try:
        parse_manifest(text)
    except RuntimeUserError:
        pass


# -- engine sidecars (read without TensorRT) ------------------------------------------------------
def test_engine_sidecar_damage(tmp_path, rwkv4_exports):
    eng = tmp_path / "m.engine"
    eng.write_bytes(b"not an engine")
    with pytest.raises(RuntimeUserError, match="m.engine.json"):
        read_engine_manifest(eng)
    man = manifest_dict(rwkv4_exports["plain"])
    side = tmp_path / "m.engine.json"
    good = {"format": "rwkv-trt-engine", "format_version": 1, "manifest": man}
    side.write_text(json.dumps(good))
    assert read_engine_manifest(eng)[0].vocab_size == man["vocab_size"]
    for bad in (
        "{",
        "[]",
        json.dumps({**good, "format_version": 9}),
        json.dumps({**good, "manifest": 3}),
        json.dumps({**good, "manifest": {**man, "n_layer": "x"}}),
        json.dumps({**good, "tokenizer_json": 5}),
    ):
        side.write_text(bad)
        with pytest.raises(RuntimeUserError):
            read_engine_manifest(eng)


def test_copy_export_helper_keeps_companions(rwkv4_exports, tmp_path):
    p = copy_export(rwkv4_exports["plain"], tmp_path / "c")
    assert p.with_name("tiny4-plain.seq.onnx").is_file()


# ---------------------------------------------------------------------------------------------
# Paths read from a file stay in the model's folder (issue #24): external-data locations, companions,
# the weights file, engine sidecars and their plugin libraries
# ---------------------------------------------------------------------------------------------
def _external_model(tmp_path):
    """A hand-built ONNX model naming external data in every place a TensorProto can sit: an initializer,
    a sparse initializer, a Constant node's attribute, an initializer of a subgraph (If branch) and a
    Constant inside a model-local function. Returns (path, the locations it names)."""
    import onnx
    from onnx import TensorProto, helper

    def ext(name, loc):
        t = helper.make_tensor(name, TensorProto.FLOAT, [1], [0.0])
        t.ClearField("float_data")
        t.data_location = TensorProto.EXTERNAL
        t.external_data.add(key="location", value=loc)
        t.external_data.add(key="offset", value="0")
        return t

    branch = helper.make_graph(
        [helper.make_node("Identity", ["bi"], ["bo"])],
        "branch",
        [],
        [helper.make_tensor_value_info("bo", TensorProto.FLOAT, [1])],
        [ext("bi", "sub.bin")],
    )
    sparse = helper.make_sparse_tensor(
        ext("sv", "sparse.bin"), helper.make_tensor("si", TensorProto.INT64, [1], [0]), [4]
    )
    fn = helper.make_function(
        "local",
        "F",
        ["x"],
        ["y"],
        [
            helper.make_node("Constant", [], ["c"], value=ext("fc", "func.bin")),
            helper.make_node("Add", ["x", "c"], ["y"]),
        ],
        [helper.make_opsetid("", 18)],
    )
    nodes = [
        helper.make_node("Constant", [], ["k"], value=ext("kc", "const.bin")),
        helper.make_node("If", ["cond"], ["z"], then_branch=branch, else_branch=branch),
        helper.make_node("F", ["w"], ["out"], domain="local"),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1])],
        [ext("w", "init.bin")],
        sparse_initializer=[sparse],
    )
    m = helper.make_model(
        g, functions=[fn], opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("local", 1)]
    )
    path = tmp_path / "x.onnx"
    onnx.save(m, str(path))
    return path, {"init.bin", "sparse.bin", "const.bin", "sub.bin", "func.bin"}


def test_every_external_data_location_is_found_without_onnx(tmp_path, monkeypatch):
    from rwkv_runtime.onnx_metadata import external_data_locations

    path, want = _external_model(tmp_path)
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert set(external_data_locations(path)) == want


@pytest.fixture(scope="module")
def ext_export(rwkv4_ref, tmp_path_factory):
    """The golden RWKV-4 exported with its weights in a separate file (step + sequence graphs)."""
    from rwkv_export.export import ExportOptions, export

    return export(rwkv4_ref, tmp_path_factory.mktemp("ext") / "e.onnx", ExportOptions(external_data=True))[0]


def _relocate(graph, location):
    import onnx

    m = onnx.load(str(graph), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save(m, str(graph))


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink", "backslash", "drive", "folder-itself"])
def test_external_data_outside_the_folder_is_refused_before_onnxruntime_loads(ext_export, tmp_path, monkeypatch, how):
    import onnxruntime

    m = copy_export(ext_export, tmp_path / "m")
    secret = tmp_path / "secret.bin"
    secret.write_bytes(m.with_name("e.onnx.data").read_bytes())
    if how == "symlink":
        m.with_name("e.onnx.data").unlink()
        m.with_name("e.onnx.data").symlink_to(secret)
    else:
        loc = {
            "dotdot": "../secret.bin",
            "absolute": str(secret),
            "backslash": "..\\secret.bin",
            "drive": "C:secret.bin",
            "folder-itself": ".",
        }[how]
        for g in (m, m.with_name("e.seq.onnx")):
            _relocate(g, loc)
    loaded = []
    monkeypatch.setattr(onnxruntime, "InferenceSession", lambda *a, **k: loaded.append(a))
    with pytest.raises(RuntimeUserError, match=r"^e\.onnx: external data file .* is outside the model's folder") as e:
        Session(m).step(np.array([1]), None)
    assert "\n" not in str(e.value) and not loaded


def test_external_data_in_a_subfolder_or_behind_links_of_a_cache_is_accepted(ext_export, tmp_path):
    """Links that stay inside the folder are fine, and so is a Hugging Face-style cache: the model and its
    data are links into one blobs/ folder (the model's real folder)."""
    want = Session(ext_export).step(np.array([5]), None)[0]
    m = copy_export(ext_export, tmp_path / "sub")
    (m.parent / "w").mkdir()
    m.with_name("e.onnx.data").rename(m.parent / "w" / "weights")
    for g in (m, m.with_name("e.seq.onnx")):
        _relocate(g, "w/weights")
        d = manifest_dict(g)
        d["options"]["weights_file"] = "w/weights"
        write_manifest(g, d)
    np.testing.assert_array_equal(Session(m).step(np.array([5]), None)[0], want)
    blobs, snap = tmp_path / "cache" / "blobs", tmp_path / "cache" / "snapshots" / "rev"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in ext_export.parent.iterdir():
        (blobs / ("blob-" + f.name)).write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(blobs / ("blob-" + f.name))
    np.testing.assert_array_equal(Session(snap / ext_export.name).step(np.array([5]), None)[0], want)


def test_a_companion_linked_out_of_the_folder_is_refused(tiny, tmp_path):
    seq = tiny.with_name(manifest_dict(tiny)["companions"]["sequence"])
    outside = tmp_path / "elsewhere.onnx"
    seq.rename(outside)
    seq.symlink_to(outside)
    with pytest.raises(
        RuntimeUserError, match="companion sequence graph .* is outside the model's folder .*resolves to"
    ):
        open_artifact(tiny)


def test_a_weights_file_named_outside_the_folder_is_refused(tiny):
    d = manifest_dict(tiny)
    d.setdefault("options", {})["weights_file"] = "../w.data"
    write_manifest(tiny, d)
    with pytest.raises(RuntimeUserError, match="weights file '../w.data' is outside the model's folder"):
        open_artifact(tiny)


def _engine(tiny, where, plugins=None):
    where.mkdir(exist_ok=True)
    eng = where / "m.engine"
    eng.write_bytes(b"plan")
    side = {"format": "rwkv-trt-engine", "format_version": 1, "manifest": manifest_dict(tiny)}
    side["manifest"]["companions"] = {}
    if plugins is not None:
        side["plugins"] = plugins
    (where / "m.engine.json").write_text(json.dumps(side))
    return eng


@pytest.mark.parametrize(
    "name, message",
    [
        ("../lib.so", "not a plain file name"),
        ("/abs/lib.so", "not a plain file name"),
        ("link.so", "plugin library 'link.so' is outside the model's folder"),
    ],
)
def test_sidecar_plugin_names_stay_beside_the_engine(tiny, tmp_path, name, message):
    (tmp_path / "lib.so").write_bytes(b"")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "link.so").symlink_to(tmp_path / "lib.so")
    eng = _engine(tiny, tmp_path / "e", [{"name": name, "path": str(tmp_path / "lib.so")}])
    with pytest.raises(RuntimeUserError, match=message):
        open_artifact(eng)
    eng = _engine(tiny, tmp_path / "e", [{"name": "lib.so", "path": str(tmp_path / "lib.so")}])
    assert open_artifact(eng).props["plugins"][0]["name"] == "lib.so"  # a plain name is fine


def test_a_sidecar_linked_out_of_the_folder_is_refused(tiny, tmp_path):
    eng = _engine(tiny, tmp_path / "out")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "m.engine").write_bytes(b"plan")
    (tmp_path / "e" / "m.engine.json").symlink_to(tmp_path / "out" / "m.engine.json")
    assert open_artifact(eng).engine
    with pytest.raises(
        RuntimeUserError, match="m.engine.json: the engine sidecar resolves to .*, a link out of the folder"
    ):
        open_artifact(tmp_path / "e" / "m.engine")


def test_recorded_plugin_path_is_followed_only_inside_the_engine_folder(tmp_path, monkeypatch):
    from rwkv_runtime.tensorrt import loader

    monkeypatch.delenv(loader.PLUGIN_ENV, raising=False)
    eng = tmp_path / "e" / "m.engine"
    (tmp_path / "e" / "plugins").mkdir(parents=True)
    inside = tmp_path / "e" / "plugins" / "lib.so"
    inside.write_bytes(b"")
    assert loader.plugin_candidates(eng, {"plugins": [{"name": "lib.so", "path": str(inside)}]}) == [inside]
    outside = tmp_path / "lib.so"
    outside.write_bytes(b"")
    with pytest.raises(RuntimeUserError, match="outside the engine's folder: not loaded from there"):
        loader.plugin_candidates(eng, {"plugins": [{"name": "lib.so", "path": str(outside)}]})
