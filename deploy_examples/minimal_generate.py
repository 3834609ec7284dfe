"""The smallest embedding of rwkv_runtime: numpy + onnxruntime, no torch.

python deploy_examples/minimal_generate.py build/default.onnx "def main("
"""

import sys

import numpy as np

import rwkv_runtime


def main(model: str, prompt: str, n: int = 64) -> str:
    s = rwkv_runtime.Session(model)
    # the low-level loop: prefill the prompt, then step one token at a time, greedy
    logits, state = s.prefill(np.array([s.encode(prompt)]))
    out = []
    for _ in range(n):
        tok = int(np.argmax(logits[0]))
        out.append(tok)
        logits, state = s.step(np.array([tok]), state)
    return s.decode(out)


if __name__ == "__main__":
    print(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "\n"))
