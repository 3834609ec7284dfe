"""Tiny golden models in the repository, so the tests stand alone (no files from outside the checkout).

For each architecture (RWKV-4, 5.0 = no gate, 5.2, 6, 7) this writes a BlinkDL-layout checkpoint
``golden-<arch>.pth`` (torch.save of a plain dict of float32 tensors, the official key layout) with
random weights at realistic scales, and the logits BlinkDL's own package (``rwkv`` 0.8.32, strategy
``cpu fp32``, one token at a time, from its own initial state) computes for two byte prompts, as
``golden-<arch>.blinkdl-logits-<prompt>.npy`` ([T, 256] float32, the logits after each token).

The weights are fixed by the seeds below: ``python tests/golden/make_golden.py`` regenerates the same
tensors (and, with the same torch/rwkv versions, the same logits); ``--check`` regenerates into a
temporary folder and compares instead of writing. tests/golden/test_golden.py checks both.

Scales (so every part of a block matters, unlike a model whose channel mix is ~0):
    matrices ~ N(0, 1/fan_in) (each branch adds O(1) to the residual), the head ~ N(0, 2.25/C) (logits ~ 1.5),
    layer norms 1 + N(0, 0.1^2), token-shift mixes ~ U(0, 1),
    decays on a per-channel (per-head for 5.0) ramp as in BlinkDL's initialisation, so the per-token
    decay factor spans ~0.99 (long memory) to ~0 (forget at once),
    RWKV-6/7 LoRA (data-dependent mixes, decay, a, v, gate) large enough to move their targets by ~0.2-0.5.
Shapes mirror the trained tiny models these tests used before (n_embd 64, vocab 256 = bytes, 8 heads of 8
for 5/6, 1 head of 64 for 7) with 2 layers and a smaller FFN to keep each file near 0.5 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PROMPTS = {"in": b'"in', "atom": b"Describe the structure of an atom."}
C, V, L, F = 64, 256, 2, 128  # n_embd, vocab (bytes), layers, ffn size
ARCHS = {  # name -> (seed, builder name, needs RWKV_V7_ON for BlinkDL's package)
    "golden-rwkv4": (4, "v4", False),
    "golden-rwkv5": (50, "v5.0", False),
    "golden-rwkv5.2": (52, "v5.2", False),
    "golden-rwkv6": (6, "v6", False),
    "golden-rwkv7": (7, "v7", True),
}


def _rng(seed):
    import torch

    g = torch.Generator().manual_seed(seed)

    def rn(*shape, s=1.0):
        return torch.randn(*shape, generator=g) * s

    def ru(*shape):
        return torch.rand(*shape, generator=g)

    return rn, ru


def _ramp(n, lo, hi, layer, rn):
    """BlinkDL-style decay initialisation: lo..hi over channels, curvature varying by layer, a little noise."""
    import torch

    x = torch.arange(n, dtype=torch.float32) / (n - 1)
    ratio = layer / max(L - 1, 1)
    return lo + (hi - lo) * x ** (0.7 + 1.3 * ratio) + rn(n, s=0.1)


def _common(rn, ln_x=True):
    w = {
        "emb.weight": rn(V, C, s=0.5),
        "blocks.0.ln0.weight": 1 + rn(C, s=0.1),
        "blocks.0.ln0.bias": rn(C, s=0.1),
        "ln_out.weight": 1 + rn(C, s=0.1),
        "ln_out.bias": rn(C, s=0.1),
        "head.weight": rn(V, C, s=1.5 * C**-0.5),
    }
    for i in range(L):
        b = f"blocks.{i}."
        w.update(
            {
                b + "ln1.weight": 1 + rn(C, s=0.1),
                b + "ln1.bias": rn(C, s=0.1),
                b + "ln2.weight": 1 + rn(C, s=0.1),
                b + "ln2.bias": rn(C, s=0.1),
            }
        )
        if ln_x:
            w.update({b + "att.ln_x.weight": 1 + rn(C, s=0.1), b + "att.ln_x.bias": rn(C, s=0.1)})
    return w


def _mats(w, rn, b, shapes):
    for n, shape in shapes.items():
        w[b + n + ".weight"] = rn(*shape, s=shape[1] ** -0.5)


def _ffn(w, rn, b):
    _mats(w, rn, b, {"ffn.key": (F, C), "ffn.value": (C, F)})


def build(kind: str, seed: int) -> dict:
    """The checkpoint dict (float32 tensors, BlinkDL key layout) for one architecture."""
    rn, ru = _rng(seed)
    w = _common(rn, ln_x=kind != "v4")
    H = 1 if kind == "v7" else 8
    N = C // H
    for i in range(L):
        b = f"blocks.{i}."
        if kind in ("v4", "v5.0", "v5.2"):
            mixes = {"v4": "kvr", "v5.0": "kvr", "v5.2": "kvrg"}[kind]
            for m in mixes:
                w[b + "att.time_mix_" + m] = ru(1, 1, C)
            w[b + "ffn.time_mix_k"], w[b + "ffn.time_mix_r"] = ru(1, 1, C), ru(1, 1, C)
            if kind == "v4":  # w = -exp(time_decay) per channel; bonus time_first
                w[b + "att.time_decay"] = _ramp(C, -5.0, 3.0, i, rn)
                w[b + "att.time_first"] = rn(C, s=0.5)
            elif kind == "v5.0":  # per head: w = exp(-exp(time_decay)), u = exp(time_first)
                w[b + "att.time_decay"] = _ramp(H, -4.0, 1.0, i, rn)
                w[b + "att.time_first"] = rn(H, s=0.3) - 0.5
            else:  # 5.2: per channel [H, N], u = time_faaaa (raw)
                w[b + "att.time_decay"] = _ramp(C, -6.0, 1.0, i, rn).reshape(H, N)
                w[b + "att.time_faaaa"] = rn(H, N, s=0.3)
            _mats(
                w,
                rn,
                b,
                {
                    "att.key": (C, C),
                    "att.value": (C, C),
                    "att.receptance": (C, C),
                    "att.output": (C, C),
                    **({"att.gate": (C, C)} if kind == "v5.2" else {}),
                    "ffn.receptance": (C, C),
                },
            )
        elif kind == "v6":
            D, E = 8, 16  # token-shift LoRA, decay LoRA
            for m in "xwkvrg":
                w[b + "att.time_maa_" + m] = ru(1, 1, C)
            w.update(
                {
                    b + "att.time_maa_w1": rn(C, 5 * D, s=0.1),
                    b + "att.time_maa_w2": rn(5, D, C, s=0.15),
                    b + "att.time_decay": _ramp(C, -6.0, 0.0, i, rn).reshape(1, 1, C),
                    b + "att.time_decay_w1": rn(C, E, s=0.1),
                    b + "att.time_decay_w2": rn(E, C, s=0.2),
                    b + "att.time_faaaa": rn(H, N, s=0.3),
                    b + "ffn.time_maa_k": ru(1, 1, C),
                    b + "ffn.time_maa_r": ru(1, 1, C),
                }
            )
            _mats(
                w,
                rn,
                b,
                {
                    "att.key": (C, C),
                    "att.value": (C, C),
                    "att.receptance": (C, C),
                    "att.output": (C, C),
                    "att.gate": (C, C),
                    "ffn.receptance": (C, C),
                },
            )
        else:  # v7; block 0 has no v0/v1/v2 (unused there; the trained tiny model had none either)
            dims = {"w": 16, "a": 16, "v": 8, "g": 32}
            for m in "rwkvag":
                w[b + "att.x_" + m] = ru(1, 1, C)
            for n, d in dims.items():
                if n == "v" and i == 0:
                    continue
                w[b + f"att.{n}1"] = rn(C, d, s=0.1)
                w[b + f"att.{n}2"] = rn(d, C, s=0.3 if n == "g" else 0.15)
            w[b + "att.w0"] = _ramp(C, -5.0, 1.0, i, rn).reshape(1, 1, C)
            w[b + "att.a0"] = rn(1, 1, C, s=0.5)
            if i > 0:
                w[b + "att.v0"] = rn(1, 1, C, s=0.5)
            w.update(
                {
                    b + "att.k_k": 0.85 + rn(1, 1, C, s=0.1),
                    b + "att.k_a": 1 + rn(1, 1, C, s=0.1),
                    b + "att.r_k": rn(H, N, s=0.3),
                    b + "ffn.x_k": ru(1, 1, C),
                }
            )
            _mats(w, rn, b, {"att.key": (C, C), "att.value": (C, C), "att.receptance": (C, C), "att.output": (C, C)})
        _ffn(w, rn, b)
    return {k: v.float().contiguous() for k, v in w.items()}


# BlinkDL's package, run in a child process: RWKV_V7_ON must be set before it is imported.
_BLINKDL = r"""
import json, sys
import numpy as np
from rwkv.model import RWKV
path, prompts, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
import os
kw = {} if os.environ.get("RWKV_V7_ON") == "1" else {"verbose": False}
model = RWKV(path[:-4], strategy="cpu fp32", **kw)
res = {}
for name, tokens in prompts.items():
    state, rows = None, []
    for t in tokens:
        logits, state = model.forward([t], state)
        rows.append(logits.float().numpy().copy())
    res[name] = np.stack(rows).astype(np.float32)
np.savez(out, **res)
"""


def blinkdl_logits(path: Path, v7: bool, timeout: float = 300) -> dict:
    """{prompt name: [T, V] float32} from BlinkDL's package on ``path`` (a child process)."""
    env = {
        **os.environ,
        "RWKV_JIT_ON": "0",
        "RWKV_CUDA_ON": "0",
        "RWKV_V7_ON": "1" if v7 else "0",
        "OMP_NUM_THREADS": "1",
    }
    prompts = json.dumps({k: list(v) for k, v in PROMPTS.items()})
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "logits.npz"
        r = subprocess.run(
            [sys.executable, "-c", _BLINKDL, str(path), prompts, str(out)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if r.returncode:
            raise RuntimeError(f"BlinkDL's rwkv package failed on {path.name}: {r.stderr[-500:]}")
        return dict(np.load(out))


def write(folder: Path, names=None, logits: bool = True) -> list[Path]:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names or ARCHS:
        seed, kind, v7 = ARCHS[name]
        path = folder / f"{name}.pth"
        torch.save(build(kind, seed), path)
        written.append(path)
        if logits:
            for prompt, arr in blinkdl_logits(path, v7).items():
                np.save(folder / f"{name}.blinkdl-logits-{prompt}.npy", arr)
                written.append(folder / f"{name}.blinkdl-logits-{prompt}.npy")
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE, help="folder to write (default: beside this script)")
    ap.add_argument(
        "--check", action="store_true", help="regenerate into a temporary folder and compare with the committed files"
    )
    args = ap.parse_args(argv)
    if not args.check:
        for p in write(args.out):
            print(f"{p} ({p.stat().st_size} bytes)")
        return 0
    import torch

    bad = 0
    with tempfile.TemporaryDirectory() as d:
        write(Path(d))
        for name in ARCHS:
            a = torch.load(Path(d) / f"{name}.pth", weights_only=True)
            b = torch.load(HERE / f"{name}.pth", weights_only=True)
            if a.keys() != b.keys() or any(not torch.equal(a[k], b[k]) for k in a):
                print(f"{name}.pth: weights differ")
                bad += 1
            for prompt in PROMPTS:
                f = f"{name}.blinkdl-logits-{prompt}.npy"
                err = float(np.abs(np.load(Path(d) / f) - np.load(HERE / f)).max())
                print(f"{f}: max |diff| {err:.2e}")
                bad += err > 1e-5
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
