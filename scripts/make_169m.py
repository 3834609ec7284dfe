"""Write a random-weights checkpoint shaped like the 169M/0.1B models of an RWKV version, for benchmarks.

    python scripts/make_169m.py [--version 4|5|6|7] [-o build/rwkv4-169m-random.pth]

RWKV-4-169M: 12 x 768, ffn 3072, vocab 50277. RWKV-5/6/7 0.1B (World): 12 x 768, head size 64,
vocab 65536, ffn 3072 (RWKV-6: 2688), LoRA sizes as BlinkDL's 0.1B models. The keys and shapes come
from the version's own ``expected_shapes`` (the ArchSpec's key check), so the file loads as a real
checkpoint of that version. Values are random but in the ranges training produces (mixes in [0,1],
decays giving factors in (0,1), small matrices), so every figure measured on it is representative.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CFG = {
    "4": {"n_layer": 12, "n_embd": 768, "vocab_size": 50277, "ffn_dim": 3072, "dim_att": 768},
    "5": {
        "n_layer": 12,
        "n_embd": 768,
        "vocab_size": 65536,
        "ffn_dim": 3072,
        "n_head": 12,
        "head_size": 64,
        "gate": True,
        "per_channel_decay": True,
        "bonus": "time_faaaa",
    },
    "6": {
        "n_layer": 12,
        "n_embd": 768,
        "vocab_size": 65536,
        "ffn_dim": 2688,
        "n_head": 12,
        "head_size": 64,
        "dim_maa": 32,
        "dim_decay": 64,
    },
    "7": {
        "n_layer": 12,
        "n_embd": 768,
        "vocab_size": 65536,
        "ffn_dim": 3072,
        "n_head": 12,
        "head_size": 64,
        "dim_w": 64,
        "dim_a": 64,
        "dim_v": 32,
        "dim_g": 128,
    },
}


def random_weights(version: str, seed: int = 0) -> dict:
    from rwkv_export.arch import rwkv4, rwkv5, rwkv6, rwkv7

    mod = {"4": rwkv4, "5": rwkv5, "6": rwkv6, "7": rwkv7}[version]
    cfg = CFG[version]
    g = torch.Generator().manual_seed(seed)
    w = {}
    for k, shape in mod.expected_shapes(cfg).items():
        vector = sum(d > 1 for d in shape) == 1
        if k.endswith(("ln0.weight", "ln1.weight", "ln2.weight", "ln_out.weight", "ln_x.weight")):
            t = torch.ones(shape)
        elif k.endswith(".bias"):
            t = torch.zeros(shape)
        elif k.endswith(".weight"):  # the large matrices and the embedding
            t = torch.randn(shape, generator=g) * (0.5 / shape[-1] ** 0.5)
        elif k.endswith("att.time_decay"):
            t = torch.rand(shape, generator=g) * 2 - 1  # exp(-exp(.)) in (0.07, 0.69)
        elif vector:  # mixing vectors, LoRA offsets
            t = torch.rand(shape, generator=g)
        else:  # LoRA matrices, per-head bonuses
            t = torch.randn(shape, generator=g) * 0.05
        w[k] = t.contiguous()
    mod.config_from_weights(w)  # the version's own key and shape check
    return w


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--version", choices=sorted(CFG), default="4")
    ap.add_argument("-o", "--out")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    out = Path(a.out or f"build/rwkv{a.version}-169m-random.pth")
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(random_weights(a.version, a.seed), out)
    print(out)


if __name__ == "__main__":
    main()
