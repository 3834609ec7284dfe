"""Code shared by the multi-head (matrix-state) RWKV versions 5, 5.2, 6 and 7.

B batch, T time, C channels (n_embd), H heads, N head size (C = H*N), V vocab.

Recurrent state per layer (all float32; zeros, or a learned one: state tuning, ``load_state_tuning``):
    state.{i}.att_shift [B,C]      previous token's time-mix input (after ln1)
    state.{i}.wkv       [B,H,N,N]  the WKV state, a matrix per head
    state.{i}.ffn_shift [B,C]      previous token's channel-mix input (after ln2)
The WKV state's index order follows BlinkDL's inference code, which differs between versions
(documented in each module and in the StateSpec docs):
    RWKV-5/6: S[b,h,i,j] with i over keys, j over values:  y_j = sum_i r_i (u_i k_i v_j + S_ij)
    RWKV-7:   S[b,h,i,j] with i over values, j over keys:  y_i = sum_j S_ij r_j
Training code and state-tuning files store ``time_state`` as [H, N(value), N(key)] for every version
(RWKV-LM / RWKV-PEFT kernels), hence the transpose in ``load_state_tuning`` for 5/6 only.

Here: the state layout and state tuning, the torch WKV steps (the reference), a chunked parallel
form for 5/6, the output group norm, the ONNX bodies of the WKV ops and their table (``WKV_OPS``),
a Scan helper, and the reference model's frame. The graph plumbing every version shares (RWKV-4
too) is in graph.py, the key checks in keys.py.
"""

from __future__ import annotations

import functools
import itertools
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from onnx import helper
from torch import nn

from rwkv_runtime.manifest import BATCH, StateSpec

from ..errors import CheckpointError
from ..onnx_graph import GraphBuilder
from . import graph, keys
from .frame import ReferenceModel, loaded
from .graph import F32, GN_EPS, LN_EPS

STATE_FIELDS = ("att_shift", "wkv", "ffn_shift")


# ---------------------------------------------------------------------------------------------
# State tuning keys
# ---------------------------------------------------------------------------------------------
def time_state_keys(cfg: dict) -> dict:
    """State tuning merged into a checkpoint: an optional learned initial WKV state per layer."""
    H, N = cfg["n_head"], cfg["head_size"]
    return {f"blocks.{i}.att.time_state": (H, N, N) for i in range(cfg["n_layer"])}


def sizes(w: dict, V: int, C: int, L: int, H: int, N: int) -> dict:
    """The first entries of every head-wise version's cfg; ffn_dim is read here, after the version's
    own key checks (so a checkpoint with several faults names the same one first as before)."""
    F_ = int(keys.need(w, "blocks.0.ffn.key.weight", 2).shape[0])
    return {"n_layer": L, "n_embd": C, "vocab_size": V, "ffn_dim": F_, "n_head": H, "head_size": N}


def expected_shapes(cfg: dict, layer_shapes, gate: bool = False) -> dict:
    """``keys.model_shapes`` with what every head-wise layer has (the time-mix projections, with
    att.gate when ``gate``, and the output group norm att.ln_x) besides the version's own
    ``layer_shapes``, and, when the checkpoint carries state tuning, its time_state keys."""
    C = cfg["n_embd"]

    def layer(i, b):
        common = {b + "att.ln_x.weight": (C,), b + "att.ln_x.bias": (C,)}
        return {**keys.projection_shapes(b, C, extra=("gate",) if gate else ()), **common, **layer_shapes(i, b)}

    s = keys.model_shapes(cfg, layer)
    if cfg.get("time_state"):
        s.update(time_state_keys(cfg))
    return s


# ---------------------------------------------------------------------------------------------
# State layout and state tuning
# ---------------------------------------------------------------------------------------------
def state_layout(cfg: dict, wkv_doc: str) -> list:
    """Per layer: att_shift [B,C], wkv [B,H,N,N] (float32, index order in ``wkv_doc``), ffn_shift [B,C]."""
    C, H, N = cfg["n_embd"], cfg["n_head"], cfg["head_size"]
    shapes = {"att_shift": [BATCH, C], "wkv": [BATCH, H, N, N], "ffn_shift": [BATCH, C]}
    docs = {
        "att_shift": "previous token's time-mix input (token shift)",
        "wkv": wkv_doc,
        "ffn_shift": "previous token's channel-mix input (token shift)",
    }
    return [
        StateSpec(
            name=f"state.{i}.{f}",
            output=f"new_state.{i}.{f}",
            shape=shapes[f],
            dtype="float32",
            init=0.0,
            layer=i,
            doc=docs[f],
        )
        for i in range(cfg["n_layer"])
        for f in STATE_FIELDS
    ]


def version_state(wkv_doc: str, transpose: bool) -> tuple:
    """A version's ``state_layout(cfg)`` and ``load_state_tuning(path_or_dict, cfg)``: the shared
    ones above, in its WKV index order (``wkv_doc``; ``transpose``: see ``load_state_tuning``)."""
    return functools.partial(state_layout, wkv_doc=wkv_doc), functools.partial(load_state_tuning, transpose=transpose)


def read_time_state(path_or_dict) -> dict:
    """``blocks.N.att.time_state`` tensors from a state-tuning file (.pth/.safetensors) or a dict."""
    if isinstance(path_or_dict, dict):
        raw = path_or_dict
    else:
        p = Path(path_or_dict)
        if p.suffix == ".safetensors":
            from ..checkpoint import _safetensors_load

            raw = _safetensors_load(p)
        else:
            from ..checkpoint import _torch_load

            raw = _torch_load(p)
    return {
        k: (v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v)))
        for k, v in raw.items()
        if k.endswith("att.time_state")
    }


def load_state_tuning(path_or_dict, cfg: dict, transpose: bool) -> dict:
    """``blocks.N.att.time_state`` ([H, N(value), N(key)] as trained) -> {"state.N.wkv": [1,H,N,N] float32}
    in this version's state layout; ``transpose`` for RWKV-5/6, whose inference state is key-major.
    Batch 1; repeat along axis 0 for a larger batch. Other keys in the file are ignored."""
    ts = read_time_state(path_or_dict)
    if not ts:
        raise CheckpointError("no blocks.N.att.time_state tensors found (not a state-tuning file)")
    H, N, L = cfg["n_head"], cfg["head_size"], cfg["n_layer"]
    out = {}
    for k, v in ts.items():
        parts = k.split(".")
        i = int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else -1
        if not 0 <= i < L:
            raise CheckpointError(f"{k}: layer {i} out of range for a {L}-layer model")
        if int(np.prod(v.shape)) != H * N * N:
            raise CheckpointError(f"inconsistent shape for {k}: {list(v.shape)}, expected {[H, N, N]}")
        s = v.detach().float().reshape(H, N, N)
        if transpose:
            s = s.transpose(1, 2)
        out[f"state.{i}.wkv"] = s.contiguous().numpy()[None]
    missing = [i for i in range(L) if f"state.{i}.wkv" not in out]
    if missing:
        raise CheckpointError(f"state-tuning file lacks time_state for layers {missing[:8]}")
    return out


# ---------------------------------------------------------------------------------------------
# Torch reference pieces
# ---------------------------------------------------------------------------------------------
def group_norm(x, H: int, weight, bias):
    """ln_x: per-head normalisation of [..., C] (BlinkDL: F.group_norm with eps 64e-5)."""
    shape = x.shape
    return F.group_norm(x.reshape(-1, shape[-1]), H, weight, bias, eps=GN_EPS).reshape(shape)


def wkv5_step(r, k, v, w, u, s):
    """RWKV-5/6 WKV, one token. r,k,v [B,H,N]; w decay factor [H,N] or [B,H,N]; u bonus [H,N];
    s [B,H,N(key),N(value)]. Returns y [B,H,N], s'. Same operation order as BlinkDL."""
    a = k[..., :, None] @ v[..., None, :]  # [B,H,N,N]
    y = (r[..., None, :] @ (u[..., None] * a + s))[..., 0, :]  # [B,H,N]
    return y, a + w[..., None] * s


def wkv5_seq(r, k, v, w, u, s):
    """Token by token over [B,T,H,N]; w [H,N] or [B,T,H,N]."""
    ys = []
    for t in range(r.shape[1]):
        y, s = wkv5_step(r[:, t], k[:, t], v[:, t], w if w.dim() == 2 else w[:, t], u, s)
        ys.append(y)
    return torch.stack(ys, 1), s


def wkv5_chunked(r, k, v, logw, u, s, chunk: int = 16):
    """The parallel (chunked) form of ``wkv5_seq``, from log-decays logw = -exp(decay) ([H,N] or
    [B,T,H,N]). Within a chunk, token t reads token i < t through the decays of the tokens strictly
    between them, prod_{i<j<t} w_j = exp(c_t - c_{i+1}), c the exclusive cumulative sum of log w:
    every exponent is <= 0, so nothing overflows. A chunk's final state is carried into the next."""
    B, T, H, N = r.shape
    dt = r.dtype
    logw = logw.expand(B, T, H, N) if logw.dim() == 2 else logw
    # float64 sums: a float32 c of magnitude ~100 loses ~1e-5 absolute, i.e. relative in exp(c).
    # The clamp: a decay that underflowed to 0 (-inf) would make inf - inf = nan.
    logw = logw.double().clamp(min=-1e4)
    ys = []
    for t0 in range(0, T, chunk):
        rc, kc, vc, lw = (z[:, t0 : t0 + chunk].transpose(1, 2) for z in (r, k, v, logw))  # [B,H,L,N]
        Lc = rc.shape[2]
        c_next = torch.cumsum(lw, 2)  # c_{t+1}
        c = c_next - lw  # c_t = sum_{j<t} log w_j
        mask = torch.ones(Lc, Lc, dtype=torch.bool).tril(-1)[:, :, None]  # i < t: [L(t),L(i),1]
        diff = c[:, :, :, None, :] - c_next[:, :, None, :, :]  # c_t - c_{i+1}: [B,H,L,L,N]
        dec = torch.exp(torch.where(mask, diff, torch.full_like(diff, -torch.inf))).to(dt)  # 0 where i >= t
        att = (rc[:, :, :, None, :] * dec * kc[:, :, None, :, :]).sum(-1)  # [B,H,L(t),L(i)]
        y = att @ vc  # the chunk's earlier tokens
        y = y + (rc * u[:, None, :] * kc).sum(-1, keepdim=True) * vc  # token t itself, with the bonus u
        y = y + (rc * torch.exp(c).to(dt)) @ s  # the carried-in state, decayed to t
        ys.append(y.transpose(1, 2))
        c_end = c_next[:, :, -1:, :]  # c_L: [B,H,1,N]
        s = torch.exp(c_end).to(dt).transpose(2, 3) * s + (kc * torch.exp(c_end - c_next).to(dt)).transpose(2, 3) @ vc
    return torch.cat(ys, 1), s


def wkv7_step(r, w, k, v, a, b, s):
    """RWKV-7 WKV, one token. r,w,k,v,a,b [B,H,N] (w the decay factor in (0,1), a = -kk,
    b = kk*a_gate); s [B,H,N(value),N(key)]. S' = S diag(w) + (S a) b^T + v k^T; y = S' r."""
    s = s * w[..., None, :] + (s @ a[..., :, None]) * b[..., None, :] + v[..., :, None] * k[..., None, :]
    return (s @ r[..., :, None])[..., 0], s


def wkv7_seq(r, w, k, v, a, b, s):
    ys = []
    for t in range(r.shape[1]):
        y, s = wkv7_step(r[:, t], w[:, t], k[:, t], v[:, t], a[:, t], b[:, t], s)
        ys.append(y)
    return torch.stack(ys, 1), s


def initial_state(specs, batch_size: int, time_state: dict | None) -> dict:
    """A fresh state: every tensor at its init value, WKV states from state tuning where given."""
    st = {s.name: torch.full(s.concrete_shape(batch_size), s.init, dtype=torch.float32) for s in specs}
    for k, v in (time_state or {}).items():
        st[k] = torch.as_tensor(v).float().expand(batch_size, *v.shape[1:]).clone()
    return st


def np32(t) -> np.ndarray:
    return np.ascontiguousarray(t.detach().float().cpu().numpy())


# ---------------------------------------------------------------------------------------------
# ONNX: WKV bodies in standard ops
# ---------------------------------------------------------------------------------------------
def _unsq(g: GraphBuilder, x, axis: int):
    return g.op("Unsqueeze", [x, g.const([axis], np.int64)])


def _sq(g: GraphBuilder, x, axis: int):
    return g.op("Squeeze", [x, g.const([axis], np.int64)])


def wkv5_step_ops(g: GraphBuilder, r, k, v, w, u, s):
    """WKV5/WKV6 step: r,k,v [B,H,N], w [H,N] or [B,H,N], u [H,N], s [B,H,N,N] -> y [B,H,N], s'."""
    a = g.op("Mul", [_unsq(g, k, -1), _unsq(g, v, -2)])  # k v^T: [B,H,N,N]
    y = _sq(g, g.op("MatMul", [_unsq(g, r, -2), g.op("Add", [g.op("Mul", [_unsq(g, u, -1), a]), s])]), -2)
    s2 = g.op("Add", [a, g.op("Mul", [_unsq(g, w, -1), s])])
    return y, s2


def wkv7_step_ops(g: GraphBuilder, r, w, k, v, a, b, s):
    """WKV7 step: r,w,k,v,a,b [B,H,N], s [B,H,N(value),N(key)] -> y [B,H,N], s'."""
    sa = g.op("MatMul", [s, _unsq(g, a, -1)])  # S a: [B,H,N,1]
    s2 = g.op(
        "Add",
        [
            g.op("Add", [g.op("Mul", [s, _unsq(g, w, -2)]), g.op("Mul", [sa, _unsq(g, b, -2)])]),
            g.op("Mul", [_unsq(g, v, -1), _unsq(g, k, -2)]),
        ],
    )
    y = _sq(g, g.op("MatMul", [s2, _unsq(g, r, -1)]), -1)
    return y, s2


class _Body(GraphBuilder):
    """A Scan body: its value names carry a prefix so they never shadow the enclosing graph's."""

    def __init__(self, name: str):
        super().__init__(name)
        self._ids = itertools.count()

    def fresh(self, hint: str) -> str:
        return f"{self.name}/{hint}_{next(self._ids)}"


def scan_ops(g: GraphBuilder, name: str, step, state, xs, outer=()):
    """Run ``step(body, *xs_t, *outer, state) -> (y_t, state')`` over axis 1 of each of ``xs``
    ([B,T,...]); ``outer`` are enclosing-scope values the body reads directly. Returns (y [B,T,...],
    final state).

    An ``If`` on T: one token (a decode step through the sequence graph, the runtime's default) runs
    the step body once; longer inputs a Scan over it. onnxruntime's Scan costs a fixed overhead per
    call that at T = 1 was 8% of an int4 0.1B RWKV-7 decode step (issue #30)."""
    one = _Body(g.fresh(name + "_t1"))
    # token 0 by Gather, not Squeeze: the same at T = 1, and valid for any T, so shape inference of the
    # branch not taken holds with concrete shapes (onnxruntime checks both; a Squeeze of T = 9 fails)
    first = one.const(0, np.int64)
    y1, s1 = step(one, *[one.op("Gather", [x, first], axis=1) for x in xs], *outer, state)
    many = _Body(g.fresh(name))
    ys, sn = _scan(many, name, step, state, xs, outer)
    # y1 as [B, T, ...] from the input's shape (T = 1 here): both branches then have the same symbolic shape
    return _if_one_token(g, xs[0], one, [one.op("Reshape", [y1, one.op("Shape", [xs[0]])]), s1], many, [ys, sn])


def _scan(g: GraphBuilder, name: str, step, state, xs, outer=(), axis: int = 1):
    body = _Body(g.fresh(name))
    x_in = [body.fresh(f"x{j}") for j in range(len(xs))]
    s_in = body.fresh("state_in")
    y, s2 = step(body, *x_in, *outer, s_in)
    s_out, y_out = body.fresh("state_out"), body.fresh("y_out")
    body.op("Identity", [s2], s_out)
    body.op("Identity", [y], y_out)
    graph = helper.make_graph(
        body.nodes,
        body.name,
        [helper.make_tensor_value_info(n, F32, None) for n in [s_in] + x_in],
        [helper.make_tensor_value_info(n, F32, None) for n in (s_out, y_out)],
        body.initializers,
    )
    s_fin, ys = g.op(
        "Scan",
        [state] + list(xs),
        n_out=2,
        body=graph,
        num_scan_inputs=len(xs),
        scan_input_axes=[axis] * len(xs),
        scan_output_axes=[axis],
    )
    return ys, s_fin


def wkv5_seq_ops(g, r, k, v, w, u, s):
    """WKV5Seq: r,k,v [B,T,H,N], w [H,N] (constant over time), u [H,N] -> y [B,T,H,N], s'. One token:
    the step body; more: the chunked form (``wkv5_chunked_ops``)."""
    return _wkv5_if_one_token(g, "wkv5", r, k, v, w, u, s, per_token_w=False)


def wkv6_seq_ops(g, r, k, v, w, u, s):
    """WKV6Seq: r,k,v,w [B,T,H,N], u [H,N] -> y [B,T,H,N], s'. One token: the step body; more: the
    chunked form (``wkv5_chunked_ops``)."""
    return _wkv5_if_one_token(g, "wkv6", r, k, v, w, u, s, per_token_w=True)


def _wkv5_if_one_token(g: GraphBuilder, name: str, r, k, v, w, u, s, per_token_w: bool):
    one = _Body(g.fresh(name + "_t1"))
    # token 0 by Gather, not Squeeze: valid for any T, so shape inference of the branch not taken holds
    first = one.const(0, np.int64)
    tok = lambda x: one.op("Gather", [x, first], axis=1)  # noqa: E731
    y1, s1 = wkv5_step_ops(one, tok(r), tok(k), tok(v), tok(w) if per_token_w else w, u, s)
    many = _Body(g.fresh(name + "_chunked"))
    ys, sn = wkv5_chunked_ops(many, r, k, v, w, u, s)
    # y1 as [B, T, ...] from r's shape (T = 1 here): both branches then have the same symbolic shape
    return _if_one_token(g, r, one, [one.op("Reshape", [y1, one.op("Shape", [r])]), s1], many, [ys, sn])


# tokens per chunk: the [B,H,T/L,L,L,N] decay tensor grows with L, the Scan's steps shrink with it. One
# RWKV-6 0.1B-shaped layer, 512 tokens, one thread: L = 4 19.9 ms, 8 16.0 ms, 16 18.9 ms, 32 31.7 ms, the
# per-token Scan 34.3 ms (scripts/bench_wkv5_chunked.py --wkv-only, docs/benchmarks.md)
WKV5_CHUNK = 8
WKV5_LOG_FLOOR = -1e4  # log w below this is as good as -inf (exp gives 0) and keeps inf - inf out


def wkv5_chunked_ops(g: GraphBuilder, r, k, v, w, u, s, L: int = WKV5_CHUNK):
    """WKV5Seq/WKV6Seq in chunks of L tokens: the math of ``wkv5_chunked`` in float32 ONNX ops.
    r,k,v [B,T,H,N]; w the decay factor in [0,1], [H,N] (RWKV-5, constant) or [B,T,H,N] (RWKV-6);
    u [H,N]; s [B,H,N(key),N(value)] -> y [B,T,H,N], the final state.

    With S0 the state entering a chunk and every exponent a sum of log w over the tokens between
    (never a difference of two cumulative sums: RWKV-5/6 decays reach log w = -300 per token, where
    exp(c_t) exp(-c_i) over- or underflows float32 and c_t - c_i cancels):
        D[t,i] = sum_{i<j<t} log w_j    E[t] = sum_{j<t} log w_j    F[i] = sum_{i<j<L} log w_j
        y_t = sum_{i<t} (r_t . e^{D[t,i]} . k_i) v_i + (r_t . u . k_t) v_t + (r_t e^{E[t]}) S0
        S_L = diag(e^{sum_j log w_j}) S0 + sum_i (k_i e^{F[i]}) v_i^T
    D, E and F are MatMuls of constant 0/1 masks with the chunk's log w (the chunk's total a
    ReduceSum), so every exponent is <= 0 and accurate to float32 rounding of its own size. The
    [B,H,T/L,L,L,N] tensors of D make memory grow as B*T*L*C (RWKV-5's D has batch 1). Everything but S0's terms is computed for all
    chunks at once; a Scan over the chunks carries the state (one MatMul+Add for y, one Mul+Add for
    the state). T is padded to a multiple of L with w = 1 and zeros (tokens that leave the state
    unchanged); the padding's outputs are cut off. RWKV-5's w stays batch 1 ([1,T,H,N])."""
    i64 = lambda v_: g.const(v_, np.int64)  # noqa: E731
    mm = lambda x, y: g.op("MatMul", [x, y])  # noqa: E731
    f32 = lambda a: g.const(np.asarray(a, np.float32))  # noqa: E731
    hd = g.op("Shape", [r])  # [B, T, H, N]
    T = g.op("Gather", [hd, i64(1)], axis=0)
    T1 = g.op("Unsqueeze", [T, i64([0])])
    HN = g.op("Slice", [hd, i64([2]), i64([4])])
    pad = g.op("Mod", [g.op("Sub", [i64(L), g.op("Mod", [T, i64(L)])]), i64(L)])  # (-T) mod L
    pads = g.op("Concat", [i64([0, 0, 0, 0, 0]), g.op("Unsqueeze", [pad, i64([0])]), i64([0, 0])], axis=0)
    chunked = g.op("Concat", [i64([0, -1, L]), HN], axis=0)  # [B (copied), NC, L, H, N]

    def blocks(x):  # [B,T,H,N] -> [B,H,NC,L,N]
        x = g.op("Reshape", [g.op("Pad", [x, pads]), chunked])
        return g.op("Transpose", [x], perm=[0, 3, 1, 2, 4])

    # [H,N] -> [1,T,H,N]; [B,T,H,N] stays (Expand broadcasts both ways)
    w = g.op("Expand", [w, g.op("Concat", [i64([1]), T1, HN], axis=0)])
    lw = blocks(g.op("Max", [g.op("Log", [w]), f32(WKV5_LOG_FLOOR)]))  # [B|1,H,NC,L,N]; padding 0: w = 1
    r_, k_, v_ = (blocks(x) for x in (r, k, v))
    # D by one MatMul with a 0/1 mask over the chunk's L tokens plus one more of log w = floor, which
    # rows (t, i >= t) read: e^D is then 0 there without masking the [.., L, L, N] tensor
    t_, i_, j_ = np.ogrid[:L, :L, : L + 1]
    between = ((i_ < j_) & (j_ < t_)) | ((j_ == L) & (i_ >= t_))  # row (t, i), column j
    lw_ext = g.op("Pad", [lw, i64([0, 0, 0, 0, 0, 0, 0, 0, 1, 0]), f32(WKV5_LOG_FLOOR)])  # [.., L+1, N]
    D = g.op("Reshape", [mm(f32(between.reshape(L * L, L + 1)), lw_ext), i64([0, 0, 0, L, L, -1])])
    # [B|1,H,NC,L(t),L(i),N]
    rDk = g.op("Mul", [g.op("Mul", [_unsq(g, r_, -2), g.op("Exp", [D])]), _unsq(g, k_, -3)])
    att = g.op("ReduceSum", [rDk, i64([-1])], keepdims=0)  # [B,H,NC,L(t),L(i)]: k_i's weight in y_t, i < t
    # token t itself, with the bonus u
    ruk = g.op("Mul", [g.op("Mul", [r_, g.op("Unsqueeze", [u, i64([1, 2])])]), k_])
    bonus = g.op("ReduceSum", [ruk, i64([-1])], keepdims=1)  # [B,H,NC,L,1]
    strict = np.tril(np.ones((L, L), np.float32), -1)  # j < t (E below); its transpose j > i (F)
    Y0 = g.op("Add", [mm(att, v_), g.op("Mul", [bonus, v_])])  # the chunk's own tokens: [B,H,NC,L,N(value)]
    RQ = g.op("Mul", [r_, g.op("Exp", [mm(f32(strict), lw)])])  # r_t e^{E[t]}: reads S0
    KF = g.op("Mul", [k_, g.op("Exp", [mm(f32(strict.T), lw)])])  # k_i e^{F[i]}: into S_L
    Hm = mm(g.op("Transpose", [KF], perm=[0, 1, 2, 4, 3]), v_)  # [B,H,NC,N(key),N(value)]
    decay = g.op("Exp", [g.op("ReduceSum", [lw, i64([3])], keepdims=1)])  # [B|1,H,NC,1,N]
    decay = g.op("Transpose", [decay], perm=[0, 1, 2, 4, 3])  # per key row: [B|1,H,NC,N,1]

    def chunk(body, rq, y0, h_, d_, st):  # y = RQ S0 + Y0; S_L = diag(d) S0 + Hm
        return (
            body.op("Add", [body.op("MatMul", [rq, st]), y0]),
            body.op("Add", [body.op("Mul", [st, d_]), h_]),
        )

    yc, s_fin = _scan(g, "wkv5_chunks", chunk, s, [RQ, Y0, Hm, decay], axis=2)  # yc [B,H,NC,L,N]
    y = g.op("Transpose", [yc], perm=[0, 2, 3, 1, 4])  # [B,NC,L,H,N]
    y = g.op("Reshape", [y, g.op("Concat", [i64([0, -1]), HN], axis=0)])
    y = g.op("Slice", [y, i64([0]), T1, i64([1])])
    return y, s_fin


def wkv7_seq_ops(g, r, w, k, v, a, b, s):
    """WKV7Seq: r,w,k,v,a,b [B,T,H,N] -> y [B,T,H,N], s'. One token: the step body; more: the
    chunked form (``wkv7_chunked_ops``)."""
    one = _Body(g.fresh("wkv7_t1"))
    y1, s1 = _wkv7_one_token(one, r, w, k, v, a, b, s)
    many = _Body(g.fresh("wkv7_chunked"))
    ys, sn = wkv7_chunked_ops(many, r, w, k, v, a, b, s)
    return _if_one_token(g, r, one, [y1, s1], many, [ys, sn])


def _wkv7_one_token(g: GraphBuilder, r, w, k, v, a, b, s):
    """``wkv7_step_ops`` on [B,1,H,N] inputs. The six inputs are concatenated along N and cut to token 0
    by one Slice (the same at T = 1, and it keeps this branch's shapes valid for any T: onnxruntime
    infers the shapes of both If branches, TensorRT builds both), brought to row form [B,H,1,6N] by one
    Reshape (a copy-free move at T = 1; onnxruntime's transpose optimizer would push a Transpose through
    the Split, one per input again) and split; r, a and v are reshaped to columns [B,H,N,1]. 16 nodes
    where a Slice and a Transpose per input took 20: each costs a few microseconds per decode step.
    y comes back as [B,1,H,N]."""
    i64 = lambda x: g.const(x, np.int64)  # noqa: E731
    cat = g.op("Slice", [g.op("Concat", [r, w, k, v, a, b], axis=-1), i64([0]), i64([1]), i64([1])])  # [B,1,H,6N]
    rows = g.op("Reshape", [cat, i64([0, -1, 1, 0])])  # [B,H,1,6N]
    r, w, k, v, a, b = g.op("Split", [rows], n_out=6, axis=-1, num_outputs=6)  # each [B,H,1,N]
    col = lambda x: g.op("Reshape", [x, i64([0, 0, -1, 1])])  # noqa: E731 - [B,H,1,N] -> [B,H,N,1]
    sa = g.op("MatMul", [s, col(a)])  # S a: [B,H,N,1]
    s2 = g.op("Add", [g.op("Add", [g.op("Mul", [s, w]), g.op("Mul", [sa, b])]), g.op("Mul", [col(v), k])])
    y = g.op("Transpose", [g.op("MatMul", [s2, col(r)])], perm=[0, 3, 1, 2])  # [B,H,N,1] -> [B,1,H,N]
    return y, s2


WKV7_CHUNK = 16  # tokens per chunk: 1 / prod(w) over a chunk stays below e^(16 * 0.6065) = 1.6e4


def wkv7_chunked_ops(g: GraphBuilder, r, w, k, v, a, b, s, L: int = WKV7_CHUNK):
    """WKV7Seq in chunks of L tokens (the parallel form of fla's chunked delta rule): within a chunk the
    recurrence S_t = S_{t-1} (diag(w_t) + a_t b_t^T) + v_t k_t^T becomes matrix products, and only
    the state passes from chunk to chunk (a Scan of two MatMul+Add pairs per chunk).

    With c_t = sum_{j<=t} log w_j (inclusive, within the chunk), u_t = S_{t-1} a_t and the row
    vectors a~_t = a_t e^{c_{t-1}}, r~_t = r_t e^{c_t}, b~_i = b_i e^{-c_i}, k~_i = k_i e^{-c_i}:
        u_t = S0 a~_t + sum_{i<t} (a~_t.b~_i) u_i + (a~_t.k~_i) v_i     ->  U = (I - A_ab)^-1 (A~ S0^T + A_ak V)
        y_t = S0 r~_t + sum_{i<=t} (r~_t.b~_i) u_i + (r~_t.k~_i) v_i
        S_L = S0 diag(e^{c_L}) + sum_i u_i (b~_i e^{c_L})^T + v_i (k~_i e^{c_L})^T
    U is linear in S0, so y = S0 Q + Y0 and S_L = S0 G + Hm with Q, Y0, G, Hm computed for every
    chunk at once before the Scan. (I - A)^-1 of the strictly lower triangular A is the product
    (I + A)(I + A^2)(I + A^4)(I + A^8) (A^16 = 0). RWKV-7's decay w > e^-0.6065 keeps e^{-c} < 1.6e4
    within 16 tokens, far from float32's range. T is padded to a multiple of L with w = 1 and zeros
    (tokens that leave the state unchanged); the padding's outputs are cut off."""
    i64 = lambda v_: g.const(v_, np.int64)  # noqa: E731
    mm = lambda x, y: g.op("MatMul", [x, y])  # noqa: E731
    T = g.op("Gather", [g.op("Shape", [r]), i64(1)], axis=0)
    pad = g.op("Mod", [g.op("Sub", [i64(L), g.op("Mod", [T, i64(L)])]), i64(L)])  # (-T) mod L
    pads = g.op("Concat", [i64([0, 0, 0, 0, 0]), g.op("Unsqueeze", [pad, i64([0])]), i64([0, 0])], axis=0)
    hd = g.op("Shape", [r])  # [B, T, H, N]
    B_, HN = g.op("Slice", [hd, i64([0]), i64([1])]), g.op("Slice", [hd, i64([2]), i64([4])])
    chunked = g.op("Concat", [B_, i64([-1, L]), HN], axis=0)  # [B, NC, L, H, N]

    def blocks(x):  # [B,T,H,N] -> [B,H,NC,L,N]
        x = g.op("Reshape", [g.op("Pad", [x, pads]), chunked])
        return g.op("Transpose", [x], perm=[0, 3, 1, 2, 4])

    lw = blocks(g.op("Log", [w]))  # padding 0: w = 1
    r_, k_, v_, a_, b_ = (blocks(x) for x in (r, k, v, a, b))
    c = g.op("CumSum", [lw, i64(3)])  # inclusive, over the chunk's L
    c_prev = g.op("Sub", [c, lw])
    c_last = g.op("Slice", [c, i64([-1]), i64([L]), i64([3])])  # [B,H,NC,1,N]
    inv = g.op("Exp", [g.op("Neg", [c])])
    at = g.op("Mul", [a_, g.op("Exp", [c_prev])])
    rt = g.op("Mul", [r_, g.op("Exp", [c])])
    bt, kt = g.op("Mul", [b_, inv]), g.op("Mul", [k_, inv])
    btT, ktT = (g.op("Transpose", [x], perm=[0, 1, 2, 4, 3]) for x in (bt, kt))  # [B,H,NC,N,L]
    strict = g.const(np.tril(np.ones((L, L), np.float32), -1))
    incl = g.const(np.tril(np.ones((L, L), np.float32)))
    A_ab, A_ak = g.op("Mul", [mm(at, btT), strict]), g.op("Mul", [mm(at, ktT), strict])
    A_rb, A_rk = g.op("Mul", [mm(rt, btT), incl]), g.op("Mul", [mm(rt, ktT), incl])
    # (I - A_ab)^-1
    eye = g.const(np.eye(L, dtype=np.float32))
    p, inv_m = A_ab, g.op("Add", [eye, A_ab])
    for _ in range(int(np.log2(L)) - 1):
        p = mm(p, p)
        inv_m = mm(inv_m, g.op("Add", [eye, p]))
    P = mm(inv_m, at)  # U = P S0^T + W1: [B,H,NC,L,N(key)]
    W1 = mm(inv_m, mm(A_ak, v_))  # [B,H,NC,L,N(value)]
    Q = g.op("Add", [rt, mm(A_rb, P)])  # y = Q S0^T + Y0
    Y0 = g.op("Add", [mm(A_rb, W1), mm(A_rk, v_)])
    decay = g.op("Exp", [c_last])  # [B,H,NC,1,N]
    bh = g.op("Mul", [bt, decay])  # b~ e^{c_L}: [B,H,NC,L,N]
    kh = g.op("Mul", [kt, decay])
    G = mm(g.op("Transpose", [P], perm=[0, 1, 2, 4, 3]), bh)  # P^T b^ (the diagonal decay: in the Scan)
    Hm = g.op(
        "Add",
        [mm(g.op("Transpose", [W1], perm=[0, 1, 2, 4, 3]), bh), mm(g.op("Transpose", [v_], perm=[0, 1, 2, 4, 3]), kh)],
    )  # [B,H,NC,N(value),N(key)]
    QT = g.op("Transpose", [Q], perm=[0, 1, 2, 4, 3])  # [B,H,NC,N(key),L]
    Y0T = g.op("Transpose", [Y0], perm=[0, 1, 2, 4, 3])  # [B,H,NC,N(value),L]

    def chunk(body, qt, y0t, g_, h_, d_, st):  # y^T = S0 Q^T + Y0^T; S_L = S0 diag(d) + S0 G + Hm
        return (
            body.op("Add", [body.op("MatMul", [st, qt]), y0t]),
            body.op("Add", [body.op("Add", [body.op("Mul", [st, d_]), body.op("MatMul", [st, g_])]), h_]),
        )

    yT, s_fin = _scan(g, "wkv7_chunks", chunk, s, [QT, Y0T, G, Hm, decay], axis=2)  # yT [B,H,NC,N(value),L]
    y = g.op("Transpose", [yT], perm=[0, 2, 4, 1, 3])  # [B,NC,L,H,N]
    y = g.op("Reshape", [y, g.op("Concat", [B_, i64([-1]), HN], axis=0)])
    y = g.op("Slice", [y, i64([0]), g.op("Unsqueeze", [T, i64([0])]), i64([1])])
    return y, s_fin


def _if_one_token(g: GraphBuilder, x, one: _Body, one_outs, many: _Body, many_outs):
    """If T (axis 1 of ``x``) == 1: ``one``'s graph, else ``many``'s; returns the two outputs."""

    def branch(b: _Body, outs):
        # outputs must be named in the branch itself: an Identity only for a value it does not produce
        # (or one returned twice); a kept Identity copies the whole state on every decode step
        made = {o for n in b.nodes for o in n.output}
        ids = [o if o in made and outs.count(o) == 1 else b.op("Identity", [o]) for o in outs]
        return helper.make_graph(
            b.nodes, b.name, [], [helper.make_tensor_value_info(n, F32, None) for n in ids], b.initializers
        )

    # T == 1 once per graph, not per layer (3 nodes each): every WKV input of a graph has the tokens' T
    cond = getattr(g, "_t_is_one", None)
    if cond is None:
        T = g.op("Gather", [g.op("Shape", [x]), g.const(1, np.int64)], axis=0)
        cond = g._t_is_one = g.op("Equal", [T, g.const(1, np.int64)])
    return g.op(
        "If",
        [cond],
        n_out=2,
        then_branch=branch(one, one_outs),
        else_branch=branch(many, many_outs),
    )


WKV_OPS = {  # op type -> (formal inputs, standard-op body)
    "WKV5": (["r", "k", "v", "w", "u", "state"], wkv5_step_ops),
    "WKV5Seq": (["r", "k", "v", "w", "u", "state"], wkv5_seq_ops),
    "WKV6": (["r", "k", "v", "w", "u", "state"], wkv5_step_ops),
    "WKV6Seq": (["r", "k", "v", "w", "u", "state"], wkv6_seq_ops),
    "WKV7": (["r", "w", "k", "v", "a", "b", "state"], wkv7_step_ops),
    "WKV7Seq": (["r", "w", "k", "v", "a", "b", "state"], wkv7_seq_ops),
}


def wkv_node(g: GraphBuilder, op_type: str, plugin: bool, ins, outs):
    """The WKV of one layer (``WKV_OPS[op_type]``), inline or as a custom node: ``graph.wkv_node``."""
    formal, body = WKV_OPS[op_type]
    graph.wkv_node(g, op_type, formal, ["y", "state_out"], body, plugin, ins, outs)


# ---------------------------------------------------------------------------------------------
# The reference model's frame, shared by RWKV-5/6/7 (each module supplies its time mixing)
# ---------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, i, cfg, time_mix, channel_mix):
        super().__init__()
        C = cfg["n_embd"]
        if i == 0:
            self.ln0 = nn.LayerNorm(C, eps=LN_EPS)
        self.ln1 = nn.LayerNorm(C, eps=LN_EPS)
        self.ln2 = nn.LayerNorm(C, eps=LN_EPS)
        self.att = time_mix(i, cfg)
        self.ffn = channel_mix(C, cfg["ffn_dim"])


class ChannelMix(nn.Module):
    """RWKV-5/6's channel mix (RWKV-4's): sigmoid(receptance(x_r)) * value(relu(key(x_k))^2), x_m the
    token-shift mix of xx and sx under the parameter ``{prefix}_m``. RWKV-5's time_mix_* in BlinkDL's
    form xx*m + sx*(1-m), RWKV-6's time_maa_* as xx + (sx-xx)*m: each rounds as BlinkDL's code does."""

    def __init__(self, C, F_, prefix: str):
        super().__init__()
        self.prefix = prefix
        for m in "kr":
            setattr(self, f"{prefix}_{m}", nn.Parameter(torch.zeros(C)))
        self.key = nn.Linear(C, F_, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(F_, C, bias=False)

    def mix(self, xx, sx, m: str):
        mm = getattr(self, f"{self.prefix}_{m}")
        return xx * mm + sx * (1 - mm) if self.prefix == "time_mix" else xx + (sx - xx) * mm

    def forward(self, xx, sx):
        k = torch.square(torch.relu(self.key(self.mix(xx, sx, "k"))))
        return torch.sigmoid(self.receptance(self.mix(xx, sx, "r"))) * self.value(k)


class HeadwiseModel(ReferenceModel):
    """Embedding, blocks, head and the state of RWKV-5/6/7 (the loop: frame.py). A version module
    subclasses it with ``time_mix`` / ``channel_mix`` (module factories); ``version``,
    ``config_from_weights``, ``state_layout`` and ``load_state_tuning`` come from the subclass's own
    module (its VERSION and functions), as ``ArchSpec.of`` takes them. ``attend`` is RWKV-5/6's;
    RWKV-7 overrides it (v_first)."""

    version = ""
    config_from_weights = state_layout = load_state_tuning = None
    drop_keys: tuple = ()  # checkpoint keys the model ignores (RWKV-7's unused layer-0 v0/v1/v2)

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        mod = vars(sys.modules[cls.__module__])
        cls.version = mod["VERSION"]
        for f in ("config_from_weights", "state_layout", "load_state_tuning"):
            setattr(cls, f, staticmethod(mod[f]))

    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = dict(cfg)
        C, V = cfg["n_embd"], cfg["vocab_size"]
        self.emb = nn.Embedding(V, C)
        self.blocks = nn.ModuleList(Block(i, cfg, self.time_mix, self.channel_mix) for i in range(cfg["n_layer"]))
        self.ln_out = nn.LayerNorm(C, eps=LN_EPS)
        self.head = nn.Linear(C, V, bias=False)
        self.time_state = None  # {"state.N.wkv": [1,H,N,N]} when the checkpoint carries state tuning

    @classmethod
    def from_weights(cls, w: dict, cfg: dict | None = None):
        cfg = cfg or cls.config_from_weights(w)
        m = loaded(cls, cfg, w, drop=cls.drop_keys)
        if cfg.get("time_state"):
            m.time_state = cls.load_state_tuning(w, cfg)
        return m

    def new_state(self, batch_size: int = 1) -> dict:
        """Zeros, or the checkpoint's learned initial WKV state (as BlinkDL's package does)."""
        return initial_state(self.state_layout(self.cfg), batch_size, self.time_state)

    def attend(self, i, blk, xx, sx, s, parallel, carry):
        out, wkv = blk.att(xx, sx, s("wkv"), parallel)
        return out, {"wkv": wkv}
