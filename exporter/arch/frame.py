"""The reference models' frame, the same for every RWKV version (PyTorch; the truth the graphs are
checked against).

    x = ln0(emb[token]);  per layer i:  x += time_mix(ln1(x), its shifted copy, layer state)
                                        x += channel_mix(ln2(x), its shifted copy)
    logits = head(ln_out(x))

Two forms: ``step`` (tokens [B], the state carries the previous token) and ``sequence`` (tokens
[B,T], the token shift runs over the sequence, the state is the one after the last token). A version's
model says only what differs: its time mix (``attend``) and, for RWKV-4, the residual rescaling
(``after_layer``); the loop, the shifts and the state bookkeeping are here once.
"""

from __future__ import annotations

import torch
from torch import nn


def shift(xx, prev):
    """Token shift over a sequence: [prev, xx_0, ..., xx_{T-2}]; xx [B,T,C], prev [B,C]."""
    return torch.cat([prev[:, None], xx[:, :-1]], 1)


def loaded(cls, cfg: dict, w: dict, drop=(), scale: dict | None = None):
    """``cls(cfg)`` holding the BlinkDL-named tensors ``w`` (reshaped to its parameters; ``drop``: keys
    it ignores; ``scale``: key -> factor applied first). Built on the meta device and assigned, not
    copied: no random initialisation of parameters about to be replaced, and a float32 checkpoint's
    tensors become the parameters (the accuracy report after a 0.4B export: ~3 s and 1.8 GB less)."""
    with torch.device("meta"):
        m = cls(cfg)
    shapes = {k: v.shape for k, v in m.state_dict().items()}
    sd = {}
    for k, v in w.items():
        if k in drop or k.endswith("att.time_state"):
            continue
        v = v.float().reshape(shapes[k]) if k in shapes else v  # an unknown key: strict loading names it
        sd[k] = v * scale[k] if scale and k in scale else v
    m.load_state_dict(sd, strict=True, assign=True)
    return m.eval()


class ReferenceModel(nn.Module):
    """Subclasses build ``emb``, ``blocks`` (each with ln1, ln2, ffn; block 0 with ln0), ``ln_out``
    and ``head``, and implement ``attend``."""

    def attend(self, i: int, blk, xx, sx, s, parallel: bool, carry: dict):
        """Layer ``i``'s time mix: xx its normalised input, sx the shifted one, s(field) its state.
        Returns (out, {state field: new value}) for the fields other than the two shifts; ``carry``
        is a dict the layers of one call share (RWKV-7's v_first)."""
        raise NotImplementedError

    def after_layer(self, i: int, x):
        return x

    def _run(self, x, state: dict, parallel: bool):
        def shifted(xx, prev):
            return shift(xx, prev) if parallel else prev

        def last(xx):
            return xx[:, -1] if parallel else xx

        x = self.blocks[0].ln0(x)
        new, carry = {}, {}
        for i, blk in enumerate(self.blocks):
            s = lambda f, i=i: state[f"state.{i}.{f}"]  # noqa: E731 - this layer's state
            xx = blk.ln1(x)
            out, fields = self.attend(i, blk, xx, shifted(xx, s("att_shift")), s, parallel, carry)
            x = x + out
            yy = blk.ln2(x)
            x = x + blk.ffn(yy, shifted(yy, s("ffn_shift")))
            fields = {**fields, "att_shift": last(xx), "ffn_shift": last(yy)}
            new.update({f"state.{i}.{f}": v for f, v in fields.items()})
            x = self.after_layer(i, x)
        return self.head(self.ln_out(x)), {k: new[k] for k in state}

    @torch.no_grad()
    def step(self, tokens, state: dict):
        """tokens [B] -> logits [B,V], new state (keys as the inputs: ``state.{i}.{field}``)."""
        return self._run(self.emb(tokens), state, parallel=False)

    @torch.no_grad()
    def sequence(self, tokens, state: dict):
        """tokens [B,T] -> logits [B,T,V], state after the last token."""
        return self._run(self.emb(tokens), state, parallel=True)
