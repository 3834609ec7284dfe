"""The one reader of everything an exported artifact carries, and its validation.

An artifact is an ONNX graph (``.onnx``: the manifest, tokenizer JSON and a learned initial state in its
``metadata_props``) or a TensorRT engine (``.engine``/``.plan``/``.trt``: the same in a JSON sidecar
``MODEL.engine.json``). Everything here is read without onnxruntime, onnx or TensorRT: the ONNX metadata
is parsed straight from the protobuf bytes (ModelProto field 14), streaming the file and seeking past
the graph, so a multi-GB model costs a few reads.

What is checked where (docs/errors.md, "Runtime"):

- ``parse_manifest``: the manifest JSON against its schema (types, required fields, state specs,
  tokenizer block, companions as plain file names in the same folder);
- ``Artifact.companion``: a companion graph exists, is of the kind asked for, and carries the same
  ``export_id`` as the main graph;
- ``check_graph_io``: the manifest against a loaded graph's actual inputs/outputs (names, ranks,
  dtypes, vocab size), before the first run;
- ``decode_initial_state`` (and ``state.read_state_npz`` for saved states): npz headers checked before any
  data is read: names, dtypes, shapes, sizes, export id.

Every failure is a ``RuntimeUserError`` with one line naming the user's file.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import RuntimeUserError
from .manifest import (
    FIELDS_BY_NAME,
    FORMAT_VERSION,
    INITIAL_STATE_KEY,  # noqa: F401
    MANIFEST_FIELDS,
    MANIFEST_KEY,
    PLAIN_FILE_PATTERN,
    REQUIRED_FIELDS,
    STATE_FIELDS,
    TOKENIZER_KEY,
    Manifest,
    StateSpec,
    check_value,
)
from .onnx_metadata import MAX_META_BYTES as _MAX_META_BYTES  # noqa: F401
from .onnx_metadata import read_onnx, read_onnx_metadata  # noqa: F401 - read_onnx_metadata: its old home
from .state import EXPORT_ID_KEY, MAX_STATE_BATCH, STATE_DTYPES, check_state_arrays, read_state_npz  # noqa: F401

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")  # the one list: TensorRT engine files
SIDECAR_FORMAT = "rwkv-trt-engine"
SIDECAR_VERSION = 1


def is_engine(path) -> bool:
    return Path(path).suffix in ENGINE_SUFFIXES


# ---------------------------------------------------------------------------------------------
# Paths read from a file: confined to the model's folder
# ---------------------------------------------------------------------------------------------
_DRIVE = re.compile(r"^[A-Za-z]:")


def model_roots(model_path) -> tuple[str, ...]:
    """The folders a model's files may live in: the folder holding the model as named, and the folder of
    its real file when the model itself is a link (a Hugging Face cache: snapshots/REV/m.onnx and
    m.onnx.data both link into blobs/). Real paths, symlinks resolved."""
    p = Path(model_path)
    return tuple(dict.fromkeys((os.path.realpath(p.parent), os.path.dirname(os.path.realpath(p)))))


def outside_reason(model_path: Path, full: Path) -> str | None:
    """None when ``full``'s real path lies inside one of the model's folders (never the folder itself)."""
    real = os.path.realpath(full)
    if any(real.startswith(r.rstrip(os.sep) + os.sep) for r in model_roots(model_path)):
        return None
    return f"resolves to {real[:160]}, a link out of the folder"


def confined_path(model_path, rel, what: str) -> Path:
    """``rel`` -- a path read from the model's own files (an external-data location, a companion, a
    weights file, a plugin library name) -- as a path beside the model, or one ``RuntimeUserError``.

    The rule (the JS runtime applies the same): ``rel`` is a non-empty string of at most 4096 characters
    without NUL; relative (no leading ``/`` or ``\\``, no drive letter ``X:``); no ``\\`` or ``:`` at all
    (a separator or a drive on one system, a file name on another); no ``..`` component; and its real
    path (symlinks resolved, whether or not it exists yet) lies inside one of ``model_roots``."""
    model_path = Path(model_path)
    shown = str(rel)[:100]
    why = None
    if not isinstance(rel, str) or not rel or len(rel) > 4096 or "\0" in rel:
        why = "not a usable file name"
    elif rel.startswith(("/", "\\")) or _DRIVE.match(rel):
        why = "an absolute path"
    elif "\\" in rel or ":" in rel:
        why = "holds '\\' or ':'"
    elif ".." in rel.split("/"):
        why = "climbs out with '..'"
    if why is None:
        full = model_path.parent / rel
        why = outside_reason(model_path, full)
        if why is None:
            return full
    raise RuntimeUserError(
        f"{model_path.name}: {what} {shown!r} is outside the model's folder ({why}); refusing to "
        "read it (an export keeps its files together in one folder; re-export or copy them there)"
    )


# ---------------------------------------------------------------------------------------------
# Manifest schema
# ---------------------------------------------------------------------------------------------
def _bad(where: str, what: str) -> RuntimeUserError:
    return RuntimeUserError(f"{where}: damaged rwkv manifest: {what}; re-export the model")


def plain_file_name(name) -> bool:
    """A file name in the artifact's own folder: no separators, no '..', nothing absolute."""
    return isinstance(name, str) and re.search(PLAIN_FILE_PATTERN, name) is not None


def _typed(v, schema: dict):
    """A value that passed its schema, as Python holds it: integral floats (JSON's 4.0) become ints."""
    if schema.get("type") == "integer" and isinstance(v, float):
        return int(v)
    if schema.get("type") == "number" and not isinstance(v, bool):
        return float(v)
    if schema.get("type") == "array" and "prefixItems" in schema:  # a state shape: 'batch', then ints
        return [v[0]] + [int(x) for x in v[1:]]
    return v


def _state_spec(d, i: int, where: str) -> StateSpec:
    if not isinstance(d, dict):
        raise _bad(where, f"state[{i}] is not an object")
    kw = {}
    for f in STATE_FIELDS:  # the one declaration: runtime/manifest.py
        if f.name not in d:
            if f.required:
                raise _bad(where, f"state[{i}].{f.name} must be {f.what}")
            continue
        if not check_value(d[f.name], f.schema):
            raise _bad(where, f"state[{i}].{f.name} must be {f.what}, not {str(d[f.name])[:60]}")
        kw[f.name] = _typed(d[f.name], f.schema)
    return StateSpec(**kw)


def parse_manifest(text, where: str = "model") -> Manifest:
    """Manifest JSON -> a validated ``Manifest`` (unknown keys are ignored: newer exporters may add some)."""
    if not isinstance(text, str):
        raise _bad(where, "not text")
    try:
        d = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise _bad(where, f"not valid JSON ({str(e)[:80]})") from None
    if not isinstance(d, dict):
        raise _bad(where, "not a JSON object")
    return manifest_from_dict(d, where)


def manifest_from_dict(d: dict, where: str = "model") -> Manifest:
    """A manifest dict checked field by field against ``manifest.MANIFEST_FIELDS`` (the schema), plus the
    rules no schema keyword states (distinct names); paths it names are confined by ``open_artifact``."""
    if not check_value(d.get("format_version"), FIELDS_BY_NAME["format_version"].schema):
        v = d.get("format_version")
        raise RuntimeUserError(
            f"{where}: unsupported manifest format version {str(v)[:20]} (this runtime reads "
            f"version {FORMAT_VERSION}); re-export the model"
        )
    for k in REQUIRED_FIELDS:
        if k not in d:
            raise _bad(where, f"missing field {k!r}")
    known = {}
    for f in MANIFEST_FIELDS:
        if f.name not in d:
            continue
        if not check_value(d[f.name], {**f.schema, "items": {}} if f.name == "state" else f.schema):
            raise _bad(where, f"{f.name} must be {f.what}")
        known[f.name] = _typed(d[f.name], f.schema)
    known["format_version"] = FORMAT_VERSION
    known["state"] = [_state_spec(s, i, where) for i, s in enumerate(known["state"])]
    names = [s.name for s in known["state"]] + [s.output for s in known["state"]]
    io_names = [known.get("tokens_input", "tokens"), known.get("logits_output", "logits")]
    if len(set(names + io_names)) != len(names) + 2:
        raise _bad(where, "state, token and logits names must all be distinct")
    return Manifest(**known)


# ---------------------------------------------------------------------------------------------
# The embedded initial state (saved states are read by state.read_state_npz, the same checks)
# ---------------------------------------------------------------------------------------------
def decode_initial_state(text, specs: list, where: str) -> dict:
    """The embedded learned initial state (base64 of an .npz) -> {name: array [1, ...]}."""
    if not isinstance(text, str) or not text:
        raise RuntimeUserError(f"{where}: the manifest says it embeds an initial state, but none is there; re-export")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RuntimeUserError(f"{where}: the embedded initial state is not valid base64; re-export") from None
    arrays = read_state_npz(raw, specs, f"{where} (embedded initial state)", require_all=False)
    for k, a in arrays.items():
        if a.shape[0] != 1:
            raise RuntimeUserError(f"{where}: embedded initial state {k} has batch {a.shape[0]}, expected 1")
    return arrays


# ---------------------------------------------------------------------------------------------
# Engine sidecars (read here: reading them needs no TensorRT)
# ---------------------------------------------------------------------------------------------
def sidecar_path(engine_path) -> Path:
    """``model.engine`` -> ``model.engine.json``."""
    p = Path(engine_path)
    return p.with_name(p.name + ".json")


def read_sidecar(engine_path) -> dict:
    path = Path(engine_path)
    side = sidecar_path(path)
    if not side.is_file():
        raise RuntimeUserError(
            f"{path.name}: no {side.name} beside it (engines built by rwkv-export build-engine "
            "carry their manifest in that file; copy it with the engine or rebuild)"
        )
    if (why := outside_reason(path, side)) is not None:  # named by us, but a link may point anywhere
        raise RuntimeUserError(
            f"{side.name}: the engine sidecar {why}; refusing to read it (keep it beside the engine)"
        )
    try:
        d = json.loads(side.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise RuntimeUserError(f"{side.name}: not valid JSON ({str(e)[:80]})") from None
    except OSError as e:
        raise RuntimeUserError(f"{side.name}: cannot read it ({e.strerror or e})") from None
    if not isinstance(d, dict) or d.get("format") != SIDECAR_FORMAT or not isinstance(d.get("manifest"), dict):
        raise RuntimeUserError(f"{side.name}: not an rwkv-export engine sidecar")
    if d.get("format_version") != SIDECAR_VERSION:
        raise RuntimeUserError(
            f"{side.name}: sidecar format version {str(d.get('format_version'))[:20]} is not "
            f"supported (this runtime reads version {SIDECAR_VERSION}); rebuild the engine"
        )
    for k in ("tokenizer_json", "initial_state"):
        if d.get(k) is not None and not isinstance(d[k], str):
            raise RuntimeUserError(f"{side.name}: {k} must be a string")
    plugins = d.get("plugins") or []
    if not isinstance(plugins, list) or not all(
        isinstance(p, dict) and isinstance(p.get("name"), str) and isinstance(p.get("path", ""), str) for p in plugins
    ):
        raise RuntimeUserError(f"{side.name}: plugins must be a list of {{name, path}} strings")
    for p in plugins:  # a library is only ever looked up beside the engine under its plain name
        if not plain_file_name(p["name"]):
            raise RuntimeUserError(
                f"{side.name}: plugin library {p['name'][:100]!r} is not a plain file name beside "
                "the engine; rebuild the engine"
            )
        confined_path(path, p["name"], "plugin library")
    return d


def read_engine_manifest(engine_path) -> tuple[Manifest, str | None]:
    """The manifest (and embedded tokenizer JSON) of an engine, from its sidecar. Needs no TensorRT."""
    d = read_sidecar(engine_path)
    return manifest_from_dict(d["manifest"], sidecar_path(engine_path).name), d.get("tokenizer_json")


def read_engine_initial_state(engine_path) -> dict:
    """A learned initial state recorded in the sidecar ({} if none)."""
    d = read_sidecar(engine_path)
    if not d.get("initial_state"):
        return {}
    man = manifest_from_dict(d["manifest"], sidecar_path(engine_path).name)
    return decode_initial_state(d["initial_state"], man.state, sidecar_path(engine_path).name)


# ---------------------------------------------------------------------------------------------
# The artifact
# ---------------------------------------------------------------------------------------------
@dataclass
class Artifact:
    """One exported graph (ONNX or engine) with its manifest, tokenizer and initial state."""

    path: Path
    manifest: Manifest
    tokenizer_json: str | None = None
    props: dict = field(default_factory=dict)  # ONNX metadata, or the engine sidecar
    # the external-data locations the ONNX file names, each checked by ``confined_path`` (engines: none)
    external_data: tuple = ()

    def data_files(self) -> list:
        """The external-data files of this graph, as paths beside it (checked to stay in its folder)."""
        return [self.path.parent / loc for loc in self.external_data]

    @property
    def engine(self) -> bool:
        return is_engine(self.path)

    def initial_state(self) -> dict:
        """The embedded learned initial state ({} when the export has none)."""
        if self.manifest.initial_state != "embedded":
            return {}
        text = self.props.get("initial_state" if self.engine else INITIAL_STATE_KEY)
        return decode_initial_state(text, self.manifest.state, self.path.name)

    def companion_path(self, kind: str) -> Path | None:
        """The file of the ``kind`` graph of this export (this file itself, a companion, or None)."""
        if self.manifest.graph == kind:
            return self.path
        name = self.manifest.companions.get(kind)
        if not name:
            return None
        p = self.path.with_name(name)
        return p if p.is_file() else None

    def companion(self, kind: str) -> Artifact:
        """The companion graph, checked to belong to this export (same export id, same state layout)."""
        p = self.companion_path(kind)
        if p is None:
            raise RuntimeUserError(f"no {kind} graph for {self.path.name} (export it with --graphs step,sequence)")
        if p == self.path:
            if self.manifest.graph != kind:
                raise RuntimeUserError(f"{p.name}: named as its own {kind} graph but is a {self.manifest.graph} graph")
            return self
        other = open_artifact(p)
        m, o = self.manifest, other.manifest
        if o.graph != kind:
            raise RuntimeUserError(f"{p.name}: named as the {kind} graph of {self.path.name} but is a {o.graph} graph")
        if (m.export_id or o.export_id) and m.export_id != o.export_id:
            raise RuntimeUserError(
                f"{p.name} belongs to another export than {self.path.name} (export ids "
                f"{o.export_id[:16] or 'none'} vs {m.export_id[:16] or 'none'}); re-export them together"
            )
        same = [(s.name, s.output, list(s.shape), s.dtype) for s in m.state] == [
            (s.name, s.output, list(s.shape), s.dtype) for s in o.state
        ]
        if not same or (m.vocab_size, m.n_layer, m.n_embd, m.architecture) != (
            o.vocab_size,
            o.n_layer,
            o.n_embd,
            o.architecture,
        ):
            raise RuntimeUserError(f"{p.name} does not match {self.path.name} (different model or state layout)")
        return other


def open_artifact(path) -> Artifact:
    """Read and validate an artifact's manifest (ONNX metadata or engine sidecar); loads no weights."""
    if not isinstance(path, (str, os.PathLike)):
        raise RuntimeUserError(f"a model path must be a str or Path, not {type(path).__name__}")
    path = Path(path)
    try:
        exists, is_file = path.exists(), path.is_file()
    except (OSError, ValueError) as e:  # a name too long, a NUL in it, ...
        raise RuntimeUserError(f"{str(path)[:200]}: cannot open it ({getattr(e, 'strerror', None) or e})") from None
    if not exists:
        raise RuntimeUserError(f"{path}: no such file")
    if not is_file:
        if not path.is_dir():  # a device or a FIFO: never read
            raise RuntimeUserError(f"{path}: not a regular file; give the model's .onnx or .engine file")
        raise RuntimeUserError(f"{path}: is a directory, not a model file")
    if is_engine(path):
        side = read_sidecar(path)
        man = manifest_from_dict(side["manifest"], sidecar_path(path).name)
        _confine_manifest_paths(path, man)
        return Artifact(path, man, side.get("tokenizer_json"), side)
    # the metadata and every external-data location, from the file's bytes: checked here, before any
    # caller hands the file to onnxruntime, TensorRT's parser or onnx (which would open those files)
    props, locations = read_onnx(path)
    for loc in locations:
        confined_path(path, loc, "external data file")
    if MANIFEST_KEY not in props:
        raise RuntimeUserError(f"{path}: no rwkv manifest in this ONNX model (was it exported by rwkv-export?)")
    man = parse_manifest(props[MANIFEST_KEY], path.name)
    _confine_manifest_paths(path, man)
    return Artifact(path, man, props.get(TOKENIZER_KEY), props, tuple(locations))


def _confine_manifest_paths(path: Path, man: Manifest) -> None:
    """The files a manifest names (companions, the weights file) stay in the model's folder, links included."""
    for kind, name in man.companions.items():
        confined_path(path, name, f"companion {kind} graph")
    weights = man.options.get("weights_file")
    if weights is not None:
        confined_path(path, weights, "weights file")


def read_manifest(path) -> tuple[Manifest, str | None]:
    """The validated manifest and embedded tokenizer JSON of an artifact (ONNX or engine)."""
    a = open_artifact(path)
    return a.manifest, a.tokenizer_json


# ---------------------------------------------------------------------------------------------
# The manifest against the graph that was actually loaded
# ---------------------------------------------------------------------------------------------
_ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)"}


def check_graph_io(manifest: Manifest, kind: str, inputs, outputs, where: str) -> None:
    """Compare the manifest with a loaded graph's inputs/outputs (onnxruntime NodeArg-like: name, shape,
    type). Raises a RuntimeUserError naming the first disagreement."""
    ins = {a.name: a for a in inputs}
    outs = {a.name: a for a in outputs}

    def fail(what):
        raise RuntimeUserError(f"{where}: the graph does not match its manifest ({what}); re-export the model")

    tok = ins.get(manifest.tokens_input)
    if tok is None:
        fail(f"no input {manifest.tokens_input!r}")
    if len(tok.shape) != (1 if kind == "step" else 2) or tok.type not in ("tensor(int64)", "tensor(int32)"):
        fail(f"input {tok.name} is {tok.type} of rank {len(tok.shape)}")
    lg = outs.get(manifest.logits_output)
    if lg is None:
        fail(f"no output {manifest.logits_output!r}")
    if len(lg.shape) not in (2, 3) or (isinstance(lg.shape[-1], int) and lg.shape[-1] != manifest.vocab_size):
        fail(f"output {lg.name} has shape {lg.shape}, vocab {manifest.vocab_size}")
    for s in manifest.state:
        for name, table in ((s.name, ins), (s.output, outs)):
            a = table.get(name)
            if a is None:
                fail(f"no {'input' if table is ins else 'output'} {name!r}")
            if len(a.shape) != len(s.shape) or a.type != _ORT_TYPES[s.dtype]:
                fail(f"{name} is {a.type} of rank {len(a.shape)}, manifest says {s.dtype} {s.shape}")
            for got, want in zip(a.shape[1:], s.shape[1:]):
                if isinstance(got, int) and got != want:
                    fail(f"{name} has shape {a.shape}, manifest says {s.shape}")
    extra = set(ins) - {manifest.tokens_input} - {s.name for s in manifest.state}
    if extra:
        fail(f"inputs the manifest does not describe: {sorted(extra)[:3]}")
