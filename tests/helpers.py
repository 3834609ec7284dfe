"""Test helpers: random RWKV-4 checkpoints of odd shapes, BlinkDL's package as an independent truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def random_rwkv4(path: Path, n_embd=72, n_layer=3, ffn=200, vocab=301, seed=0) -> Path:
    """A BlinkDL-layout RWKV-4 .pth with random weights in realistic ranges."""
    import torch

    g = torch.Generator().manual_seed(seed)
    C, F, V = n_embd, ffn, vocab

    def rn(*shape, s=1.0):
        return torch.randn(*shape, generator=g) * s

    def ru(*shape):
        return torch.rand(*shape, generator=g)

    w = {
        "emb.weight": rn(V, C),
        "blocks.0.ln0.weight": 1 + rn(C, s=0.1),
        "blocks.0.ln0.bias": rn(C, s=0.1),
        "ln_out.weight": 1 + rn(C, s=0.1),
        "ln_out.bias": rn(C, s=0.1),
        "head.weight": rn(V, C, s=C**-0.5),
    }
    for i in range(n_layer):
        b = f"blocks.{i}."
        w.update(
            {
                b + "ln1.weight": 1 + rn(C, s=0.1),
                b + "ln1.bias": rn(C, s=0.1),
                b + "ln2.weight": 1 + rn(C, s=0.1),
                b + "ln2.bias": rn(C, s=0.1),
                b + "att.time_decay": rn(C, s=2.0),
                b + "att.time_first": rn(C),
                b + "att.time_mix_k": ru(1, 1, C),
                b + "att.time_mix_v": ru(1, 1, C),
                b + "att.time_mix_r": ru(1, 1, C),
                b + "ffn.time_mix_k": ru(1, 1, C),
                b + "ffn.time_mix_r": ru(1, 1, C),
            }
        )
        for n, shape in (
            ("att.key", (C, C)),
            ("att.value", (C, C)),
            ("att.receptance", (C, C)),
            ("att.output", (C, C)),
            ("ffn.key", (F, C)),
            ("ffn.receptance", (C, C)),
            ("ffn.value", (C, F)),
        ):
            w[b + n + ".weight"] = rn(*shape, s=shape[1] ** -0.5)
    torch.save(w, path)
    return path


def blinkdl_logits(path: Path, tokens) -> np.ndarray:
    """Logits after each token from BlinkDL's own `rwkv` package (cpu fp32, one token at a time)."""
    from rwkv.model import RWKV

    model = RWKV(str(path)[:-4] if str(path).endswith(".pth") else str(path), strategy="cpu fp32", verbose=False)
    state, out = None, []
    for t in tokens:
        logits, state = model.forward([int(t)], state)
        out.append(logits.float().numpy().copy())
    return np.stack(out)


def step_all(session, tokens, state=None):
    """Run a Session one token at a time; returns (logits [T, V], final state)."""
    out = []
    for t in tokens:
        logits, state = session.step(np.array([t]), state)
        out.append(logits[0])
    return np.stack(out), state


def random_state_tuning(checkpoint: Path, out: Path, seed: int = 0, scale: float = 0.3) -> dict:
    """A made-up but well-scaled state-tuning file (``blocks.N.att.time_state`` [H, N, N]) for a head-wise
    checkpoint, saved to ``out``; returns the tensors."""
    import torch

    from rwkv_export import arch
    from rwkv_export.checkpoint import load_checkpoint

    ck = load_checkpoint(checkpoint)
    cfg = arch.get(ck.version).config_from_weights(ck.weights)
    g = torch.Generator().manual_seed(seed)
    ts = {
        f"blocks.{i}.att.time_state": torch.randn(cfg["n_head"], cfg["head_size"], cfg["head_size"], generator=g)
        * scale
        for i in range(cfg["n_layer"])
    }
    torch.save(ts, out)
    return ts
