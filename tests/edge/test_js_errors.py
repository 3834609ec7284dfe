"""The JavaScript runtime's error contract (docs/errors.md) on the default model: tampered manifests,
foreign companions, missing/truncated weights files, damaged embedded states, bad tokens, states and
settings, and concurrent generations each give one RuntimeUserError or the right answer; greedy and
seeded generations equal the Python runtime's token for token. Runs `node --test test/errors.test.js`."""

from __future__ import annotations

import json

import pytest

from .conftest import counts_ok, failures, node_export, run_node_tests

pytestmark = pytest.mark.slow

PROMPT = list(b"Describe the structure of an atom.")
GENERATIONS = [  # settings both runtimes must agree on token for token (200 tokens each)
    {"temperature": 0},
    {"temperature": 1.0, "top_p": 0.85, "seed": 7},
    {"temperature": 0.7, "top_p": 0.95, "top_k": 20, "presence_penalty": 0.4, "frequency_penalty": 0.3, "seed": 9},
]


@pytest.fixture(scope="module")
def audit_dir(tmp_path_factory):
    from rwkv_export import DEFAULT_MODEL  # the tiny RWKV-4 the project ships
    from rwkv_export.export import ExportOptions, export
    from rwkv_runtime import SamplingParams, Session

    # self-contained graphs (the tests tamper with and copy single .onnx files); ext/: external data
    d, _ = node_export(tmp_path_factory, "js-audit")
    (d / "ext").mkdir()
    (d / "other").mkdir()
    export(DEFAULT_MODEL, d / "ext" / "m.onnx", ExportOptions(external_data=True))
    export(
        DEFAULT_MODEL, d / "other" / "m.onnx", ExportOptions(external_data=False)
    )  # same checkpoint, another export id
    s = Session(d / "m.onnx")
    gens = [{"params": p, "tokens": list(s.generate_tokens(PROMPT, 200, SamplingParams(**p)))} for p in GENERATIONS]
    (d / "audit.json").write_text(
        json.dumps({"dir": str(d), "other": str(d / "other"), "prompt": PROMPT, "generations": gens})
    )
    return d


def test_js_errors_suite_passes(audit_dir):
    r = run_node_tests(audit_dir, ["test/errors.test.js"], env_extra={"RWKV_AUDIT_DIR": str(audit_dir)})
    out = r.stdout + r.stderr
    assert r.returncode == 0 and counts_ok(out), failures(out)
