"""Realistic feeds for ``polygraphy run`` on an exported RWKV model: a short rollout of the model itself.

RWKV's state is not random data: RWKV-4's running maximum ``wkv_pp`` starts at -1e30 and the WKV
numerator and denominator are scaled by ``exp(-wkv_pp)``; RWKV-5/6/7 states are sums of outer
products. Polygraphy's default random inputs are therefore meaningless for the state inputs. This
script starts from the model's own initial state (from its manifest), feeds a prompt and the
model's greedy continuation, and yields each call's inputs: the token(s) and the state before them.
It uses onnxruntime and ``rwkv_runtime`` only (no torch, no reference checkpoint).

    RWKV_MODEL=build/default.onnx polygraphy run build/default.onnx --onnxrt \\
        --data-loader-script deploy_examples/polygraphy_data_loader.py:load_data

Environment:
    RWKV_MODEL   the exported .onnx (step or sequence graph) whose own rollout makes the feeds;
                 normally the model given to polygraphy run (required)
    RWKV_STEPS   tokens in the rollout (default 16)
    RWKV_PROMPT  its start, encoded with the model's tokenizer (default: the start token 0)
    RWKV_CHUNK   sequence graph: tokens per call (default 8)
"""

import os
from collections import OrderedDict

import numpy as np

DTYPES = {"float32": np.float32, "float16": np.float16}


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise SystemExit(f"{name} must be a whole number, not {raw!r}") from None
    if value < 1:
        raise SystemExit(f"{name} must be at least 1, not {value}")
    return value


def load_data():
    import onnxruntime as ort

    from rwkv_runtime.manifest import INITIAL_STATE_KEY, MANIFEST_KEY, TOKENIZER_KEY, Manifest, decode_state
    from rwkv_runtime.tokenizers import make_tokenizer

    path = os.environ.get("RWKV_MODEL")
    if not path or not os.path.isfile(path):
        raise SystemExit(
            "set RWKV_MODEL to the exported .onnx file (the step or the sequence graph)"
            + (f"; {path} does not exist" if path else "")
        )
    steps = _env_int("RWKV_STEPS", 16)
    chunk = _env_int("RWKV_CHUNK", 8)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    props = sess.get_modelmeta().custom_metadata_map
    if MANIFEST_KEY not in props:
        raise SystemExit(f"{path} has no rwkv manifest: was it exported by rwkv-export?")
    man = Manifest.from_json(props[MANIFEST_KEY])
    seq = man.graph == "sequence"

    state = OrderedDict((s.name, np.full(s.concrete_shape(1), s.init, dtype=DTYPES[s.dtype])) for s in man.state)
    if man.initial_state == "embedded":  # a learned starting state (state tuning)
        for name, value in decode_state(props.get(INITIAL_STATE_KEY, "")).items():
            state[name][...] = value[:1]
    start = OrderedDict((k, v.copy()) for k, v in state.items())

    def run(tokens, st):
        feed = OrderedDict([(man.tokens_input, tokens)])
        feed.update(st)
        outs = sess.run([man.logits_output] + [s.output for s in man.state], feed)
        logits = outs[0][:, -1] if outs[0].ndim == 3 else outs[0]
        return logits, OrderedDict((s.name, o) for s, o in zip(man.state, outs[1:]))

    def shaped(ids):
        return np.array([ids] if seq else ids, dtype=np.int64)

    prompt = os.environ.get("RWKV_PROMPT")
    ids = list(make_tokenizer(man.tokenizer, props.get(TOKENIZER_KEY)).encode(prompt)) if prompt else [0]
    ids = ids[:steps]
    # the token sequence: the prompt, then the model's own greedy continuation, one token per call
    st = OrderedDict((k, v.copy()) for k, v in start.items())
    for t in ids[:-1]:
        _, st = run(shaped([t]), st)
    while len(ids) < steps:
        logits, st = run(shaped([ids[-1]]), st)
        ids.append(int(logits[0].argmax()))
    # the feeds: the model's own state carried from call to call (chunks for a sequence graph)
    pieces = [ids[i : i + chunk] for i in range(0, len(ids), chunk)] if seq else [[t] for t in ids]
    st = start
    for piece in pieces:
        feed = OrderedDict([(man.tokens_input, shaped(piece))])
        feed.update((k, v.copy()) for k, v in st.items())
        yield feed
        _, st = run(shaped(piece), st)
