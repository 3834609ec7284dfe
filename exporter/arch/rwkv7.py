"""RWKV-7 "Goose" (x070): reference model, state layout and ONNX graphs.

B batch, T time, C channels (n_embd), H heads, N head size (C = H*N), F ffn size, V vocab;
LoRA sizes: decay w (w1 [C,Dw]), in-context learning rate a (a1 [C,Da]), value residual v
(v1 [C,Dv], layers >= 1 only) and gate g (g1 [C,Dg]).
Per layer, with xx the ln1 output and dx = prev - xx:
    x_* = xx + dx * x_*  (for r, w, k, v, a, g)
    r = x_r R   k = x_k K   v = x_v V
    w = exp(-0.606531 * sigmoid(w0 + tanh(x_w w1) w2))     decay in (exp(-e^-0.5), 1); 0.606531 = e^-0.5
    a = sigmoid(a0 + (x_a a1) a2)                          in-context learning rate
    g = sigmoid(x_g g1) g2                                  output gate
    kk = normalize(k * k_k) per head;  k = k * (1 + (a - 1) * k_a)
    v = v_first (layer 0: v_first := v) or v + (v_first - v) * sigmoid(v0 + (x_v v1) v2)
    S' = S diag(w) + (S (-kk)) (kk*a)^T + v k^T;   y = S' r   (per head)
    out = output( (group_norm(y) + sum_N(r * k * r_k) * v) * g )    group norm eps 64e-5
Channel mix: relu((xx + dx*x_k) K)^2 V. ``v_first`` lives within one token (it is layer 0's value,
read by every later layer), so it is not part of the recurrent state.

Recurrent state per layer: the head-wise layout (headwise.py: att_shift, wkv, ffn_shift), the WKV
state S[b,h,i,j] with i over values, j over keys (BlinkDL's RWKV-7 layout, the transpose of 5/6's).

Custom ONNX ops (domain "rwkv", attributes plugin_version="1", plugin_namespace="rwkv"; each also a
model-local function whose standard-op body ONNX Runtime inlines). All tensors float32.
    WKV7     inputs  r [B,H,N], w [B,H,N] decay factor in (0,1), k [B,H,N], v [B,H,N],
                     a [B,H,N] (= -kk), b [B,H,N] (= kk * a),
                     state [B,H,N,N] (S[b,h,i,j], i value, j key)
             outputs y [B,H,N]: y[b,h,i] = sum_j S'[b,h,i,j] r[b,h,j]   (the updated state),
                     state_out [B,H,N,N]:
                     S'[b,h,i,j] = S[b,h,i,j] w[b,h,j] + (sum_l S[b,h,i,l] a[b,h,l]) b[b,h,j] + v[b,h,i] k[b,h,j]
    WKV7Seq  inputs  r, w, k, v, a, b [B,T,H,N], state [B,H,N,N]
             outputs y [B,T,H,N] (the WKV7 step applied for t = 0..T-1), state_out after the last token
The group norm, the r_k bonus term, gate and output projection stay outside the op.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..onnx_graph import GraphBuilder
from . import ArchSpec, keys
from . import headwise as hw
from .graph import Graph, GraphOptions, embedding_and_head, layer_matrices

VERSION = "rwkv7"
WKV_DOC = "WKV state S[b,h,i,j]: i over values, j over keys (BlinkDL's RWKV-7 layout)"
W_SCALE = 0.606531  # exp(-0.5), BlinkDL's literal
MIXES = "rwkvag"
UNUSED_LAYER0 = ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")  # official checkpoints carry them


# ---------------------------------------------------------------------------------------------
# Sizes and checkpoint validation
# ---------------------------------------------------------------------------------------------
def config_from_weights(w: dict, hf_config: dict | None = None) -> dict:
    V, C = keys.embedding_size(w)
    L = keys.layer_count(w)
    H, N = keys.heads_of(w, "blocks.0.att.r_k", C)
    dv = (
        int(keys.need(w, "blocks.1.att.v1", 2).shape[1])
        if L > 1
        else (int(w["blocks.0.att.v1"].shape[1]) if "blocks.0.att.v1" in w else 0)
    )
    cfg = {
        **hw.sizes(w, V, C, L, H, N),
        "dim_w": int(keys.need(w, "blocks.0.att.w1", 2).shape[1]),
        "dim_a": int(keys.need(w, "blocks.0.att.a1", 2).shape[1]),
        "dim_v": dv,
        "dim_g": int(keys.need(w, "blocks.0.att.g1", 2).shape[1]),
        "time_state": "blocks.0.att.time_state" in w,
    }
    keys.check_keys(w, expected_shapes(cfg), "RWKV-7", ignored=UNUSED_LAYER0)
    return cfg


def expected_shapes(cfg: dict) -> dict:
    C, F_, H, N = cfg["n_embd"], cfg["ffn_dim"], cfg["n_head"], cfg["head_size"]

    def layer(i, b):
        s = {
            b + "att.w0": (1, 1, C),
            b + "att.w1": (C, cfg["dim_w"]),
            b + "att.w2": (cfg["dim_w"], C),
            b + "att.a0": (1, 1, C),
            b + "att.a1": (C, cfg["dim_a"]),
            b + "att.a2": (cfg["dim_a"], C),
            b + "att.g1": (C, cfg["dim_g"]),
            b + "att.g2": (cfg["dim_g"], C),
            b + "att.k_k": (1, 1, C),
            b + "att.k_a": (1, 1, C),
            b + "att.r_k": (H, N),
            b + "ffn.x_k": (1, 1, C),
            b + "ffn.key.weight": (F_, C),
            b + "ffn.value.weight": (C, F_),
        }
        s.update({b + "att.x_" + m: (1, 1, C) for m in MIXES})
        if i > 0:
            s.update({b + "att.v0": (1, 1, C), b + "att.v1": (C, cfg["dim_v"]), b + "att.v2": (cfg["dim_v"], C)})
        return s

    return hw.expected_shapes(cfg, layer)


# the shared head-wise state layout and time_state loader, in this version's WKV index order
state_layout, load_state_tuning = hw.version_state(WKV_DOC, transpose=False)


# ---------------------------------------------------------------------------------------------
# Reference model (PyTorch), parameter names = BlinkDL checkpoint keys
# ---------------------------------------------------------------------------------------------
class TimeMix(nn.Module):
    def __init__(self, i, cfg):
        super().__init__()
        C, H, N = cfg["n_embd"], cfg["n_head"], cfg["head_size"]
        self.layer, self.H, self.N = i, H, N
        for m in MIXES:
            setattr(self, "x_" + m, nn.Parameter(torch.zeros(C)))
        lora = {"w": cfg["dim_w"], "a": cfg["dim_a"], "g": cfg["dim_g"]}
        if i > 0:
            lora["v"] = cfg["dim_v"]
        for n, d in lora.items():
            if n != "g":
                setattr(self, n + "0", nn.Parameter(torch.zeros(C)))
            setattr(self, n + "1", nn.Parameter(torch.zeros(C, d)))
            setattr(self, n + "2", nn.Parameter(torch.zeros(d, C)))
        self.k_k = nn.Parameter(torch.zeros(C))
        self.k_a = nn.Parameter(torch.zeros(C))
        self.r_k = nn.Parameter(torch.zeros(H, N))
        for n in ("key", "value", "receptance", "output"):
            setattr(self, n, nn.Linear(C, C, bias=False))
        self.ln_x = nn.GroupNorm(H, C, eps=hw.GN_EPS)

    def forward(self, xx, sx, s, v_first, parallel: bool):
        """xx: this token's normalised input [B,(T),C], sx: the previous one's; s [B,H,N,N];
        v_first: layer 0's value (None in layer 0). Returns out, s', v_first."""
        dx = sx - xx
        xr, xw, xk, xv, xa, xg = (xx + dx * getattr(self, "x_" + m) for m in MIXES)
        r, k, v = self.receptance(xr), self.key(xk), self.value(xv)
        w = torch.tanh(xw @ self.w1) @ self.w2
        a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)
        g = torch.sigmoid(xg @ self.g1) @ self.g2
        hd = xx.shape[:-1] + (self.H, self.N)
        kk = F.normalize((k * self.k_k).view(hd), dim=-1, p=2.0)  # [B,(T),H,N]
        k = k * (1 + (a - 1) * self.k_a)
        if self.layer == 0:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)
        w = torch.exp(-W_SCALE * torch.sigmoid(self.w0 + w))
        args = (r.view(hd), w.view(hd), k.view(hd), v.view(hd), -kk, kk * a.view(hd), s)
        y, s = hw.wkv7_seq(*args) if parallel else hw.wkv7_step(*args)
        y = hw.group_norm(y.reshape(xx.shape), self.H, self.ln_x.weight, self.ln_x.bias)
        bonus = (r.view(hd) * k.view(hd) * self.r_k).sum(-1, keepdim=True) * v.view(hd)
        return self.output((y + bonus.reshape(xx.shape)) * g), s, v_first


class ChannelMix(nn.Module):
    def __init__(self, C, F_):
        super().__init__()
        self.x_k = nn.Parameter(torch.zeros(C))
        self.key = nn.Linear(C, F_, bias=False)
        self.value = nn.Linear(F_, C, bias=False)

    def forward(self, xx, sx):
        k = torch.relu(self.key(xx + (sx - xx) * self.x_k)) ** 2
        return self.value(k)


class Model(hw.HeadwiseModel):
    """RWKV-7 in PyTorch: ``step`` is the RNN form; ``sequence`` computes every projection for
    the whole sequence at once and runs the WKV token by token."""

    time_mix = staticmethod(lambda i, cfg: TimeMix(i, cfg))
    channel_mix = staticmethod(lambda C, F_: ChannelMix(C, F_))
    drop_keys = UNUSED_LAYER0

    def attend(self, i, blk, xx, sx, s, parallel, carry):
        out, wkv, carry["v_first"] = blk.att(xx, sx, s("wkv"), carry.get("v_first"), parallel)
        return out, {"wkv": wkv}


# ---------------------------------------------------------------------------------------------
# ONNX graphs
# ---------------------------------------------------------------------------------------------
def export_weights(w: dict, cfg: dict) -> dict:
    """Weights as the graph uses them: ln0 folded into the embedding, vectors flat, r_k and ln_x
    as [H,N], LoRA matrices as they are ([in, out]), the other matrices transposed to [in, out].
    Layer 0's unused v0/v1/v2 are dropped."""
    C, H, N = cfg["n_embd"], cfg["n_head"], cfg["head_size"]
    out = embedding_and_head(w, cfg)
    for i in range(cfg["n_layer"]):
        b = f"blocks.{i}."
        lora = ["w", "a", "g"] + (["v"] if i > 0 else [])
        for n in ["ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias"] + [f"att.{x}{j}" for x in lora for j in "12"]:
            out[b + n] = hw.np32(w[b + n])
        vecs = (
            ["att.x_" + m for m in MIXES] + [f"att.{x}0" for x in lora if x != "g"] + ["att.k_k", "att.k_a", "ffn.x_k"]
        )
        for n in vecs:
            out[b + n] = hw.np32(w[b + n]).reshape(C)
        for n in ("att.r_k", "att.ln_x.weight", "att.ln_x.bias"):
            out[b + n] = hw.np32(w[b + n]).reshape(H, N)
        out.update(
            layer_matrices(w, b, ("att.key", "att.value", "att.receptance", "att.output", "ffn.key", "ffn.value"))
        )
    return out


def build_graph(g: GraphBuilder, W: dict, cfg: dict, opts: GraphOptions):
    """Step graph (tokens [B]) or sequence graph (tokens [B,T]); state in -> logits, state out.
    Matrices, precision and rescaling as ``graph.Graph`` does them for every version. The LoRA
    matrices (w, a, v, g) stay float32 MatMuls."""
    G = Graph(g, W, cfg, state_layout(cfg), opts)
    seq = opts.seq
    ax = g.const([-1], np.int64)
    x = G.embed()
    v_first = None
    for i in range(cfg["n_layer"]):
        b = f"blocks.{i}."
        st = lambda f, i=i: f"state.{i}.{f}"  # noqa: E731 - this layer's state names

        def lora(x_, n, mid=None, b=b):  # (mid(x_ @ n1)) @ n2
            h = G.mm(x_, b + f"att.{n}1")
            return G.mm(g.op(mid, [h]) if mid else h, b + f"att.{n}2")

        # time mixing
        xx = G.ln(x, b + "ln1")
        dx = g.op("Sub", [G.shift(xx, st("att_shift")), xx])
        G.last(xx, f"new_state.{i}.att_shift")
        xm = dict(zip(MIXES, G.mixes(xx, dx, [b + "att.x_" + m for m in MIXES], b + "att.x_" + MIXES)))
        r = G.linear(b + "att.receptance", xm["r"])
        k = G.linear(b + "att.key", xm["k"])
        v = G.linear(b + "att.value", xm["v"])
        w = lora(xm["w"], "w", "Tanh")
        a = g.op("Sigmoid", [g.op("Add", [G.vec(b + "att.a0"), lora(xm["a"], "a")])])
        gate = G.mm(g.op("Sigmoid", [G.mm(xm["g"], b + "att.g1")]), b + "att.g2")
        kk = G.heads(g.op("Mul", [k, G.vec(b + "att.k_k")]))
        kk = g.op("Div", [kk, g.op("Max", [g.op("ReduceL2", [kk, ax], keepdims=1), g.const(1e-12)])])  # F.normalize
        # k * (1 + (a - 1) * k_a) as k * ((1 - k_a) + a * k_a): 1 - k_a folded at export, one node less
        one_minus_ka = G.vec(b + "att.1-k_a", array=1 - W[b + "att.k_a"])
        k = g.op("Mul", [k, g.op("Add", [one_minus_ka, g.op("Mul", [a, G.vec(b + "att.k_a")])])])
        if i == 0:
            v_first = v
        else:
            vg = g.op("Sigmoid", [g.op("Add", [G.vec(b + "att.v0"), lora(xm["v"], "v")])])
            v = g.op("Add", [v, g.op("Mul", [g.op("Sub", [v_first, v]), vg])])
        w = g.op("Exp", [g.op("Mul", [g.const(-W_SCALE), g.op("Sigmoid", [g.op("Add", [G.vec(b + "att.w0"), w])])])])
        rh, kh, vh = G.heads(r), G.heads(k), G.heads(v)
        y = g.fresh("wkv")
        hw.wkv_node(
            g,
            "WKV7Seq" if seq else "WKV7",
            opts.plugin,
            [rh, G.heads(w), kh, vh, g.op("Neg", [kk]), g.op("Mul", [kk, G.heads(a)]), st("wkv")],
            [y, f"new_state.{i}.wkv"],
        )
        out = G.group_norm(y, b + "att.ln_x")
        bonus = g.op("ReduceSum", [g.op("Mul", [g.op("Mul", [rh, kh]), G.vec(b + "att.r_k")]), ax], keepdims=1)
        out = g.op("Add", [out, G.flat(g.op("Mul", [bonus, vh]))])
        x = g.op("Add", [x, G.linear(b + "att.output", g.op("Mul", [out, gate]), layer=i)])
        # channel mixing
        xx = G.ln(x, b + "ln2")
        dx = g.op("Sub", [G.shift(xx, st("ffn_shift")), xx])
        G.last(xx, f"new_state.{i}.ffn_shift")
        kk2 = G.relu_sq(G.linear(b + "ffn.key", g.op("Add", [xx, g.op("Mul", [dx, G.vec(b + "ffn.x_k")])])))
        x = G.rescale(g.op("Add", [x, G.linear(b + "ffn.value", kk2, layer=i)]), i)
    G.head(x)


def detect(w: dict) -> str | None:
    """att.k_k / att.r_k mark RWKV-7."""
    return VERSION if any(k.endswith(("att.k_k", "att.r_k")) for k in w) else None


# the ArchSpec of this module: its functions and Model under the contract's names
SPEC = ArchSpec.of(__name__, name="RWKV-7", versions=(VERSION,))
