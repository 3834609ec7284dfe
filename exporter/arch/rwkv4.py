"""RWKV-4 (the architecture of the paper): reference model, state layout and ONNX graphs.

Notation follows the paper and BlinkDL's code: B batch, T time, C channels (n_embd), F ffn size,
V vocab. Per layer the recurrent state is
    att_shift [B,C]  the previous token's time-mix input (token shift)
    wkv_aa    [B,C]  WKV numerator   } both scaled by exp(-wkv_pp): the running-maximum trick keeps
    wkv_bb    [B,C]  WKV denominator } exp() from overflowing
    wkv_pp    [B,C]  running maximum of the log-weights; starts at -1e30 (0 would be wrong)
    ffn_shift [B,C]  the previous token's channel-mix input
all float32 whatever the precision of the weights.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from rwkv_runtime.manifest import BATCH, StateSpec

from ..onnx_graph import GraphBuilder
from . import ArchSpec, keys
from .frame import ReferenceModel, loaded
from .graph import LN_EPS, Graph, GraphOptions, embedding_and_head, layer_matrices, wkv_node
from .headwise import initial_state

VERSION = "rwkv4"
PP_INIT = -1e30
STATE_FIELDS = ("att_shift", "wkv_aa", "wkv_bb", "wkv_pp", "ffn_shift")


# ---------------------------------------------------------------------------------------------
# Sizes and checkpoint validation
# ---------------------------------------------------------------------------------------------
def config_from_weights(w: dict, hf_config: dict | None = None) -> dict:
    V, C = keys.embedding_size(w)
    L = keys.layer_count(w)
    fk = keys.need(w, "blocks.0.ffn.key.weight", 2)
    ak = w.get("blocks.0.att.key.weight")
    # Hugging Face configs may set attention_hidden_size != hidden_size; BlinkDL checkpoints never do
    A = int(ak.shape[0]) if ak is not None and ak.dim() == 2 else int(C)
    hf = hf_config or {}
    cfg = {
        "n_layer": L,
        "n_embd": int(C),
        "vocab_size": int(V),
        "ffn_dim": int(fk.shape[0]),
        "dim_att": A,
        "ln_eps": float(hf.get("layer_norm_epsilon", LN_EPS)),
        # transformers halves the residual every `rescale_every` blocks at inference (all precisions)
        "rescale_every": int(hf.get("rescale_every", 6) or 0) if hf else 0,
    }
    keys.check_keys(w, expected_shapes(cfg), "RWKV-4", flexible=("time_decay", "time_first"))
    return cfg


def expected_shapes(cfg: dict) -> dict:
    C, F_ = cfg["n_embd"], cfg["ffn_dim"]
    A = cfg.get("dim_att", C)

    def layer(i, b):
        return {
            b + "att.time_decay": (A,),
            b + "att.time_first": (A,),
            b + "att.time_mix_k": (1, 1, C),
            b + "att.time_mix_v": (1, 1, C),
            b + "att.time_mix_r": (1, 1, C),
            **keys.projection_shapes(b, C, A),
            **keys.channel_mix_shapes(b, C, F_),
        }

    return keys.model_shapes(cfg, layer)


def state_layout(cfg: dict) -> list:
    """The recurrent state, generated from one layout (never listed by hand)."""
    specs = []
    for i in range(cfg["n_layer"]):
        for f in STATE_FIELDS:
            width = cfg.get("dim_att", cfg["n_embd"]) if f.startswith("wkv") else cfg["n_embd"]
            specs.append(
                StateSpec(
                    name=f"state.{i}.{f}",
                    output=f"new_state.{i}.{f}",
                    shape=[BATCH, width],
                    dtype="float32",
                    init=PP_INIT if f == "wkv_pp" else 0.0,
                    layer=i,
                )
            )
    return specs


# ---------------------------------------------------------------------------------------------
# The WKV operator, in both of the paper's forms
# ---------------------------------------------------------------------------------------------
def wkv4_step(w, u, k, v, aa, bb, pp):
    """One token. w = -exp(time_decay), u = time_first; all float32, [B,C]."""
    ww = u + k
    p = torch.maximum(pp, ww)
    e1, e2 = torch.exp(pp - p), torch.exp(ww - p)
    y = (e1 * aa + e2 * v) / (e1 * bb + e2)
    ww = w + pp
    p = torch.maximum(ww, k)
    e1, e2 = torch.exp(ww - p), torch.exp(k - p)
    return y, e1 * aa + e2 * v, e1 * bb + e2, p


def wkv4_parallel(w, u, k, v, aa, bb, pp, chunk: int = 64):
    """A whole sequence [B,T,C] at once, the paper's parallel form, in chunks of ``chunk`` tokens.

    Inside a chunk, token t attends to token i < t with log-weight k_i + (t-1-i)·w, to itself with
    u + k_t, and to the carried-in state with pp + t·w; subtracting each row's maximum before exp()
    is the parallel counterpart of the step form's running maximum.
    """
    T = k.shape[1]
    ys = []
    for s in range(0, T, chunk):
        kc, vc = k[:, s : s + chunk], v[:, s : s + chunk]
        y, aa, bb, pp = _wkv4_chunk(w, u, kc, vc, aa, bb, pp)
        ys.append(y)
    return torch.cat(ys, 1), aa, bb, pp


def _wkv4_chunk(w, u, k, v, aa, bb, pp):
    B, T, C = k.shape
    t = torch.arange(T, device=k.device)
    dist = (t[:, None] - 1 - t[None, :]).clamp(min=0).to(k.dtype)  # [T(out), T(in)]
    lw = k[:, None, :, :] + dist[None, :, :, None] * w  # [B,T,T,C]
    lw = torch.where((t[:, None] > t[None, :])[None, :, :, None], lw, torch.tensor(-math.inf, dtype=k.dtype))
    lw = torch.where((t[:, None] == t[None, :])[None, :, :, None], (u + k)[:, None, :, :], lw)
    ls = pp[:, None, :] + t[None, :, None].to(k.dtype) * w  # state's log-weight at each t: [B,T,C]
    m = torch.maximum(lw.amax(2), ls)
    ew, es = torch.exp(lw - m[:, :, None]), torch.exp(ls - m)
    y = ((ew * v[:, None]).sum(2) + es * aa[:, None]) / (ew.sum(2) + es * bb[:, None])
    # state after the chunk: every token decayed to time T, no bonus u
    lf = k + (T - 1 - t)[None, :, None].to(k.dtype) * w  # [B,T,C]
    sf = pp + T * w
    pp2 = torch.maximum(lf.amax(1), sf)
    ef, esf = torch.exp(lf - pp2[:, None]), torch.exp(sf - pp2)
    return y, (ef * v).sum(1) + esf * aa, ef.sum(1) + esf * bb, pp2


# ---------------------------------------------------------------------------------------------
# Reference model (PyTorch), parameter names = BlinkDL checkpoint keys
# ---------------------------------------------------------------------------------------------
class TimeMix(nn.Module):
    def __init__(self, C, A):
        super().__init__()
        self.time_decay = nn.Parameter(torch.zeros(A))
        self.time_first = nn.Parameter(torch.zeros(A))
        self.time_mix_k = nn.Parameter(torch.zeros(1, 1, C))
        self.time_mix_v = nn.Parameter(torch.zeros(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.zeros(1, 1, C))
        self.key = nn.Linear(C, A, bias=False)
        self.value = nn.Linear(C, A, bias=False)
        self.receptance = nn.Linear(C, A, bias=False)
        self.output = nn.Linear(A, C, bias=False)

    def forward(self, xx, sx, aa, bb, pp, parallel: bool):
        """xx: this token's normalised input, sx: the previous one's (token shift)."""
        mk, mv, mr = (m.view(-1) for m in (self.time_mix_k, self.time_mix_v, self.time_mix_r))
        k = self.key(xx * mk + sx * (1 - mk)).float()
        v = self.value(xx * mv + sx * (1 - mv)).float()
        r = torch.sigmoid(self.receptance(xx * mr + sx * (1 - mr)))
        w, u = -torch.exp(self.time_decay.float().view(-1)), self.time_first.float().view(-1)
        wkv = wkv4_parallel if parallel else wkv4_step
        y, aa, bb, pp = wkv(w, u, k, v, aa, bb, pp)
        return self.output(r * y), aa, bb, pp


class ChannelMix(nn.Module):
    def __init__(self, C, F_):
        super().__init__()
        self.time_mix_k = nn.Parameter(torch.zeros(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.zeros(1, 1, C))
        self.key = nn.Linear(C, F_, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(F_, C, bias=False)

    def forward(self, xx, sx):
        mk, mr = self.time_mix_k.view(-1), self.time_mix_r.view(-1)
        k = torch.square(torch.relu(self.key(xx * mk + sx * (1 - mk))))
        return torch.sigmoid(self.receptance(xx * mr + sx * (1 - mr))) * self.value(k)


class Block(nn.Module):
    def __init__(self, i, C, F_, A, eps):
        super().__init__()
        if i == 0:
            self.ln0 = nn.LayerNorm(C, eps=eps)
        self.ln1 = nn.LayerNorm(C, eps=eps)
        self.ln2 = nn.LayerNorm(C, eps=eps)
        self.att = TimeMix(C, A)
        self.ffn = ChannelMix(C, F_)


class Model(ReferenceModel):
    """RWKV-4 in PyTorch: ``step`` is the RNN form, ``sequence`` the parallel form (frame.py)."""

    version = VERSION

    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = dict(cfg)
        C, V = cfg["n_embd"], cfg["vocab_size"]
        self.emb = nn.Embedding(V, C)
        eps = cfg.get("ln_eps", LN_EPS)
        self.blocks = nn.ModuleList(
            Block(i, C, cfg["ffn_dim"], cfg.get("dim_att", C), eps) for i in range(cfg["n_layer"])
        )
        self.ln_out = nn.LayerNorm(C, eps=eps)
        self.head = nn.Linear(C, V, bias=False)

    @classmethod
    def from_weights(cls, w: dict, cfg: dict | None = None) -> Model:
        cfg = cfg or config_from_weights(w)
        R = cfg.get("rescale_every", 0)
        scale = {
            f"blocks.{i}.{n}.weight": 1 / 2 ** (i // R)
            for i in range(cfg["n_layer"] if R else 0)
            for n in ("att.output", "ffn.value")
        }
        return loaded(cls, cfg, w, scale=scale)

    def new_state(self, batch_size: int = 1) -> dict:
        return initial_state(state_layout(self.cfg), batch_size, None)

    def attend(self, i, blk, xx, sx, s, parallel, carry):
        out, aa, bb, pp = blk.att(xx, sx, s("wkv_aa"), s("wkv_bb"), s("wkv_pp"), parallel)
        return out, {"wkv_aa": aa, "wkv_bb": bb, "wkv_pp": pp}

    def after_layer(self, i, x):
        R = self.cfg.get("rescale_every", 0)
        return x / 2 if R and (i + 1) % R == 0 else x  # as transformers does (weights divided in from_weights)


# ---------------------------------------------------------------------------------------------
# ONNX graphs
# ---------------------------------------------------------------------------------------------
def _np(t) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def export_weights(w: dict, cfg: dict) -> dict:
    """Weights in the form the graph uses: ln0 folded into the embedding, w = -exp(time_decay)
    computed once in float32, mixing vectors flattened, matrices transposed to [in, out]."""
    C, A = cfg["n_embd"], cfg.get("dim_att", cfg["n_embd"])
    out = embedding_and_head(w, cfg)
    for i in range(cfg["n_layer"]):
        b = f"blocks.{i}."
        for n in ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias"):
            out[b + n] = _np(w[b + n])
        out[b + "att.w"] = _np(-torch.exp(w[b + "att.time_decay"].float().reshape(A)))
        out[b + "att.u"] = _np(w[b + "att.time_first"].reshape(A))
        for n in ("att.time_mix_k", "att.time_mix_v", "att.time_mix_r", "ffn.time_mix_k", "ffn.time_mix_r"):
            out[b + n] = _np(w[b + n].reshape(C))
        out.update(
            layer_matrices(
                w, b, ("att.key", "att.value", "att.receptance", "att.output", "ffn.key", "ffn.receptance", "ffn.value")
            )
        )
    return out


# -- the WKV op: standard-op bodies (also the bodies of the custom rwkv::WKV4 / WKV4Seq nodes) --
WKV4_INPUTS = ("k", "v", "w", "u", "aa", "bb", "pp")
WKV4_OUTPUTS = ("y", "aa_out", "bb_out", "pp_out")


def wkv4_step_ops(g: GraphBuilder, k, v, w, u, aa, bb, pp):
    """Standard ONNX ops for one WKV step; returns (y, aa', bb', pp').

    ``wkv4_step``'s two exponent pairs run at once, stacked on a leading axis of 2 ([2,B,C]):
    row 0 is the output's (pp against u + k), row 1 the state update's (w + pp against k). Same
    arithmetic, 17 nodes instead of 23 (the per-token cost of a node is fixed on CPU); the stacked
    [0, w] and [u, 0] depend only on weights and are constant-folded by ONNX Runtime."""
    rows = lambda first, second: g.const(np.array([first, second], np.float32).reshape(2, 1, 1))  # noqa: E731
    a = g.op("Add", [pp, g.op("Mul", [w, rows(0.0, 1.0)])])  # [pp, w + pp]
    b = g.op("Add", [k, g.op("Mul", [u, rows(1.0, 0.0)])])  # [u + k, k]
    p = g.op("Max", [a, b])
    e1 = g.op("Exp", [g.op("Sub", [a, p])])
    e2 = g.op("Exp", [g.op("Sub", [b, p])])
    num = g.op("Add", [g.op("Mul", [e1, aa]), g.op("Mul", [e2, v])])  # [y numerator, aa']
    den = g.op("Add", [g.op("Mul", [e1, bb]), e2])  # [y denominator, bb']
    ratio = g.op("Div", [num, den])  # row 0 is y (row 1 unused: dividing both rows saves a node)

    def row(x, i):  # one Gather per tensor: two from one tensor become Split + 2 Squeeze in ORT
        return g.op("Gather", [x, g.const(i, np.int64)], axis=0)

    return row(ratio, 0), row(num, 1), row(den, 1), row(p, 1)


def wkv4_seq_ops(g: GraphBuilder, k, v, w, u, aa, bb, pp):
    """The sequence WKV with standard ops: a Scan over T of the step (k, v: [B,T,C])."""
    body = GraphBuilder("wkv4_scan_body")
    from onnx import TensorProto, helper

    f32 = TensorProto.FLOAT
    names = ["aa_in", "bb_in", "pp_in", "k_t", "v_t"]
    y, aa2, bb2, pp2 = wkv4_step_ops(body, "k_t", "v_t", "w_outer", "u_outer", "aa_in", "bb_in", "pp_in")
    body.op("Identity", [aa2], "aa_out")
    body.op("Identity", [bb2], "bb_out")
    body.op("Identity", [pp2], "pp_out")
    body.op("Identity", [y], "y_t")
    body_graph = helper.make_graph(
        body.nodes,
        "wkv4_scan_body",
        [helper.make_tensor_value_info(n, f32, None) for n in names],
        [helper.make_tensor_value_info(n, f32, None) for n in ("aa_out", "bb_out", "pp_out", "y_t")],
        body.initializers,
    )
    # the body reads w and u from the enclosing scope
    for node in body_graph.node:
        for j, n in enumerate(node.input):
            if n == "w_outer":
                node.input[j] = w
            elif n == "u_outer":
                node.input[j] = u
    aa2, bb2, pp2, y = g.op(
        "Scan",
        [aa, bb, pp, k, v],
        n_out=4,
        body=body_graph,
        num_scan_inputs=2,
        scan_input_axes=[1, 1],
        scan_output_axes=[1],
    )
    return y, aa2, bb2, pp2


# -- whole graphs -------------------------------------------------------------------------------
def build_graph(g: GraphBuilder, W: dict, cfg: dict, opts: GraphOptions):
    """Step graph (tokens [B]) or sequence graph (tokens [B,T]); state in -> logits, state out.
    Matrices, precision and float16 rescaling as ``graph.Graph`` does them for every version."""
    G = Graph(g, W, cfg, state_layout(cfg), opts)
    seq = opts.seq

    def mix(sx, d, name):  # sx + (xx - sx) * time_mix: BlinkDL's RWKV-4 form
        return g.op("Add", [sx, g.op("Mul", [d, G.vec(name)])])

    x = G.embed()
    for i in range(cfg["n_layer"]):
        b = f"blocks.{i}."
        st = lambda f, i=i: f"state.{i}.{f}"  # noqa: E731 - this layer's state names
        # time mixing
        xx = G.ln(x, b + "ln1")
        sx = G.shift(xx, st("att_shift"))
        G.last(xx, f"new_state.{i}.att_shift")
        d = g.op("Sub", [xx, sx])
        k, v, r = (
            G.linear(b + "att." + n, mix(sx, d, b + "att.time_mix_" + n[0])) for n in ("key", "value", "receptance")
        )
        y = g.fresh("wkv")
        op, body = ("WKV4Seq", wkv4_seq_ops) if seq else ("WKV4", wkv4_step_ops)
        wkv_node(
            g,
            op,
            WKV4_INPUTS,
            WKV4_OUTPUTS,
            body,
            opts.plugin,
            [k, v, G.vec(b + "att.w"), G.vec(b + "att.u"), st("wkv_aa"), st("wkv_bb"), st("wkv_pp")],
            [y, f"new_state.{i}.wkv_aa", f"new_state.{i}.wkv_bb", f"new_state.{i}.wkv_pp"],
        )
        x = g.op("Add", [x, G.linear(b + "att.output", g.op("Mul", [g.op("Sigmoid", [r]), y]), layer=i)])
        # channel mixing
        xx = G.ln(x, b + "ln2")
        sx = G.shift(xx, st("ffn_shift"))
        G.last(xx, f"new_state.{i}.ffn_shift")
        d = g.op("Sub", [xx, sx])
        kv = G.linear(b + "ffn.value", G.relu_sq(G.linear(b + "ffn.key", mix(sx, d, b + "ffn.time_mix_k"))), layer=i)
        rr = g.op("Sigmoid", [G.linear(b + "ffn.receptance", mix(sx, d, b + "ffn.time_mix_r"))])
        x = G.rescale(g.op("Add", [x, g.op("Mul", [rr, kv])]), i)
    G.head(x)


def detect(w: dict) -> str | None:
    """emb.weight with att.time_first (and none of the later versions' keys, tried first)."""
    return VERSION if "emb.weight" in w and any(k.endswith("att.time_first") for k in w) else None


# the ArchSpec of this module: its functions and Model under the contract's names
SPEC = ArchSpec.of(__name__, name="RWKV-4", versions=(VERSION,), half_rescale_every=6)
