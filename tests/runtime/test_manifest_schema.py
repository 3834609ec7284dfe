"""The manifest declared once (runtime/manifest.py's field tables): the committed JSON Schema copies equal
what the tables emit, and the shared conformance fixtures (tests/conformance/, also run by the JS
runtime) give the verdicts they state -- through the runtime's validator and, independently, through the
`jsonschema` library reading the committed schema."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rwkv_runtime import RuntimeUserError
from rwkv_runtime.artifact import parse_manifest
from rwkv_runtime.manifest import MANIFEST_FIELDS, STATE_FIELDS, Manifest, StateSpec, schema_text

REPO = Path(__file__).resolve().parents[2]
CONFORMANCE = REPO / "tests" / "conformance"
SCHEMA_COPIES = [REPO / "runtime" / "manifest.schema.json", REPO / "js" / "src" / "manifest.schema.json"]
MANIFESTS = json.loads((CONFORMANCE / "manifests.json").read_text())
STATES = json.loads((CONFORMANCE / "states.json").read_text())


@pytest.mark.parametrize("copy_path", SCHEMA_COPIES, ids=lambda p: str(p.relative_to(REPO)))
def test_committed_schema_is_the_emitted_one(copy_path):
    assert copy_path.read_text(encoding="utf-8") == schema_text(), (
        f"regenerate: python -m rwkv_runtime.manifest --schema > {copy_path.relative_to(REPO)}"
    )


def test_schema_command_prints_it():
    r = subprocess.run([sys.executable, "-m", "rwkv_runtime.manifest", "--schema"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == schema_text()


def test_the_dataclasses_come_from_the_tables():
    assert list(Manifest.__dataclass_fields__) == [f.name for f in MANIFEST_FIELDS]
    assert list(StateSpec.__dataclass_fields__) == [f.name for f in STATE_FIELDS]
    schema = json.loads(schema_text())
    assert list(schema["properties"]) == [f.name for f in MANIFEST_FIELDS]
    assert list(schema["$defs"]["state"]["properties"]) == [f.name for f in STATE_FIELDS]
    a, b = Manifest("rwkv4", 1, 4, 8), Manifest("rwkv4", 1, 4, 8)
    a.tokenizer["kind"] = "world"
    assert b.tokenizer == {"kind": "bytes"}  # mutable defaults are not shared


def _manifest_text(case) -> str:
    if "raw" in case:
        return case["raw"]
    d = copy.deepcopy(MANIFESTS["base"])
    for k in case.get("delete", []):
        d.pop(k, None)
    d.update(copy.deepcopy(case.get("set", {})))
    return json.dumps(d)


@pytest.mark.parametrize("case", MANIFESTS["cases"], ids=lambda c: c["name"])
def test_manifest_conformance(case):
    text = _manifest_text(case)
    if case["valid"]:
        m = parse_manifest(text, "m.onnx")
        assert json.loads(m.to_json())["state"][0]["name"] == json.loads(text)["state"][0]["name"]
        parse_manifest(m.to_json(), "m.onnx")  # what the exporter would write reads back
    else:
        with pytest.raises(RuntimeUserError) as e:
            parse_manifest(text, "m.onnx")
        assert case["error"] in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("case", [c for c in MANIFESTS["cases"] if c["schema"]], ids=lambda c: c["name"])
def test_the_committed_schema_agrees(case):
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA_COPIES[0].read_text()))
    assert validator.is_valid(json.loads(_manifest_text(case))) == case["valid"]


def _array(spec):
    fill = float("nan") if spec["fill"] == "nan" else spec["fill"]
    return np.full(spec["shape"], fill, dtype=spec["dtype"])


@pytest.mark.parametrize("case", STATES["cases"], ids=lambda c: c["name"])
def test_state_conformance(case):
    from rwkv_runtime.state import check_state_arrays

    specs = parse_manifest(json.dumps(STATES["manifest"]), "m.onnx").state
    arrays = {k: _array(v) for k, v in case["arrays"].items()}
    if case["valid"]:
        out = check_state_arrays(arrays, specs, "s.npz", case["batch"])
        for k, a in out.items():
            spec = next(s for s in specs if s.name == k)
            assert a.dtype == np.dtype(spec.dtype) and np.array_equal(a, arrays[k].astype(spec.dtype))
    else:
        with pytest.raises(RuntimeUserError) as e:
            check_state_arrays(arrays, specs, "s.npz", case["batch"])
        assert case["error"] in str(e.value)
