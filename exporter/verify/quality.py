"""What reduced precision costs: the exported model against the PyTorch reference (float32) on a
held-out text, both stepping token by token with their own state (errors accumulate as in use)."""

from __future__ import annotations

import numpy as np

# A short text none of the models were trained on (written for this project).
HELD_OUT_TEXT = (
    "The lighthouse keeper wrote in his log every evening, even when nothing had happened. On the "
    "third night of the storm he noted that the lamp had been cleaned twice, that the supply boat "
    "was late, and that the gulls had gone quiet. In the morning the sea was flat and grey, and a "
    "small boat with a red sail came around the northern rocks. He counted the crates as they were "
    "carried up the steps: flour, oil, two boxes of candles, and a letter from his sister.\n"
    "def moving_average(values, window):\n"
    "    total = sum(values[:window])\n"
    "    out = [total / window]\n"
    "    for i in range(window, len(values)):\n"
    "        total += values[i] - values[i - window]\n"
    "        out.append(total / window)\n"
    "    return out\n"
)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def compare_to_reference(onnx_path, checkpoint, max_tokens: int = 256) -> dict:
    """Cross-entropy (nats/token) of the reference and of the export on HELD_OUT_TEXT, the max
    absolute logit error and the greedy (argmax) agreement per step."""
    import torch

    import rwkv_runtime

    from ..export import reference_model

    s = rwkv_runtime.Session(onnx_path)
    try:
        ids = s.encode(HELD_OUT_TEXT)[: max_tokens + 1]
    except rwkv_runtime.RuntimeUserError:  # no tokenizer: the text's bytes stand in as token ids
        ids = list(HELD_OUT_TEXT.encode("utf-8"))[: max_tokens + 1]
    ids = [i for i in ids if i < s.vocab_size]
    ref = reference_model(checkpoint)
    ms, logits = None, []
    with torch.no_grad():
        # the reference's sequence form: every position's logits in one pass (stepping the PyTorch model
        # token by token made this report most of a quantised export's time, issue #30)
        R = ref.sequence(torch.tensor([ids[:-1]]), ref.new_state(1))[0][0].float().numpy()
    for t in ids[:-1]:
        lo, ms = s.step(np.array([t]), ms)
        logits.append(lo[0])
    M = np.stack(logits)
    tgt = np.array(ids[1:])
    ce_ref = float(-_log_softmax(R)[np.arange(len(tgt)), tgt].mean())
    ce = float(-_log_softmax(M)[np.arange(len(tgt)), tgt].mean())
    return {
        "tokens": len(tgt),
        "ce_reference": ce_ref,
        "ce_model": ce,
        "ce_change": (ce - ce_ref) / ce_ref,
        "max_abs_logit_error": float(np.abs(R - M).max()),
        "argmax_agreement": float((R.argmax(1) == M.argmax(1)).mean()),
        "finite": bool(np.isfinite(M).all()),
    }
