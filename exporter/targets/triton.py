"""An export -> a Triton Inference Server model repository (``rwkv-export triton``).

Three backends:

- ``onnxruntime`` / ``tensorrt``: the step graph (or an engine from ``build-engine``) served with the
  sequence batcher's *implicit state*: Triton keeps every manifest state tensor of a sequence between
  requests (``sequence_batching { state [...] }``), starting from ``initial_state`` (``zero_data``, or a
  raw ``data_file`` for other fills such as RWKV-4's ``pp = -1e30`` and for learned initial states). The
  graph needs no control inputs: Triton resets the state from ``initial_state`` at a sequence start.
- ``python``: ``model.py`` (rwkv_runtime/triton_python_model.py) runs ``rwkv_runtime`` inside Triton's Python
  backend, which has no implicit state: the model keeps each sequence's state itself, keyed by CORRID,
  and steps the requests of different sequences that Triton hands it as one batch.

The config is built as a ``ModelConfig`` protobuf message (tritonclient's ``model_config_pb2``), so an
unknown field or enum cannot be written. The manifest travels as the config parameter ``rwkv.manifest``
(clients read it with ``get_model_config``) and as ``rwkv_manifest.json`` beside ``config.pbtxt``.
A repository is written into a temporary folder and renamed into place: a failure leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

import rwkv_runtime as _rwkv_runtime
from rwkv_runtime.artifact import confined_path, open_artifact, outside_reason
from rwkv_runtime.manifest import BATCH
from rwkv_runtime.safe_write import SafeWrite

from ..errors import ExportError

BACKENDS = ("onnxruntime", "tensorrt", "python")
MANIFEST_PARAM = "rwkv.manifest"
TOKENIZER_PARAM = "rwkv.tokenizer_json"
MODEL_FILE_PARAM = "rwkv.model_file"  # python backend: the graph model.py opens (companions beside it)
SIDECAR = "rwkv_manifest.json"
# written into every model folder this command writes: --force replaces only folders that hold it
MARKER = ".rwkv-export-triton"
MAX_IDLE_S = 1e7  # ~4 months: more is a typo (Triton's field is microseconds in a uint64)
MIN_IDLE_S = 1e-3  # 0 microseconds would not mean "no wait": Triton reads 0 as unset (its 1 s default)
MAX_SEQUENCES = 2**31 - 1  # max_candidate_sequences is an int32 in Triton's schema
DEFAULT_MAX_BATCH = 8
DEFAULT_IDLE_S = 300.0  # a chat turn plus the user's reading and typing; Triton's own default is 1 s
_TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32"}
_ONNX_ELEM = {1: "float32", 10: "float16", 7: "int64", 6: "int32"}
# the Python-backend model ships with rwkv-runtime (it runs rwkv_runtime inside Triton; no torch there)
TEMPLATE = Path(_rwkv_runtime.__file__).with_name("triton_python_model.py")


def _pb():
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise ExportError("rwkv-export triton needs tritonclient: pip install 'rwkv-export[triton]'") from None
    return model_config_pb2, text_format


def _graph_dtypes(path: Path) -> dict:
    """{input/output name: numpy dtype name} of an ONNX graph (no weights read)."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    return {v.name: _ONNX_ELEM.get(v.type.tensor_type.elem_type, "?") for v in list(g.input) + list(g.output)}


def _data_files(art, folder: str) -> list:
    """[(source, path in the model folder)] of an ONNX graph's external-data files, under their own names
    (the graph refers to them by name). The locations come from ``Artifact.external_data``, each confined
    to the graph's folder when the artifact was opened: no file outside it is read, and (no '..', nothing
    absolute) nothing is written outside ``folder``."""
    out = []
    for loc, src in zip(art.external_data, art.data_files()):
        if not src.is_file():
            raise ExportError(f"{art.path.name}: its external data file {loc} is missing")
        out.append((src, f"{folder}/{loc}"))
    return out


def _initial_values(art) -> dict:
    """{state name: array [1, ...]} for every state tensor that does not start at zero."""
    learned = art.initial_state()
    out = {}
    for s in art.manifest.state:
        shape = s.concrete_shape(1)
        if s.name in learned:
            a = np.zeros(shape, np.dtype(s.dtype))
            a[...] = np.asarray(learned[s.name])[:1]
            out[s.name] = a
        elif s.init != 0.0:
            out[s.name] = np.full(shape, s.init, np.dtype(s.dtype))
    return out


def _state_file(name: str) -> str:
    return name.replace("/", "_")  # state names are dotted identifiers; keep them plain file names


def build_config(
    art,
    backend: str,
    name: str,
    max_batch: int,
    idle_s: float,
    max_sequences: int,
    logits_dtype: str = "float32",
    tokens_dtype: str = "int64",
):
    """The ``ModelConfig`` message for an artifact (no files written)."""
    pb, _ = _pb()
    man = art.manifest
    cfg = pb.ModelConfig(name=name, max_batch_size=max_batch)
    if backend == "tensorrt":
        cfg.platform = "tensorrt_plan"  # model.plan
    else:
        cfg.backend = backend
    sb = cfg.sequence_batching
    sb.max_sequence_idle_microseconds = int(idle_s * 1e6)
    sb.oldest.max_candidate_sequences = max_sequences
    sb.oldest.preferred_batch_size.append(max_batch)
    sb.oldest.max_queue_delay_microseconds = 2000  # wait up to 2 ms for other sequences' next tokens
    out = cfg.output.add(name=man.logits_output, data_type=_TRITON_DTYPES[logits_dtype])
    out.dims.append(man.vocab_size)
    tok = cfg.input.add(name=man.tokens_input, data_type=_TRITON_DTYPES[tokens_dtype])
    if backend == "python":
        # a whole prompt per request (any length), one token per decode step; model.py reads the control
        # inputs to find the sequence's state and to drop it at the end
        tok.dims.append(-1)
        tok.allow_ragged_batch = True  # requests of different lengths still reach one execute() call
        for ctl, kind, dtype in (
            ("START", "CONTROL_SEQUENCE_START", None),
            ("END", "CONTROL_SEQUENCE_END", None),
            ("CORRID", "CONTROL_SEQUENCE_CORRID", "TYPE_UINT64"),
        ):
            c = sb.control_input.add(name=ctl).control.add(kind=kind)
            if dtype:
                c.data_type = dtype
            else:
                c.int32_false_true.extend([0, 1])
        cfg.instance_group.add(kind="KIND_CPU", count=1)
        return cfg
    # the graph's tokens are [batch]: each request is [1] and Triton's batch axis is the graph's
    tok.dims.append(1)
    tok.reshape.SetInParent()  # reshape { shape: [] }
    fills = _initial_values(art)
    for s in man.state:
        if s.shape[0] != BATCH or BATCH in s.shape[1:]:
            raise ExportError(f"state tensor {s.name} has shape {s.shape}: Triton needs the batch axis first")
        st = sb.state.add(input_name=s.name, output_name=s.output, data_type=_TRITON_DTYPES[s.dtype])
        st.dims.extend(int(d) for d in s.shape[1:])
        init = st.initial_state.add()  # (a repeated field; one entry)
        init.data_type = st.data_type
        init.dims.extend(st.dims)
        init.name = s.name
        if s.name in fills:
            init.data_file = _state_file(s.name)
        else:
            init.zero_data = True
    # bfloat16 MatMuls run on GPUs only (onnxruntime's CPU provider has none): on KIND_CPU Triton's
    # onnxruntime backend could not load a bf16 export
    kind = "KIND_GPU" if backend == "tensorrt" or man.precision == "bf16" else "KIND_CPU"
    cfg.instance_group.add(kind=kind, count=1)
    return cfg


def _set_params(cfg, art, extra: dict) -> None:
    cfg.parameters[MANIFEST_PARAM].string_value = art.manifest.to_json()
    if art.tokenizer_json:
        cfg.parameters[TOKENIZER_PARAM].string_value = art.tokenizer_json
    for k, v in extra.items():
        cfg.parameters[k].string_value = str(v)


def config_text(cfg) -> str:
    _, tf = _pb()
    return tf.MessageToString(cfg)


def parse_config(text: str):
    """Parse a config.pbtxt against Triton's schema (unknown fields/enums/oneof clashes raise)."""
    pb, tf = _pb()
    return tf.Parse(text, pb.ModelConfig())


def write_repository(
    model,
    repo,
    backend: str = "onnxruntime",
    max_batch: int | None = None,
    name: str | None = None,
    idle_s: float = DEFAULT_IDLE_S,
    max_sequences: int | None = None,
    force: bool = False,
    plugins: tuple = (),
) -> Path:
    """Write ``repo/name/`` for ``model`` (an ONNX export or, for tensorrt, an engine); returns its folder.
    ``max_batch`` None: 8, or an engine's own maximum batch where that is smaller."""
    if backend not in BACKENDS:
        raise ExportError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if max_batch is not None and not 1 <= int(max_batch) <= 1024:
        raise ExportError(f"--max-batch must be in [1, 1024], not {max_batch}")
    if not MIN_IDLE_S <= idle_s <= MAX_IDLE_S:
        raise ExportError(f"the idle timeout must be in [{MIN_IDLE_S}, {MAX_IDLE_S:.0f}] seconds, not {idle_s}")
    if max_sequences is not None and not 1 <= int(max_sequences) <= MAX_SEQUENCES:
        raise ExportError(f"--max-sequences must be in [1, {MAX_SEQUENCES}], not {max_sequences}")
    model, repo = Path(model), Path(repo)
    if repo.exists() and not repo.is_dir():
        raise ExportError(f"{repo}: exists and is not a folder (the model repository is a folder)")
    art = open_artifact(model)
    if backend == "tensorrt" and not art.engine:
        raise ExportError(
            f"{model.name}: --backend tensorrt needs an engine from 'rwkv-export build-engine' "
            "(a .engine/.plan file with its .json sidecar)"
        )
    if backend != "tensorrt" and art.engine:
        raise ExportError(f"{model.name} is a TensorRT engine: use --backend tensorrt")
    if backend == "python" and art.manifest.precision == "bf16":
        raise ExportError(
            f"{model.name} is a bfloat16 export: the Python backend runs rwkv_runtime on onnxruntime's "
            "CPU provider, which has no bfloat16 MatMul; use --backend onnxruntime (a GPU instance) "
            "or tensorrt, or export fp32/fp16"
        )
    if backend != "python":  # implicit state steps one token per request: the step graph
        step = art.companion("step")
        art = step
    engine_max = _engine_max_batch(art) if art.engine else None
    if max_batch is None:
        max_batch = min(DEFAULT_MAX_BATCH, engine_max or DEFAULT_MAX_BATCH)
    elif engine_max is not None and int(max_batch) > engine_max:
        # Triton's TensorRT backend refuses it at load ("configuration specified max-batch N but TensorRT
        # engine only supports max-batch M")
        raise ExportError(
            f"--max-batch {max_batch} is larger than the engine's maximum batch {engine_max} "
            f"(rwkv-export build-engine --max-batch): pass --max-batch {engine_max} or less, or "
            "rebuild the engine"
        )
    name = name or model.name.split(".")[0]
    if not name or "/" in name or "\\" in name or name.startswith(".") or not name.isprintable():
        raise ExportError(f"--name {name!r}: not a usable model name")
    dest = repo / name
    if os.path.lexists(dest) and not force and not dest.is_symlink():
        raise ExportError(f"{dest} already exists (pass --force to replace it)")
    max_sequences = int(max_sequences or 4 * max_batch)
    if max_sequences < max_batch:
        raise ExportError(f"--max-sequences ({max_sequences}) must be at least --max-batch ({max_batch})")

    logits_dtype, tokens_dtype = "float32", "int64"  # engines: what build-engine keeps from the ONNX graph
    if not art.engine:
        io = _graph_dtypes(art.path)
        # Triton binds the config's names to the graph: a manifest naming tensors the graph lacks would only
        # fail when the server loads the model
        missing = [
            n
            for n in [art.manifest.tokens_input, art.manifest.logits_output]
            + [x for st in art.manifest.state for x in (st.name, st.output)]
            if n not in io
        ]
        if missing:
            raise ExportError(
                f"{art.path.name}: the graph does not match its manifest (no tensor {missing[0]!r}); "
                "re-export the model"
            )
        logits_dtype, tokens_dtype = io.get(art.manifest.logits_output, "?"), io.get(art.manifest.tokens_input, "?")
        if logits_dtype not in ("float32", "float16") or tokens_dtype not in ("int64", "int32"):
            raise ExportError(
                f"{art.path.name}: logits {logits_dtype} / tokens {tokens_dtype} are not types this "
                "command knows how to serve; re-export the model"
            )
    if backend == "python":  # model.py converts: clients send INT64, it answers FP32
        logits_dtype, tokens_dtype = "float32", "int64"
    cfg = build_config(art, backend, name, int(max_batch), float(idle_s), max_sequences, logits_dtype, tokens_dtype)
    extra = {}

    # every file copied, (source, path in the model folder), decided before anything is written
    files = []
    if backend == "onnxruntime":
        files += [(art.path, "1/model.onnx")] + _data_files(art, "1")
    elif backend == "tensorrt":
        files.append((art.path, "1/model.plan"))
        libs = _plugin_libraries(art, plugins)
        files += [(p, f"plugins/{p.name}") for p in libs]
        if libs:
            extra["rwkv.plugins"] = ";".join(f"plugins/{p.name}" for p in libs)
    else:
        if not TEMPLATE.is_file():
            raise ExportError(f"the Python backend template {TEMPLATE} is missing (a source checkout has it)")
        files.append((TEMPLATE, "1/model.py"))
        for kind in ("step", "sequence"):  # the runtime opens companions by their file names
            if art.companion_path(kind) is not None:
                comp = art.companion(kind)  # checked to be of this export (id, layout), its paths confined
                files += [(comp.path, f"1/{comp.path.name}")] + _data_files(comp, "1")
        extra[MODEL_FILE_PARAM] = art.path.name
    files = list({d: (src, d) for src, d in files}.values())  # a weights file shared by both graphs: once
    fills = _initial_values(art) if backend != "python" else {}
    _set_params(cfg, art, extra)
    text = config_text(cfg)
    parse_config(text)  # belt and braces: what we write must read back
    inputs = [src for src, _ in files]
    _check_destination(dest, inputs, force)

    created = not repo.exists()
    try:
        repo.mkdir(parents=True, exist_ok=True)
        _write_model_folder(dest, name, files, fills, text, art, inputs)
    except OSError as e:  # disk full, permissions, ...: one line naming the user's folder
        raise ExportError(
            f"{dest}: {e.strerror or type(e).__name__}; nothing was written"
            + (" (the old model folder is unchanged)" if os.path.lexists(dest) else "")
        ) from None
    finally:
        if created and repo.is_dir() and not any(repo.iterdir()):
            repo.rmdir()
    return dest


def _inside(path: Path, folder: Path) -> bool:
    real, top = os.path.realpath(path), os.path.realpath(folder)
    return real == top or real.startswith(top.rstrip(os.sep) + os.sep)


def _check_destination(dest: Path, inputs: list, force: bool) -> None:
    """What may stand at REPO/NAME: nothing; or, with --force, a model folder this command wrote (it holds
    MARKER) and that holds none of this command's inputs. Never a link (it would be written through)."""
    if dest.is_symlink():
        raise ExportError(
            f"{dest}: is a symbolic link; rwkv-export triton neither writes through nor replaces "
            "a link: remove it or choose another --name"
        )
    if not os.path.lexists(dest):
        return
    if not force:
        raise ExportError(f"{dest} already exists (pass --force to replace it)")
    held = next((i for i in inputs if _inside(i, dest)), None)
    if held is not None:
        raise ExportError(
            f"{dest}: holds {held.name}, an input of this command; --force never deletes a folder "
            "holding an input: write the repository elsewhere (-o) or choose another --name"
        )
    if not dest.is_dir():
        raise ExportError(
            f"{dest}: exists and is not a model folder; --force only replaces model folders "
            "rwkv-export triton wrote: remove it yourself or choose another --name"
        )
    marker = dest / MARKER
    if any(dest.iterdir()) and (marker.is_symlink() or not marker.is_file()):
        raise ExportError(
            f"{dest}: was not written by rwkv-export triton (no {MARKER} in it); --force only "
            "replaces model folders this command wrote: remove it yourself or choose another --name"
        )


def _write_model_folder(dest: Path, name: str, files: list, fills: dict, text: str, art, inputs: list) -> None:
    """Stage the model folder beside ``dest`` (rwkv_runtime.safe_write) and move it into place; an old
    folder (checked by _check_destination) is moved aside first and back if the commit fails."""
    with SafeWrite(dest, inputs=inputs, allowed=[name]) as sw:
        tmp = sw.path("model")
        tmp.mkdir()
        (tmp / "1").mkdir()
        for src, rel in files:  # rel: plain names and "1/"/"plugins/" (+ confined external-data locations)
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
        if fills:
            (tmp / "initial_state").mkdir()
            for k, a in fills.items():  # raw row-major bytes, batch axis dropped (Triton adds it)
                np.ascontiguousarray(a[0]).tofile(tmp / "initial_state" / _state_file(k))
        (tmp / "config.pbtxt").write_text(text, encoding="utf-8")
        (tmp / SIDECAR).write_text(art.manifest.to_json(), encoding="utf-8")
        if art.tokenizer_json:
            (tmp / "tokenizer.json").write_text(art.tokenizer_json, encoding="utf-8")
        (tmp / MARKER).write_text(
            json.dumps(
                {"written_by": "rwkv-export triton", "model": art.path.name, "export_id": art.manifest.export_id}
            )
            + "\n",
            encoding="utf-8",
        )
        old = sw.path("replaced")
        moved = False
        if os.path.lexists(dest):
            os.replace(dest, old)
            moved = True
        try:
            sw.commit([("model", dest)])
        except BaseException:
            if moved and not os.path.lexists(dest):
                os.replace(old, dest)
            raise


def _engine_max_batch(art) -> int | None:
    """The largest batch of an engine's optimization profile (its sidecar's ``profile``), if recorded."""
    try:
        return int(art.props["profile"][art.manifest.tokens_input][2][0])
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def _plugin_libraries(art, plugins: tuple) -> list:
    """The plugin libraries to ship with an engine that has rwkv plugin nodes (Triton loads them with
    --backend-config=tensorrt,plugins=... or LD_PRELOAD): the ones the user passes, else those its sidecar
    records, looked up beside the engine (confined to its folder, links included) or where build-engine
    loaded them when that lies inside the engine's folder -- never a path elsewhere that a file names."""
    recorded = [p for p in (art.props.get("plugins") or []) if isinstance(p, dict) and p.get("name")]
    found = [Path(p) for p in plugins]
    if recorded and not found:
        for rec in recorded:
            cands = [confined_path(art.path, rec["name"], "plugin library")]
            if rec.get("path") and outside_reason(art.path, Path(str(rec["path"]))) is None:
                cands.append(Path(str(rec["path"])))
            hit = next((c for c in cands if c.is_file()), None)
            if hit is None:
                raise ExportError(
                    f"{art.path.name} needs the plugin library {rec['name']}: copy it beside the engine "
                    "or pass --plugin PATH"
                )
            found.append(hit)
    for p in found:
        if not p.is_file():
            raise ExportError(f"--plugin {p}: no such file")
    if len({p.name for p in found}) != len(found):
        raise ExportError("two plugin libraries with one file name: they would overwrite each other in plugins/")
    return found


__all__ = ["write_repository", "build_config", "parse_config", "config_text", "BACKENDS"]
