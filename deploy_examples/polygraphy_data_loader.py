"""Realistic inputs for ``polygraphy run``: states from a short rollout of the exported model itself.

RWKV's state is not random data (RWKV-4's running maximum starts at -1e30, the WKV numerator and
denominator are scaled by it), so random feeds are meaningless. This loader steps the model from its
fresh state with onnxruntime (no torch) and yields the feeds it saw.

    RWKV_MODEL=build/default.onnx polygraphy run build/default.onnx --onnxrt \\
        --data-loader-script deploy_examples/polygraphy_data_loader.py:load_data

Environment: RWKV_MODEL (required; the step or sequence graph), RWKV_STEPS (default 16),
RWKV_SEED (default 0: the tokens of the rollout are drawn at random from the vocabulary).
"""
import os
from collections import OrderedDict

import numpy as np


def load_data():
    import rwkv_runtime

    path = os.environ.get("RWKV_MODEL")
    if not path:
        raise SystemExit("set RWKV_MODEL to the exported .onnx file")
    steps = int(os.environ.get("RWKV_STEPS", "16"))
    rng = np.random.default_rng(int(os.environ.get("RWKV_SEED", "0")))
    s = rwkv_runtime.Session(path)
    man = s.manifest
    state = s.new_state(1)
    for _ in range(steps):
        tok = rng.integers(0, man.vocab_size, size=1)
        feed = OrderedDict([(man.tokens_input, tok[None, :] if man.graph == "sequence" else tok)])
        feed.update(state.numpy())
        yield feed
        _, state = s.step(tok, state)
