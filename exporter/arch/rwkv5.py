"""RWKV-5 "Eagle" (5.0, 5.1 and 5.2): reference model, state layout and ONNX graphs.

B batch, T time, C channels (n_embd), H heads, N head size (C = H*N), F ffn size, V vocab.
The variants differ only in their keys (all handled here, as BlinkDL's package does):
    5.0  no gate;  per-head decay/bonus: time_decay [H], time_first [H]
    5.1  gate (att.gate.weight, time_mix_g), per-head decay/bonus
    5.2  gate, per-channel decay/bonus: time_decay [H,N], time_faaaa [H,N]
    bonus u = exp(time_first) when the key is time_first, the raw value when it is time_faaaa.
Per layer, with w = exp(-exp(time_decay)) and a_t = k_t v_t^T (per head):
    y_t = r_t (u * a_t + S)   S' = a_t + w * S      (w and u scale the key index i of S[i,j])
    out = output( group_norm(y) [* silu(gate(x_g))] )   group norm over each head, eps 64e-5
The channel mix is RWKV-4's: sigmoid(receptance(x_r)) * value(relu(key(x_k))^2).

Recurrent state per layer: the head-wise layout (headwise.py: att_shift, wkv, ffn_shift), the WKV
state S[b,h,i,j] with i over keys, j over values (BlinkDL's layout).

Custom ONNX ops (domain "rwkv", attributes plugin_version="1", plugin_namespace="rwkv"; each also a
model-local function whose standard-op body ONNX Runtime inlines). All tensors float32.
    WKV5     inputs  r [B,H,N], k [B,H,N], v [B,H,N],
                     w [H,N]  decay factor exp(-exp(time_decay)) in (0,1), constant over time,
                     u [H,N]  bonus of the current token,
                     state [B,H,N,N] (S[b,h,i,j], i key, j value)
             outputs y [B,H,N]: y[b,h,j] = sum_i r[b,h,i] * (u[h,i] k[b,h,i] v[b,h,j] + S[b,h,i,j]),
                     state_out [B,H,N,N]: S'[b,h,i,j] = k[b,h,i] v[b,h,j] + w[h,i] S[b,h,i,j]
    WKV5Seq  inputs  r, k, v [B,T,H,N], w [H,N], u [H,N], state [B,H,N,N]
             outputs y [B,T,H,N] (the WKV5 step applied for t = 0..T-1), state_out after the last token
The group norm, gate and output projection stay outside the op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from ..onnx_graph import GraphBuilder
from . import ArchSpec, keys
from . import headwise as hw
from .graph import Graph, GraphOptions, embedding_and_head, layer_matrices

VERSION = "rwkv5"
WKV_DOC = "WKV state S[b,h,i,j]: i over keys, j over values (BlinkDL's RWKV-5 layout)"


# ---------------------------------------------------------------------------------------------
# Sizes and checkpoint validation
# ---------------------------------------------------------------------------------------------
def config_from_weights(w: dict, hf_config: dict | None = None) -> dict:
    V, C = keys.embedding_size(w)
    L = keys.layer_count(w)
    td = keys.need(w, "blocks.0.att.time_decay")
    H = int(td.shape[0])
    if H <= 0 or C % H:
        raise CheckpointError(f"blocks.0.att.time_decay: {H} heads do not divide n_embd {C}")
    N = C // H
    bonus = "time_faaaa" if "blocks.0.att.time_faaaa" in w else "time_first"
    cfg = {
        **hw.sizes(w, V, C, L, H, N),
        "gate": "blocks.0.att.gate.weight" in w,
        "per_channel_decay": td.numel() == H * N and N > 1,
        "bonus": bonus,
        "time_state": "blocks.0.att.time_state" in w,
    }
    keys.check_keys(w, expected_shapes(cfg), "RWKV-5", flexible=("time_decay", "time_first", "time_faaaa"))
    return cfg


def expected_shapes(cfg: dict) -> dict:
    C, F_, H, N = cfg["n_embd"], cfg["ffn_dim"], cfg["n_head"], cfg["head_size"]
    hd = (H, N) if cfg["per_channel_decay"] else (H,)
    mixes = "kvrg" if cfg["gate"] else "kvr"

    def layer(i, b):
        return {
            b + "att.time_decay": hd,
            b + "att." + cfg["bonus"]: hd,
            **keys.channel_mix_shapes(b, C, F_),
            **{b + "att.time_mix_" + m: (1, 1, C) for m in mixes},
        }

    return hw.expected_shapes(cfg, layer, gate=cfg["gate"])


# the shared head-wise state layout and time_state loader, in this version's WKV index order
state_layout, load_state_tuning = hw.version_state(WKV_DOC, transpose=True)


# ---------------------------------------------------------------------------------------------
# Reference model (PyTorch), parameter names = BlinkDL checkpoint keys
# ---------------------------------------------------------------------------------------------
class TimeMix(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C, H, N = cfg["n_embd"], cfg["n_head"], cfg["head_size"]
        self.H, self.N, self.gated, self.bonus = H, N, cfg["gate"], cfg["bonus"]
        hd = (H, N) if cfg["per_channel_decay"] else (H, 1)
        self.time_decay = nn.Parameter(torch.zeros(hd))
        setattr(self, self.bonus, nn.Parameter(torch.zeros(hd)))
        for m in "kvrg" if self.gated else "kvr":
            setattr(self, "time_mix_" + m, nn.Parameter(torch.zeros(C)))
        for n in ("key", "value", "receptance", "output") + (("gate",) if self.gated else ()):
            setattr(self, n, nn.Linear(C, C, bias=False))
        self.ln_x = nn.GroupNorm(H, C, eps=hw.GN_EPS)

    def decay_bonus(self):
        """log w = -exp(time_decay) and u, both [H,N] float32."""
        logw = -torch.exp(self.time_decay).expand(self.H, self.N)
        u = getattr(self, self.bonus)
        u = (u if self.bonus == "time_faaaa" else torch.exp(u)).expand(self.H, self.N)
        return logw, u

    def forward(self, xx, sx, s, parallel: bool):
        """xx: this token's normalised input [B,(T),C], sx: the previous one's; s [B,H,N,N]."""

        def mix(m):
            mm = getattr(self, "time_mix_" + m)
            return xx * mm + sx * (1 - mm)  # BlinkDL's form (rounding as his)

        hd = xx.shape[:-1] + (self.H, self.N)
        r, k, v = (lin(mix(m)).view(hd) for lin, m in ((self.receptance, "r"), (self.key, "k"), (self.value, "v")))
        logw, u = self.decay_bonus()
        if parallel:
            y, s = hw.wkv5_chunked(r, k, v, logw, u, s)
        else:
            y, s = hw.wkv5_step(r, k, v, torch.exp(logw), u, s)
        out = hw.group_norm(y.reshape(xx.shape), self.H, self.ln_x.weight, self.ln_x.bias)
        if self.gated:
            out = out * F.silu(self.gate(mix("g")))
        return self.output(out), s


class Model(hw.HeadwiseModel):
    """RWKV-5 in PyTorch: ``step`` is the RNN form, ``sequence`` the chunked parallel form."""

    time_mix = staticmethod(lambda i, cfg: TimeMix(cfg))
    channel_mix = staticmethod(lambda C, F_: hw.ChannelMix(C, F_, "time_mix"))


# ---------------------------------------------------------------------------------------------
# ONNX graphs
# ---------------------------------------------------------------------------------------------
def export_weights(w: dict, cfg: dict) -> dict:
    """Weights as the graph uses them: ln0 folded into the embedding, w = exp(-exp(time_decay)) and
    u computed once in float32 as [H,N], mixing vectors flat (with 1 - mix, BlinkDL's form), ln_x
    as [H,N], matrices transposed to [in, out]."""
    C, H, N = cfg["n_embd"], cfg["n_head"], cfg["head_size"]
    out = embedding_and_head(w, cfg)
    hd = (H, N) if cfg["per_channel_decay"] else (H, 1)
    for i in range(cfg["n_layer"]):
        b = f"blocks.{i}."
        for n in ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias"):
            out[b + n] = hw.np32(w[b + n])
        td = w[b + "att.time_decay"].float().reshape(hd)
        out[b + "att.w"] = hw.np32(torch.exp(-torch.exp(td)).expand(H, N))
        u = w[b + "att." + cfg["bonus"]].float().reshape(hd)
        out[b + "att.u"] = hw.np32((u if cfg["bonus"] == "time_faaaa" else torch.exp(u)).expand(H, N))
        out[b + "att.ln_x.weight"] = hw.np32(w[b + "att.ln_x.weight"]).reshape(H, N)
        out[b + "att.ln_x.bias"] = hw.np32(w[b + "att.ln_x.bias"]).reshape(H, N)
        mixes = ["att.time_mix_" + m for m in ("kvrg" if cfg["gate"] else "kvr")] + ["ffn.time_mix_k", "ffn.time_mix_r"]
        for n in mixes:
            m = w[b + n].float().reshape(C)
            out[b + n], out[b + n + ".1m"] = hw.np32(m), hw.np32(1 - m)
        mats = ["att.key", "att.value", "att.receptance", "att.output", "ffn.key", "ffn.receptance", "ffn.value"]
        out.update(layer_matrices(w, b, mats + (["att.gate"] if cfg["gate"] else [])))
    return out


def build_graph(g: GraphBuilder, W: dict, cfg: dict, opts: GraphOptions):
    """Step graph (tokens [B]) or sequence graph (tokens [B,T]); state in -> logits, state out.
    Matrices, precision and rescaling as ``graph.Graph`` does them for every version."""
    G = Graph(g, W, cfg, state_layout(cfg), opts)
    seq = opts.seq
    x = G.embed()
    for i in range(cfg["n_layer"]):
        b = f"blocks.{i}."
        st = lambda f, i=i: f"state.{i}.{f}"  # noqa: E731 - this layer's state names

        def mix(xx, sx, name, b=b):
            return g.op("Add", [g.op("Mul", [xx, G.vec(b + name)]), g.op("Mul", [sx, G.vec(b + name + ".1m")])])

        # time mixing
        xx = G.ln(x, b + "ln1")
        sx = G.shift(xx, st("att_shift"))
        G.last(xx, f"new_state.{i}.att_shift")
        r, k, v = (
            G.heads(G.linear(b + "att." + n, mix(xx, sx, "att.time_mix_" + m)))
            for n, m in (("receptance", "r"), ("key", "k"), ("value", "v"))
        )
        y = g.fresh("wkv")
        hw.wkv_node(
            g,
            "WKV5Seq" if seq else "WKV5",
            opts.plugin,
            [r, k, v, G.vec(b + "att.w"), G.vec(b + "att.u"), st("wkv")],
            [y, f"new_state.{i}.wkv"],
        )
        out = G.group_norm(y, b + "att.ln_x")
        if cfg["gate"]:
            gate = G.linear(b + "att.gate", mix(xx, sx, "att.time_mix_g"))
            out = g.op("Mul", [out, g.op("Mul", [gate, g.op("Sigmoid", [gate])])])  # silu
        x = g.op("Add", [x, G.linear(b + "att.output", out, layer=i)])
        # channel mixing
        xx = G.ln(x, b + "ln2")
        sx = G.shift(xx, st("ffn_shift"))
        G.last(xx, f"new_state.{i}.ffn_shift")
        kk = G.relu_sq(G.linear(b + "ffn.key", mix(xx, sx, "ffn.time_mix_k")))
        kv = G.linear(b + "ffn.value", kk, layer=i)
        rr = g.op("Sigmoid", [G.linear(b + "ffn.receptance", mix(xx, sx, "ffn.time_mix_r"))])
        x = G.rescale(g.op("Add", [x, g.op("Mul", [rr, kv])]), i)
    G.head(x)


def detect(w: dict) -> str | None:
    """att.ln_x marks RWKV-5 (6 and 7 are tried first); a 2-D time_decay [H,N] marks 5.2."""
    if not any(k.endswith("att.ln_x.weight") for k in w):
        return None
    td = [v for k, v in w.items() if k.endswith("att.time_decay")]
    return "rwkv5.2" if td and td[0].dim() == 2 and td[0].shape[-1] > 1 else "rwkv5"


# the ArchSpec of this module: its functions and Model under the contract's names
SPEC = ArchSpec.of(__name__, name="RWKV-5", versions=(VERSION, "rwkv5.2"))
