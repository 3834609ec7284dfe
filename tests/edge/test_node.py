"""The JavaScript runtime on Node.js (onnxruntime-node) gives the Python runtime's answers: per-step
logits within 1e-5, prefill = stepping, the same greedy and seeded generations, states exchanged as
.npz both ways, the World and 20B tokenizers token for token. Runs `node --test` in js/."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ref_model

from .conftest import MODELS, PROMPT, counts_ok, failures, node_ready, run_node_tests

pytestmark = pytest.mark.slow


def _api_case(d: Path) -> None:
    """The Python runtime's answers for the JS API-parity tests (js/test/api.test.js), as d/api.json:
    generate's text (greedy, each model), continuing from a generation's own state, prefill_many of
    ragged prompts, an initial state, and an export without a tokenizer."""
    from rwkv_export.export import ExportOptions, export
    from rwkv_runtime import Session

    models = json.loads((d / "cases.json").read_text())["models"]
    texts = {
        c["name"]: "".join(Session(c["model"]).generate(bytes(c["prompt"]).decode(), 40, temperature=0)) for c in models
    }
    s = Session(models[0]["model"])
    gen = s.generate(PROMPT.decode(), 12, temperature=0)
    text = "".join(gen)
    after, _ = s.step(np.array([ord("!")]), gen.state)
    prompts = [list(b"Hi"), list(PROMPT), list(b"The atom")]
    many_logits, many_state = s.prefill_many(prompts)
    many_state.save(d / "many.state.npz")
    _, tuned = s.prefill(np.array([list(b"You are a helpful assistant.")]))
    tuned.save(d / "initial.state.npz")
    s.set_initial_state(d / "initial.state.npz")
    from_initial, _ = s.prefill(np.array([list(b"Hi")]))
    (d / "notok").mkdir(exist_ok=True)
    none = export(ref_model(MODELS["v4"]), d / "notok" / "notok.onnx", ExportOptions(tokenizer="none"))[0]
    (d / "api.json").write_text(
        json.dumps(
            {
                "greedy_texts": texts,
                "model": models[0]["model"],
                "generated_text": text,
                "continue_token": ord("!"),
                "continue_logits": after[0].tolist(),
                "many_prompts": prompts,
                "many_logits": many_logits.tolist(),
                "many_state": str(d / "many.state.npz"),
                "initial_state": str(d / "initial.state.npz"),
                "initial_prompt": list(b"Hi"),
                "initial_logits": from_initial[0].tolist(),
                "no_tokenizer": str(none),
            }
        )
    )


@pytest.fixture(scope="module")
def node_run(edge_fixtures):
    why = node_ready()
    if why:
        pytest.skip(why)
    _api_case(edge_fixtures)
    return run_node_tests(
        edge_fixtures, ["test/units.test.js", "test/node.test.js", "test/api.test.js", "test/conformance.test.js"]
    )


def test_node_suite_passes(node_run):
    """Every `node --test` case passes (none skipped: the fixtures are there)."""
    out = node_run.stdout + node_run.stderr
    assert node_run.returncode == 0 and counts_ok(out), failures(out)


@pytest.mark.parametrize("name", [*MODELS.values(), "tiny4-ext", "golden-rwkv6-tuned"])
def test_state_saved_by_js_loads_in_python(node_run, edge_fixtures, name):
    """JS's State.save bytes are an .npz numpy reads and the Python runtime continues from."""
    from rwkv_runtime import Session

    assert node_run.returncode == 0
    s = Session(next(edge_fixtures.rglob(f"{name}.onnx")))
    js_state = s.load_state(edge_fixtures / f"{name}.js-state.npz")
    _, py_state = s.prefill(np.array([list(b"Describe the structure of an atom.")]))
    for k in py_state.keys():
        np.testing.assert_allclose(js_state[k], py_state[k], atol=1e-5, rtol=0)
