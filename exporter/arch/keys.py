"""Checkpoint keys: the one key/shape checker every version uses, and the size helpers.

A version module declares ``expected_shapes(cfg)`` (BlinkDL key -> shape) and calls
``check_keys`` from its ``config_from_weights``; every failure is one ``CheckpointError`` line.
"""

from __future__ import annotations

import numpy as np

from ..errors import CheckpointError


def _list(keys, n=6):
    keys = list(keys)
    return ", ".join(keys[:n]) + (" ..." if len(keys) > n else "")


def check_keys(w: dict, expected: dict, pretty: str, ignored=(), flexible=()):
    """Every expected key present with its shape, up to size-1 axes ([1,1,C] == [C]; ``flexible``
    keys: any shape of the same element count), nothing else except ``ignored`` keys."""
    missing = [k for k in expected if k not in w]
    if missing:
        raise CheckpointError(f"missing keys for {pretty}: {_list(missing)}")
    unknown = [k for k in w if k not in expected and k not in ignored]
    if unknown:
        raise CheckpointError(f"unknown keys for {pretty}: {_list(unknown)}")
    for k, shape in expected.items():
        got = tuple(w[k].shape)
        same = [d for d in got if d != 1] == [d for d in shape if d != 1]
        if not same and not (k.endswith(flexible) and int(np.prod(got)) == int(np.prod(shape))):
            raise CheckpointError(f"inconsistent shape for {k}: {list(got)}, expected {list(shape)}")


def model_shapes(cfg: dict, layer_shapes) -> dict:
    """The expected key -> shape table of a version: what every version has (embedding, ln0, ln_out,
    head and each layer's ln1/ln2) with ``layer_shapes(i, "blocks.{i}.")``'s keys after each layer's
    norms (in the order given: a "missing keys" message lists them in this order)."""
    C, V = cfg["n_embd"], cfg["vocab_size"]
    s = {
        "emb.weight": (V, C),
        "blocks.0.ln0.weight": (C,),
        "blocks.0.ln0.bias": (C,),
        "ln_out.weight": (C,),
        "ln_out.bias": (C,),
        "head.weight": (V, C),
    }
    for i in range(cfg["n_layer"]):
        b = f"blocks.{i}."
        s.update({b + n: (C,) for n in ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias")})
        s.update(layer_shapes(i, b))
    return s


def channel_mix_shapes(b: str, C: int, F_: int, mix: str = "time_mix") -> dict:
    """Layer ``b``'s channel-mix keys in RWKV-4, 5 and 6 (``mix``: its token-shift vectors' prefix,
    time_mix, or time_maa in RWKV-6)."""
    return {
        b + f"ffn.{mix}_k": (1, 1, C),
        b + f"ffn.{mix}_r": (1, 1, C),
        b + "ffn.key.weight": (F_, C),
        b + "ffn.receptance.weight": (C, C),
        b + "ffn.value.weight": (C, F_),
    }


def projection_shapes(b: str, C: int, A: int | None = None, extra: tuple = ()) -> dict:
    """Layer ``b``'s time-mix projections in every version: att.key/value/receptance [A,C] (plus
    ``extra`` ones of that shape, the gate) and att.output [C,A]; A = C except RWKV-4's dim_att."""
    A = C if A is None else A
    s = {b + f"att.{n}.weight": (A, C) for n in ("key", "value", "receptance") + tuple(extra)}
    return {**s, b + "att.output.weight": (C, A)}


def heads_of(w: dict, key: str, C: int) -> tuple:
    """(H, N) from a per-head [H, N] tensor ``key`` of layer 0, checked against n_embd C."""
    H, N = (int(d) for d in need(w, key, 2).shape)
    if H * N != C:
        raise CheckpointError(f"inconsistent shape for {key}: {[H, N]} (heads x head size != n_embd {C})")
    return H, N


def layer_count(w: dict) -> int:
    layers = sorted({int(k.split(".")[1]) for k in w if k.startswith("blocks.") and k.split(".")[1].isdigit()})
    if not layers or layers != list(range(len(layers))):
        raise CheckpointError(f"blocks are not numbered 0..N-1 (found {layers[:8]})")
    return len(layers)


def embedding_size(w: dict) -> tuple:
    """(vocab, n_embd) from emb.weight."""
    if "emb.weight" not in w or w["emb.weight"].dim() != 2:
        raise CheckpointError("missing or malformed emb.weight (expected [vocab, n_embd])")
    V, C = w["emb.weight"].shape
    return int(V), int(C)


def need(w: dict, key: str, ndim: int | None = None):
    if key not in w:
        raise CheckpointError(f"missing key {key}")
    if ndim is not None and w[key].dim() != ndim:
        raise CheckpointError(f"inconsistent shape for {key}: {list(w[key].shape)} (expected {ndim} dimensions)")
    return w[key]


def default_tokenizer(cfg: dict) -> dict:
    """The tokenizer a vocabulary size implies, for every version: bytes for tiny models, the World
    vocabulary (RWKV-4 World and RWKV-5+), the GPT-NeoX 20B tokenizer (RWKV-4 Pile, not embedded)."""
    V = cfg["vocab_size"]
    if V <= 256:
        return {"kind": "bytes"}
    if V in (65536, 65529, 65525):
        return {"kind": "world"}
    if V in (50277, 50304):
        return {"kind": "hf-json", "name": "20B_tokenizer"}
    return {"kind": "none"}
