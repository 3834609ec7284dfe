"""Train the embedded default model: a tiny byte-level RWKV-4 on the CPython standard library's source.

Every machine with Python has this text, so the model (and this script) needs no download. Training
uses the parallel (sequence) form of ``rwkv_export.arch.rwkv4.Model``; the result is saved in the
BlinkDL ``.pth`` layout, exactly like an official checkpoint.

    python scripts/train_default.py --steps 600 -o exporter/default_model/tiny-rwkv4-pystdlib.pth
"""

from __future__ import annotations

import argparse
import math
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

from rwkv_export.arch import rwkv4


def corpus(max_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """Standard-library sources, sorted for reproducibility; the last 5% is held out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for p in sorted(root.glob("*.py")):
        b = p.read_bytes()
        parts.append(b)
        total += len(b)
        if total >= max_bytes:
            break
    data = np.frombuffer(b"\n".join(parts), dtype=np.uint8)
    cut = int(len(data) * 0.95)
    return data[:cut], data[cut:]


def init_weights(m: rwkv4.Model, L: int, C: int):
    """A small version of the official RWKV-4 initialisation (decay spread across channels)."""
    with torch.no_grad():
        for i, blk in enumerate(m.blocks):
            r01 = i / max(L - 1, 1)
            r1a0 = 1.0 - i / L
            ddd = torch.arange(C) / C
            h = torch.arange(C)
            blk.att.time_decay.copy_(-5 + 8 * (h / (C - 1)) ** (0.7 + 1.3 * r01))
            zigzag = torch.tensor([(j + 1) % 3 - 1 for j in range(C)]) * 0.5
            blk.att.time_first.copy_(torch.ones(C) * math.log(0.3) + zigzag)
            blk.att.time_mix_k.copy_(torch.pow(ddd, r1a0).view(1, 1, C))
            blk.att.time_mix_v.copy_((torch.pow(ddd, r1a0) + 0.3 * r01).view(1, 1, C))
            blk.att.time_mix_r.copy_(torch.pow(ddd, 0.5 * r1a0).view(1, 1, C))
            blk.ffn.time_mix_k.copy_(torch.pow(ddd, r1a0).view(1, 1, C))
            blk.ffn.time_mix_r.copy_(torch.pow(ddd, r1a0).view(1, 1, C))
            blk.att.output.weight.zero_()
            blk.ffn.value.weight.zero_()
        m.emb.weight.uniform_(-1e-4, 1e-4)
        m.head.weight.normal_(0, 0.5 / math.sqrt(C))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--data-bytes", type=int, default=8_000_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--out", default="exporter/default_model/tiny-rwkv4-pystdlib.pth")
    a = ap.parse_args()

    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    train, held = corpus(a.data_bytes)
    cfg = {"n_layer": a.n_layer, "n_embd": a.n_embd, "vocab_size": 256, "ffn_dim": a.ffn}
    m = rwkv4.Model(cfg)
    init_weights(m, a.n_layer, a.n_embd)
    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=a.lr, betas=(0.9, 0.99), weight_decay=0.0)

    def batch(data):
        idx = rng.integers(0, len(data) - a.ctx - 1, a.batch)
        x = np.stack([data[i : i + a.ctx + 1] for i in idx]).astype(np.int64)
        return torch.from_numpy(x[:, :-1]), torch.from_numpy(x[:, 1:])

    def loss_of(x, y):
        logits, _ = m.sequence(x, m.new_state(x.shape[0]))
        return torch.nn.functional.cross_entropy(logits.reshape(-1, 256), y.reshape(-1))

    t0 = time.time()
    for step in range(a.steps):
        lr = a.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / a.steps)))
        for gr in opt.param_groups:
            gr["lr"] = lr
        loss = loss_of(*batch(train))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == a.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.3f}  lr {lr:.2e}  {time.time() - t0:.0f}s", flush=True)
    m.eval()
    with torch.no_grad():
        held_loss = sum(loss_of(*batch(held)).item() for _ in range(8)) / 8
    print(f"held-out loss {held_loss:.3f} nats/byte")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().clone().contiguous() for k, v in m.state_dict().items()}
    tmp = out.with_suffix(".tmp")
    torch.save(sd, tmp)
    tmp.replace(out)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
