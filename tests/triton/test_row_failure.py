"""Per-request failure in the Triton Python model (issue #24): the one-token steps of several sequences
run as one batch; when one sequence's step fails, the batch is retried sequence by sequence, so that
request alone gets the error (INTERNAL, one line; the traceback in the log) and the others get the
logits they get alone. (The whole batch used to fail with it.)"""

from __future__ import annotations

import logging

import numpy as np

import rwkv_runtime
from rwkv_export.targets.triton import write_repository  # noqa: E402 - after the skip in test_python_model

from .test_python_model import INTERNAL, load_model, logits, pb_utils, req  # noqa: F401 - pb_utils: a fixture


def test_a_failing_step_fails_its_request_alone(triton_exports, tmp_path, pb_utils, monkeypatch, caplog):  # noqa: F811
    model = load_model(write_repository(triton_exports["rwkv4"], tmp_path / "repo", "python", max_batch=4, name="py"))
    s = rwkv_runtime.Session(triton_exports["rwkv4"])
    prompts = {1: [65, 66], 2: [67, 68], 3: [69, 70]}
    for r in model.execute([req(p, k, start=True) for k, p in prompts.items()]):
        logits(r)
    real = model.session.step

    def step(tokens, state=None):
        if 99 in np.asarray(tokens).reshape(-1).tolist():
            raise RuntimeError("injected step failure\nsecond line")
        return real(tokens, state)

    monkeypatch.setattr(model.session, "step", step)
    with caplog.at_level(logging.ERROR):
        out = model.execute([req([71], 1), req([99], 2), req([72], 3)])
    assert out[1].error.code == INTERNAL
    assert out[1].error.message() == "internal error (RuntimeError: injected step failure)"
    for r, (k, t) in zip((out[0], out[2]), ((1, 71), (3, 72))):
        np.testing.assert_allclose(logits(r)[0], s.prefill(np.array([prompts[k] + [t]]))[0][0], atol=1e-5)
    assert "Traceback" in caplog.text and "injected step failure" in caplog.text
    # the failed request changed nothing: its sequence continues from where it was
    (r,) = model.execute([req([73], 2)])
    np.testing.assert_allclose(logits(r)[0], s.prefill(np.array([prompts[2] + [73]]))[0][0], atol=1e-5)
