"""The manifest: the contract between the exporter and the runtime, declared once.

The exporter writes it as JSON into the ONNX model's metadata (key ``rwkv.manifest``); the runtime
reads it back and hard-codes nothing about a model: input/output names, every recurrent state tensor
(name, output name, shape with the symbolic ``batch`` axis, dtype, initial value), sizes, tokenizer.

``STATE_FIELDS`` and ``MANIFEST_FIELDS`` below are the one declaration of the format. From them come:

- the ``StateSpec`` and ``Manifest`` dataclasses (``make_dataclass``: fields, order, defaults);
- the validation of a manifest read from a file (``check_value`` for each field, used by
  ``artifact.manifest_from_dict``), with the error text each field declares;
- the JSON Schema ``manifest.schema.json`` (``json_schema()``; ``python -m rwkv_runtime.manifest --schema``
  prints it), committed beside this file, shipped as package data and copied to js/src/ for the JS
  runtime; tests/runtime/test_manifest_schema.py checks the committed copies equal the emitted text.

Each field's ``schema`` is a JSON Schema fragment, and ``check_value`` implements exactly the keywords
the fragments use (a dozen of draft 2020-12), so the runtime needs no schema library. Two rules no JSON
Schema keyword states are checked by ``artifact.manifest_from_dict`` and listed in the schema's
``x-rules``: state, token and logits names all distinct; companion and weights-file paths confined to
the model's folder (``artifact.confined_path``).
This module must stay importable with numpy alone (no torch, no onnx).
"""

from __future__ import annotations

import base64
import copy
import io
import json
import math
import re
from dataclasses import asdict, dataclass, field, make_dataclass
from typing import Any

from .errors import RuntimeUserError

MANIFEST_KEY = "rwkv.manifest"
TOKENIZER_KEY = "rwkv.tokenizer_json"  # a Hugging Face tokenizer.json travels inside the model
INITIAL_STATE_KEY = "rwkv.initial_state"  # a learned (state-tuned) initial state: base64 of an .npz
FORMAT_VERSION = 1
BATCH = "batch"  # the symbolic batch axis in state shapes
GRAPH_KINDS = ("step", "sequence")
STATE_DTYPE_NAMES = ("float32", "float16")
MAX_DIM = 1 << 24
SCHEMA_ID = "https://github.com/rwkv-export/rwkv-export/manifest.schema.json"
# a file name in the model's own folder: no separators, no drive or stream ':', not '.' or '..'
PLAIN_FILE_PATTERN = r"^(?!\.\.?$)[^/\\:\u0000]{1,255}$"

_NO_DEFAULT = object()


@dataclass(frozen=True)
class Field:
    """One manifest field: its JSON Schema, whether a file must carry it, the dataclass default, the
    phrase an error uses ("n_layer must be <what>") and what it means."""

    name: str
    schema: dict
    what: str
    doc: str
    required: bool = False
    default: Any = _NO_DEFAULT  # the dataclass default (a dict/list is copied per instance)
    py_type: str = "Any"


def _str(min_len=0, max_len=None) -> dict:
    s = {"type": "string"}
    if min_len:
        s["minLength"] = min_len
    if max_len is not None:
        s["maxLength"] = max_len
    return s


STATE_FIELDS = (
    Field("name", _str(1), "a non-empty string", "graph input holding this tensor", True, _NO_DEFAULT, "str"),
    Field("output", _str(1), "a non-empty string", "graph output holding its next value", True, _NO_DEFAULT, "str"),
    Field(
        "shape",
        {
            "type": "array",
            "minItems": 1,
            "prefixItems": [{"const": BATCH}],
            "items": {"type": "integer", "minimum": 1, "maximum": MAX_DIM},
        },
        "['batch', positive ints...]",
        "'batch' first (the only symbolic axis), then sizes in [1, 2^24]",
        True,
        _NO_DEFAULT,
        "list",
    ),
    Field(
        "dtype",
        {"enum": list(STATE_DTYPE_NAMES)},
        f"one of {list(STATE_DTYPE_NAMES)}",
        "element type",
        False,
        "float32",
        "str",
    ),
    Field(
        "init",
        {"type": "number", "x-finite": True},
        "a finite number",
        "fill value of a fresh state (RWKV-4's wkv_pp: -1e30)",
        False,
        0.0,
        "float",
    ),
    Field("layer", {"type": "integer"}, "an integer", "the layer it belongs to (-1: none)", False, -1, "int"),
    Field("doc", {"type": "string"}, "a string", "what it holds", False, "", "str"),
)

STATE_SCHEMA = {
    "type": "object",
    "required": [f.name for f in STATE_FIELDS if f.required],
    "properties": {f.name: f.schema for f in STATE_FIELDS},
}

MANIFEST_FIELDS = (
    Field(
        "architecture", _str(1), "a non-empty string", "rwkv4, rwkv5, rwkv5.2, rwkv6, rwkv7", True, _NO_DEFAULT, "str"
    ),
    Field("n_layer", {"type": "integer", "minimum": 1}, "an integer >= 1", "layers", True, _NO_DEFAULT, "int"),
    Field("n_embd", {"type": "integer", "minimum": 1}, "an integer >= 1", "embedding width", True, _NO_DEFAULT, "int"),
    Field(
        "vocab_size",
        {"type": "integer", "minimum": 1, "maximum": MAX_DIM},
        "an integer in [1, 2^24]",
        "vocabulary size (the logits' last axis)",
        True,
        _NO_DEFAULT,
        "int",
    ),
    Field(
        "graph",
        {"enum": list(GRAPH_KINDS)},
        "'step' or 'sequence'",
        "step: tokens [batch]; sequence: tokens [batch, T]",
        False,
        "step",
        "str",
    ),
    Field("precision", {"type": "string"}, "a string", "weight precision: fp32, fp16, bf16", False, "fp32", "str"),
    Field("opset", {"type": "integer"}, "an integer", "ONNX opset", False, 18, "int"),
    Field(
        "wkv",
        {"type": "string"},
        "a string",
        "plain (standard ops) or plugin (rwkv::WKV* custom nodes)",
        False,
        "plain",
        "str",
    ),
    Field(
        "tokenizer",
        {"type": "object", "properties": {"kind": {"type": "string"}}},
        "an object with a string 'kind'",
        "{kind: bytes | world | hf-json | none}",
        False,
        {"kind": "bytes"},
        "dict",
    ),
    Field("tokens_input", _str(1), "a non-empty string", "the token input's name", False, "tokens", "str"),
    Field("logits_output", _str(1), "a non-empty string", "the logits output's name", False, "logits", "str"),
    Field(
        "state",
        {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/state"}},
        "a non-empty list",
        "every recurrent state tensor",
        True,
        [],
        "list",
    ),
    Field("dims", {"type": "object"}, "an object", "version-specific sizes (ffn_dim, heads, ...)", False, {}, "dict"),
    Field(
        "options",
        {"type": "object"},
        "an object",
        "export options (rescale_every, all_logits, weights_file, ...)",
        False,
        {},
        "dict",
    ),
    Field(
        "companions",
        {
            "type": "object",
            "propertyNames": {"enum": list(GRAPH_KINDS)},
            "additionalProperties": {"type": "string", "pattern": PLAIN_FILE_PATTERN},
        },
        "an object of kind ('step'/'sequence') -> a plain file name in the model's folder",
        "the other graphs of this export, by kind, as file names beside this one",
        False,
        {},
        "dict",
    ),
    Field("source", {"type": "object"}, "an object", "what was exported (checkpoint name, format)", False, {}, "dict"),
    Field(
        "initial_state",
        {"enum": ["", "embedded"]},
        "'' or 'embedded'",
        "embedded: rwkv.initial_state holds a learned starting state",
        False,
        "",
        "str",
    ),
    Field(
        "export_id",
        _str(0, 256),
        "a string of at most 256 characters",
        "one id shared by every graph, engine and saved state of one export",
        False,
        "",
        "str",
    ),
    Field("exporter_version", {"type": "string"}, "a string", "provenance", False, "", "str"),
    Field(
        "format_version",
        {"const": FORMAT_VERSION},
        f"{FORMAT_VERSION}",
        "the runtime refuses other versions",
        True,
        FORMAT_VERSION,
        "int",
    ),
)
FIELDS_BY_NAME = {f.name: f for f in MANIFEST_FIELDS}
REQUIRED_FIELDS = tuple(f.name for f in MANIFEST_FIELDS if f.required)


# ---------------------------------------------------------------------------------------------
# The dataclasses, made from the tables
# ---------------------------------------------------------------------------------------------
def _dc_fields(table) -> list:
    out = []
    for f in table:
        if f.default is _NO_DEFAULT:
            out.append((f.name, f.py_type))
        elif isinstance(f.default, (dict, list)):
            out.append((f.name, f.py_type, field(default_factory=lambda d=f.default: copy.deepcopy(d))))
        else:
            out.append((f.name, f.py_type, field(default=f.default)))
    return out


def _concrete_shape(self, batch_size: int) -> tuple:
    return tuple(batch_size if d == BATCH else int(d) for d in self.shape)


StateSpec = make_dataclass(
    "StateSpec",
    _dc_fields(STATE_FIELDS),
    namespace={
        "__doc__": "One recurrent state tensor: graph input ``name``, graph output ``output`` (fields: STATE_FIELDS).",
        "concrete_shape": _concrete_shape,
        "__module__": __name__,
    },
)


def _to_json(self) -> str:
    return json.dumps(asdict(self), indent=1, sort_keys=True)


def _from_json(cls, text: str):
    """Parse and validate (artifact.parse_manifest); a damaged manifest is a RuntimeUserError."""
    from .artifact import parse_manifest

    return parse_manifest(text, "manifest")


def _summary(self) -> dict:
    """A short human-readable view (``rwkv-export inspect``)."""
    return {
        "architecture": self.architecture,
        "graph": self.graph,
        "layers": self.n_layer,
        "n_embd": self.n_embd,
        "vocab": self.vocab_size,
        "precision": self.precision,
        "wkv": self.wkv,
        "tokenizer": self.tokenizer.get("kind"),
        "state tensors": len(self.state),
    }


Manifest = make_dataclass(
    "Manifest",
    _dc_fields(MANIFEST_FIELDS),
    namespace={
        "__doc__": "The manifest of one exported graph (fields: MANIFEST_FIELDS; ``state`` holds StateSpecs).",
        "__module__": __name__,
        "to_json": _to_json,
        "from_json": classmethod(_from_json),
        "summary": _summary,
        "state_inputs": property(lambda self: [s.name for s in self.state]),
        "state_outputs": property(lambda self: [s.output for s in self.state]),
    },
)


# ---------------------------------------------------------------------------------------------
# Validation from the tables (the JSON Schema keywords the fragments use, and nothing else)
# ---------------------------------------------------------------------------------------------
def _type_ok(v, t: str) -> bool:
    if t == "integer":
        return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer())
    if t == "number":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    return isinstance(v, {"string": str, "object": dict, "array": list, "boolean": bool}[t])


def _equal(a, b) -> bool:
    """JSON equality: 1 == 1.0, but True is not 1."""
    num = (int, float)
    if isinstance(a, num) and isinstance(b, num) and not isinstance(a, bool) and not isinstance(b, bool):
        return a == b
    return type(a) is type(b) and a == b


def check_value(v, schema: dict) -> bool:
    """Does ``v`` (parsed JSON) satisfy the schema fragment? Keywords: type, enum, const, minimum,
    maximum, minLength, maxLength, pattern, minItems, prefixItems, items, properties, required,
    propertyNames, additionalProperties, $ref (to #/$defs/state), and x-finite (no NaN/inf)."""
    if "$ref" in schema:
        return check_value(v, STATE_SCHEMA)
    if "const" in schema and not _equal(v, schema["const"]):
        return False
    if "enum" in schema and not any(_equal(v, e) for e in schema["enum"]):
        return False
    if "type" in schema and not _type_ok(v, schema["type"]):
        return False
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if (
            isinstance(v, float)
            and not math.isfinite(v)
            and (
                schema.get("x-finite") or "minimum" in schema or "maximum" in schema or schema.get("type") == "integer"
            )
        ):
            return False
        if "minimum" in schema and v < schema["minimum"] or "maximum" in schema and v > schema["maximum"]:
            return False
    if isinstance(v, str):
        if len(v) < schema.get("minLength", 0) or ("maxLength" in schema and len(v) > schema["maxLength"]):
            return False
        if "pattern" in schema and not re.search(schema["pattern"], v):
            return False
    if isinstance(v, list):
        if len(v) < schema.get("minItems", 0):
            return False
        pre = schema.get("prefixItems", [])
        if not all(check_value(x, s) for x, s in zip(v, pre)):
            return False
        if "items" in schema and not all(check_value(x, schema["items"]) for x in v[len(pre) :]):
            return False
    if isinstance(v, dict):
        if any(k not in v for k in schema.get("required", ())):
            return False
        props = schema.get("properties", {})
        if not all(check_value(v[k], s) for k, s in props.items() if k in v):
            return False
        if "propertyNames" in schema and not all(check_value(k, schema["propertyNames"]) for k in v):
            return False
        if "additionalProperties" in schema and not all(
            check_value(x, schema["additionalProperties"]) for k, x in v.items() if k not in props
        ):
            return False
    return True


# ---------------------------------------------------------------------------------------------
# The JSON Schema, emitted from the tables
# ---------------------------------------------------------------------------------------------
def json_schema() -> dict:
    """The manifest's JSON Schema (draft 2020-12), from MANIFEST_FIELDS and STATE_FIELDS."""

    def prop(f: Field) -> dict:
        return {**f.schema, "description": f.doc}

    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "rwkv-export manifest",
        "description": f"The JSON in an exported model's metadata key {MANIFEST_KEY!r} (or an engine sidecar's "
        "'manifest'). Generated from runtime/manifest.py; do not edit.",
        "type": "object",
        "required": list(REQUIRED_FIELDS),
        "properties": {f.name: prop(f) for f in MANIFEST_FIELDS},
        "$defs": {
            "state": {
                "type": "object",
                "required": STATE_SCHEMA["required"],
                "properties": {f.name: prop(f) for f in STATE_FIELDS},
            }
        },
        "x-rules": [
            "state names, state outputs, tokens_input and logits_output are all distinct",
            "state[].init is finite (x-finite: JSON has no NaN/inf, but some parsers accept them)",
            "companions and options.weights_file resolve inside the model's folder, symlinks included "
            "(relative, no '..', no '\\\\' or ':', real path inside the folder of the model as named or of its real file)",
        ],
    }


def schema_text() -> str:
    """The committed manifest.schema.json, byte for byte."""
    return json.dumps(json_schema(), indent=2, sort_keys=False, ensure_ascii=False) + "\n"


# ---------------------------------------------------------------------------------------------
# Initial states in the metadata
# ---------------------------------------------------------------------------------------------
def encode_state(arrays: dict) -> str:
    """Arrays -> base64 text of an .npz (how a learned initial state travels in the metadata)."""
    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_state(text: str) -> dict:
    """base64 text of an .npz -> arrays (no pickle); damaged text is a RuntimeUserError."""
    import binascii
    import zipfile

    import numpy as np

    try:
        with np.load(io.BytesIO(base64.b64decode(text, validate=True)), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (binascii.Error, ValueError, OSError, EOFError, zipfile.BadZipFile, TypeError) as e:
        raise RuntimeUserError(f"the embedded state is damaged ({str(e)[:80]})") from None


def _main(argv=None) -> int:
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m rwkv_runtime.manifest")
    ap.add_argument("--schema", action="store_true", help="print the manifest's JSON Schema")
    args = ap.parse_args(argv)
    if not args.schema:
        ap.print_help()
        return 2
    sys.stdout.write(schema_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
