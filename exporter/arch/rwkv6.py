"""RWKV-6 "Finch": reference model, state layout and ONNX graphs.

B batch, T time, C channels (n_embd), H heads, N head size (C = H*N), F ffn size, V vocab,
D the token-shift LoRA size (time_maa_w1 [C,5D]), E the decay LoRA size (time_decay_w1 [C,E]).
Per layer, with xx the ln1 output and dx = prev - xx (data-dependent token shift, "ddlerp"):
    m_w,m_k,m_v,m_r,m_g = tanh((xx + dx*time_maa_x) @ time_maa_w1) @ time_maa_w2   (five [C] vectors)
    x_* = xx + dx * (time_maa_* + m_*)
    w_t = exp(-exp(time_decay + tanh(x_w @ time_decay_w1) @ time_decay_w2))        per token, [H,N]
    y_t = r_t (u * k_t v_t^T + S)   S' = k_t v_t^T + w_t * S     (u = time_faaaa, raw)
    out = output( group_norm(y) * silu(gate(x_g)) )     group norm over each head, eps 64e-5
Channel mix: dx = prev - xx; sigmoid(receptance(xx + dx*maa_r)) * value(relu(key(xx + dx*maa_k))^2).

Recurrent state per layer: the head-wise layout (headwise.py: att_shift, wkv, ffn_shift), the WKV
state S[b,h,i,j] with i over keys, j over values (BlinkDL's layout).

Custom ONNX ops (domain "rwkv", attributes plugin_version="1", plugin_namespace="rwkv"; each also a
model-local function whose standard-op body ONNX Runtime inlines). All tensors float32.
    WKV6     inputs  r [B,H,N], k [B,H,N], v [B,H,N],
                     w [B,H,N]  this token's decay factor exp(-exp(...)) in (0,1),
                     u [H,N]    bonus of the current token (time_faaaa),
                     state [B,H,N,N] (S[b,h,i,j], i key, j value)
             outputs y [B,H,N]: y[b,h,j] = sum_i r[b,h,i] * (u[h,i] k[b,h,i] v[b,h,j] + S[b,h,i,j]),
                     state_out [B,H,N,N]: S'[b,h,i,j] = k[b,h,i] v[b,h,j] + w[b,h,i] S[b,h,i,j]
    WKV6Seq  inputs  r, k, v, w [B,T,H,N], u [H,N], state [B,H,N,N]
             outputs y [B,T,H,N] (the WKV6 step applied for t = 0..T-1), state_out after the last token
The data-dependent decay, group norm, gate and output projection stay outside the op.
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

VERSION = "rwkv6"
WKV_DOC = "WKV state S[b,h,i,j]: i over keys, j over values (BlinkDL's RWKV-6 layout)"
MAA = "wkvrg"  # the five data-dependent token-shift mixes, in time_maa_w2's order


# ---------------------------------------------------------------------------------------------
# Sizes and checkpoint validation
# ---------------------------------------------------------------------------------------------
def config_from_weights(w: dict, hf_config: dict | None = None) -> dict:
    V, C = keys.embedding_size(w)
    L = keys.layer_count(w)
    H, N = keys.heads_of(w, "blocks.0.att.time_faaaa", C)
    w2 = keys.need(w, "blocks.0.att.time_maa_w2", 3)
    cfg = {
        **hw.sizes(w, V, C, L, H, N),
        "dim_maa": int(w2.shape[1]),
        "dim_decay": int(keys.need(w, "blocks.0.att.time_decay_w1", 2).shape[1]),
        "time_state": "blocks.0.att.time_state" in w,
    }
    keys.check_keys(w, expected_shapes(cfg), "RWKV-6", flexible=("time_decay",))
    return cfg


def expected_shapes(cfg: dict) -> dict:
    C, F_, H, N = cfg["n_embd"], cfg["ffn_dim"], cfg["n_head"], cfg["head_size"]
    D, E = cfg["dim_maa"], cfg["dim_decay"]

    def layer(i, b):
        return {
            b + "att.time_maa_x": (1, 1, C),
            b + "att.time_maa_w1": (C, 5 * D),
            b + "att.time_maa_w2": (5, D, C),
            b + "att.time_decay": (1, 1, C),
            b + "att.time_decay_w1": (C, E),
            b + "att.time_decay_w2": (E, C),
            b + "att.time_faaaa": (H, N),
            **keys.channel_mix_shapes(b, C, F_, "time_maa"),
            **{b + "att.time_maa_" + m: (1, 1, C) for m in MAA},
        }

    return hw.expected_shapes(cfg, layer, gate=True)


# the shared head-wise state layout and time_state loader, in this version's WKV index order
state_layout, load_state_tuning = hw.version_state(WKV_DOC, transpose=True)


# ---------------------------------------------------------------------------------------------
# Reference model (PyTorch), parameter names = BlinkDL checkpoint keys
# ---------------------------------------------------------------------------------------------
class TimeMix(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C, H, N, D, E = cfg["n_embd"], cfg["n_head"], cfg["head_size"], cfg["dim_maa"], cfg["dim_decay"]
        self.H, self.N, self.D = H, N, D
        for m in "x" + MAA:
            setattr(self, "time_maa_" + m, nn.Parameter(torch.zeros(C)))
        self.time_maa_w1 = nn.Parameter(torch.zeros(C, 5 * D))
        self.time_maa_w2 = nn.Parameter(torch.zeros(5, D, C))
        self.time_decay = nn.Parameter(torch.zeros(C))
        self.time_decay_w1 = nn.Parameter(torch.zeros(C, E))
        self.time_decay_w2 = nn.Parameter(torch.zeros(E, C))
        self.time_faaaa = nn.Parameter(torch.zeros(H, N))
        for n in ("key", "value", "receptance", "gate", "output"):
            setattr(self, n, nn.Linear(C, C, bias=False))
        self.ln_x = nn.GroupNorm(H, C, eps=hw.GN_EPS)

    def forward(self, xx, sx, s, parallel: bool):
        """xx: this token's normalised input [B,(T),C], sx: the previous one's; s [B,H,N,N]."""
        dx = sx - xx
        lead = xx.shape[:-1]
        xxx = torch.tanh((xx + dx * self.time_maa_x) @ self.time_maa_w1).view(*lead, 5, 1, self.D)
        mw, mk, mv, mr, mg = (xxx @ self.time_maa_w2).view(*lead, 5, -1).unbind(-2)  # 5 x [B,(T),C]
        xw, xk, xv, xr, xg = (xx + dx * (getattr(self, "time_maa_" + n) + m) for n, m in zip(MAA, (mw, mk, mv, mr, mg)))
        hd = lead + (self.H, self.N)
        r, k, v = self.receptance(xr).view(hd), self.key(xk).view(hd), self.value(xv).view(hd)
        logw = -torch.exp(self.time_decay + torch.tanh(xw @ self.time_decay_w1) @ self.time_decay_w2).view(hd)
        if parallel:
            y, s = hw.wkv5_chunked(r, k, v, logw, self.time_faaaa, s)
        else:
            y, s = hw.wkv5_step(r, k, v, torch.exp(logw), self.time_faaaa, s)
        out = hw.group_norm(y.reshape(xx.shape), self.H, self.ln_x.weight, self.ln_x.bias)
        return self.output(out * F.silu(self.gate(xg))), s


class Model(hw.HeadwiseModel):
    """RWKV-6 in PyTorch: ``step`` is the RNN form, ``sequence`` the chunked parallel form."""

    time_mix = staticmethod(lambda i, cfg: TimeMix(cfg))
    channel_mix = staticmethod(lambda C, F_: hw.ChannelMix(C, F_, "time_maa"))


# ---------------------------------------------------------------------------------------------
# ONNX graphs
# ---------------------------------------------------------------------------------------------
def export_weights(w: dict, cfg: dict) -> dict:
    """Weights as the graph uses them: ln0 folded into the embedding, mixing vectors flat,
    time_decay flat, ln_x as [H,N], LoRA matrices as they are ([in, out]; time_maa_w2 [5,D,C]),
    the other matrices transposed to [in, out]."""
    C, H, N = cfg["n_embd"], cfg["n_head"], cfg["head_size"]
    out = embedding_and_head(w, cfg)
    for i in range(cfg["n_layer"]):
        b = f"blocks.{i}."
        for n in (
            "ln1.weight",
            "ln1.bias",
            "ln2.weight",
            "ln2.bias",
            "att.time_maa_w1",
            "att.time_maa_w2",
            "att.time_decay_w1",
            "att.time_decay_w2",
        ):
            out[b + n] = hw.np32(w[b + n])
        for n in ["att.time_maa_" + m for m in "x" + MAA] + ["att.time_decay", "ffn.time_maa_k", "ffn.time_maa_r"]:
            out[b + n] = hw.np32(w[b + n]).reshape(C)
        out[b + "att.u"] = hw.np32(w[b + "att.time_faaaa"]).reshape(H, N)
        out[b + "att.ln_x.weight"] = hw.np32(w[b + "att.ln_x.weight"]).reshape(H, N)
        out[b + "att.ln_x.bias"] = hw.np32(w[b + "att.ln_x.bias"]).reshape(H, N)
        out.update(
            layer_matrices(
                w,
                b,
                (
                    "att.key",
                    "att.value",
                    "att.receptance",
                    "att.gate",
                    "att.output",
                    "ffn.key",
                    "ffn.receptance",
                    "ffn.value",
                ),
            )
        )
    return out


def build_graph(g: GraphBuilder, W: dict, cfg: dict, opts: GraphOptions):
    """Step graph (tokens [B]) or sequence graph (tokens [B,T]); state in -> logits, state out.
    Matrices, precision and rescaling as ``graph.Graph`` does them for every version. The LoRA
    matrices stay float32 MatMuls."""
    G = Graph(g, W, cfg, state_layout(cfg), opts)
    seq = opts.seq
    D = cfg["dim_maa"]
    x = G.embed()
    for i in range(cfg["n_layer"]):
        b = f"blocks.{i}."
        st = lambda f, i=i: f"state.{i}.{f}"  # noqa: E731 - this layer's state names

        def lerp(xx, dx, m):  # xx + dx * m
            return g.op("Add", [xx, g.op("Mul", [dx, m])])

        # time mixing
        xx = G.ln(x, b + "ln1")
        dx = g.op("Sub", [G.shift(xx, st("att_shift")), xx])
        G.last(xx, f"new_state.{i}.att_shift")
        xxx = g.op("Tanh", [G.mm(lerp(xx, dx, G.vec(b + "att.time_maa_x")), b + "att.time_maa_w1")])  # [B,(T),5D]
        xxx = g.op("Reshape", [xxx, g.const([0, 0, 5, 1, D] if seq else [0, 5, 1, D], np.int64)])
        xxx = g.op("MatMul", [xxx, G.vec(b + "att.time_maa_w2")])  # [B,(T),5,1,C]
        mixed = {}
        for j, m in enumerate(MAA):
            mj = g.op("Gather", [xxx, g.const([j], np.int64)], axis=-3)  # [B,(T),1,1,C]
            mj = g.op("Squeeze", [mj, g.const([-3, -2], np.int64)])  # [B,(T),C]
            mixed[m] = lerp(xx, dx, g.op("Add", [G.vec(b + "att.time_maa_" + m), mj]))
        r, k, v = (
            G.heads(G.linear(b + "att." + n, mixed[m])) for n, m in (("receptance", "r"), ("key", "k"), ("value", "v"))
        )
        dec = g.op(
            "Add",
            [
                G.vec(b + "att.time_decay"),
                G.mm(g.op("Tanh", [G.mm(mixed["w"], b + "att.time_decay_w1")]), b + "att.time_decay_w2"),
            ],
        )
        w = G.heads(g.op("Exp", [g.op("Neg", [g.op("Exp", [dec])])]))
        y = g.fresh("wkv")
        hw.wkv_node(
            g,
            "WKV6Seq" if seq else "WKV6",
            opts.plugin,
            [r, k, v, w, G.vec(b + "att.u"), st("wkv")],
            [y, f"new_state.{i}.wkv"],
        )
        out = G.group_norm(y, b + "att.ln_x")
        gate = G.linear(b + "att.gate", mixed["g"])
        out = g.op("Mul", [out, g.op("Mul", [gate, g.op("Sigmoid", [gate])])])  # silu
        x = g.op("Add", [x, G.linear(b + "att.output", out, layer=i)])
        # channel mixing
        xx = G.ln(x, b + "ln2")
        dx = g.op("Sub", [G.shift(xx, st("ffn_shift")), xx])
        G.last(xx, f"new_state.{i}.ffn_shift")
        kk = G.relu_sq(G.linear(b + "ffn.key", lerp(xx, dx, G.vec(b + "ffn.time_maa_k"))))
        kv = G.linear(b + "ffn.value", kk, layer=i)
        rr = g.op("Sigmoid", [G.linear(b + "ffn.receptance", lerp(xx, dx, G.vec(b + "ffn.time_maa_r")))])
        x = G.rescale(g.op("Add", [x, g.op("Mul", [rr, kv])]), i)
    G.head(x)


def detect(w: dict) -> str | None:
    """The data-dependent token shift (att.time_maa_x) marks RWKV-6."""
    return VERSION if any(k.endswith("att.time_maa_x") for k in w) else None


# the ArchSpec of this module: its functions and Model under the contract's names
SPEC = ArchSpec.of(__name__, name="RWKV-6", versions=(VERSION,))
