"""Write a random-weights RWKV-4 checkpoint shaped like RWKV-4-169M (12 x 768, vocab 50277), for benchmarks."""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.helpers import random_rwkv4  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("-o", "--out", default="build/rwkv4-169m-random.pth")
a = ap.parse_args()
Path(a.out).parent.mkdir(parents=True, exist_ok=True)
random_rwkv4(Path(a.out), n_embd=768, n_layer=12, ffn=3072, vocab=50277, seed=0)
print(a.out)
