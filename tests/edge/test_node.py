"""The JavaScript runtime on Node.js (onnxruntime-node) gives the Python runtime's answers: per-step
logits within 1e-5, prefill = stepping, the same greedy and seeded generations, states exchanged as
.npz both ways, the World and 20B tokenizers token for token. Runs `node --test` in js/."""
from __future__ import annotations

import numpy as np
import pytest

from .conftest import MODELS, counts_ok, failures, node_ready, run_node_tests

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def node_run(edge_fixtures):
    why = node_ready()
    if why:
        pytest.skip(why)
    return run_node_tests(edge_fixtures, ["test/units.test.js", "test/node.test.js"])


def test_node_suite_passes(node_run):
    """Every `node --test` case passes (none skipped: the fixtures are there)."""
    out = node_run.stdout + node_run.stderr
    assert node_run.returncode == 0 and counts_ok(out), failures(out)


@pytest.mark.parametrize("name", [*MODELS.values(), "tiny4-ext", "tiny-rwkv-6v0-1m-tuned"])
def test_state_saved_by_js_loads_in_python(node_run, edge_fixtures, name):
    """JS's State.save bytes are an .npz numpy reads and the Python runtime continues from."""
    from rwkv_runtime import Session

    assert node_run.returncode == 0
    s = Session(next(edge_fixtures.rglob(f"{name}.onnx")))
    js_state = s.load_state(edge_fixtures / f"{name}.js-state.npz")
    _, py_state = s.prefill(np.array([list(b"Describe the structure of an atom.")]))
    for k in py_state.keys():
        np.testing.assert_allclose(js_state[k], py_state[k], atol=1e-5, rtol=0)
