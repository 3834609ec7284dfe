"""Several conversations sharing one batch (what an app or a small server does): each has its own
state row and sampling settings; conversations join and leave between steps.

    python deploy_examples/multi_conversation.py build/default.onnx
"""

import sys

import rwkv_runtime
from rwkv_runtime import BatchGenerator, SamplingParams


def main(model: str, steps: int = 40) -> dict:
    s = rwkv_runtime.Session(model)
    gen = BatchGenerator(s)
    convs = {
        gen.add("import os\n", SamplingParams(temperature=0)): "greedy",
        gen.add("class Point:\n", SamplingParams(temperature=0.8, top_p=0.9, seed=1)): "sampled",
    }
    texts = {}
    for i in range(steps):
        gen.step()
        if i == steps // 2:  # a third conversation joins halfway
            convs[gen.add("def add(a, b):\n", SamplingParams(temperature=0))] = "late joiner"
    for seq_id, name in convs.items():
        texts[name] = s.decode(gen.remove(seq_id))
    return texts


if __name__ == "__main__":
    for name, text in main(sys.argv[1]).items():
        print(f"--- {name}\n{text}")
