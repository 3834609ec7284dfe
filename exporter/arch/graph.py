"""The graph plumbing every RWKV version shares: graph I/O from the state layout, the precision
policy, the matrix products (Gemm or MatMul), layer norms, token shift, the head, and the WKV node.

Precision policy (one rule for every version; docs/architecture.md): with a reduced ``dtype``
(float16, bfloat16) only the embedding table, the large matrices and their MatMul/Gemm run in it,
behind explicit Casts (a strongly typed graph). Everything elementwise -- the residual stream, the
layer/group norms, token shift, relu(key)^2, the gates, the LoRA matrices, the WKV and the state --
stays float32. ``rescale_every`` n: BlinkDL's float16 scheme (att.output/ffn.value divided by
2^(layer // n), the residual halved after every n-th block) keeps those products inside float16.

Matrix products: the step graph (one token, x [B,C]) stores each large matrix [out, in] and uses
``Gemm(transB=1)``: each output is one contiguous row's dot product, measured faster than MatMul
with [in, out] on onnxruntime's CPU provider for RWKV-4 (docs/benchmarks.md has the v5/6/7 figures).
The sequence graph (x [B,T,C]) and weight-only quantised exports (onnxruntime's MatMulNBits
quantiser rewrites MatMul nodes only) use MatMul with [in, out].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto, helper

from rwkv_runtime.manifest import BATCH

from ..onnx_graph import CUSTOM_DOMAIN, GraphBuilder, LazyArray, make_function

LN_EPS = 1e-5
GN_EPS = 64e-5  # BlinkDL's ln_x eps: 1e-5 after dividing by head_size_divisor 8, i.e. 1e-5 * 8**2
F32 = TensorProto.FLOAT


@dataclass(frozen=True)
class GraphOptions:
    """What to build. ``gemm``: Gemm(transB) for the step graph's large matrices (off when the
    graph will be weight-only quantised)."""

    seq: bool = False
    plugin: bool = False
    all_logits: bool = False
    dtype: type = np.float32
    rescale_every: int = 0
    gemm: bool = True


class Graph:
    """Declares the I/O and offers the per-token building blocks; ``x`` tensors are [B,C] (step)
    or [B,T,C] (sequence). Weights come from ``W`` (a version's ``export_weights``: vectors flat,
    matrices [in, out])."""

    def __init__(self, g: GraphBuilder, W: dict, cfg: dict, specs, opts: GraphOptions):
        self.g, self.W, self.cfg, self.opts = g, W, cfg, opts
        self.seq, self.all_logits = opts.seq, opts.all_logits
        self.lo = np.dtype(opts.dtype)
        self.lo_onnx = helper.np_dtype_to_tensor_dtype(self.lo)
        self.rescale_every = int(opts.rescale_every or 0)
        self.gemm = opts.gemm  # both graphs: the same [out, in] arrays, stored once in a shared weights file
        self.eps = cfg.get("ln_eps", LN_EPS)
        self._added: dict = {}
        self._shapes: dict = {}
        V = cfg["vocab_size"]
        self.tokens = g.input("tokens", "int64", [BATCH, "T"] if self.seq else [BATCH])
        for s in specs:
            g.input(s.name, "float32", s.shape)
        g.output("logits", "float32", ([BATCH, "T", V] if self.all_logits else [BATCH, V]) if self.seq else [BATCH, V])
        for s in specs:
            g.output(s.output, "float32", s.shape)

    def vec(self, name, dtype=np.float32, array=None):
        """An initializer (float32 unless told: vectors, small LoRA matrices), added once."""
        if name not in self._added:
            arr = self.W[name] if array is None else array
            if isinstance(arr, LazyArray):  # computed when written (GraphBuilder.weight), not here
                self._added[name] = self.g.weight(name, arr, dtype)
            else:
                self._added[name] = self.g.weight(name, np.asarray(arr).astype(dtype, copy=False))
        return self._added[name]

    def cast(self, x, to):
        if self.lo == np.float32:
            return x
        return self.g.op("Cast", [x], to=F32 if to == "f32" else self.lo_onnx)

    def linear(self, name, x, layer: int | None = None, rows: bool = False):
        """x @ W[name] in the graph's precision; float32 in and out. ``layer``: a matrix whose
        output feeds the residual stream, scaled down there when rescaling. ``rows``: x is [B, in]
        in the sequence graph too (the head reading only the last position)."""
        array = self.W[name]
        if layer is not None and self.rescale_every:
            array = array / np.float32(2 ** (layer // self.rescale_every))
        x = self.cast(x, "lo")
        if self.gemm:
            # a LazyArray's .T is the checkpoint's own [out, in] layout: nothing to transpose
            w = self.vec(name, self.lo, array.T if isinstance(array, LazyArray) else np.ascontiguousarray(array.T))
            if not self.seq or rows:
                y = self.g.op("Gemm", [x, w], transB=1)
            else:  # Gemm is 2-D: [B, T, in] -> [B*T, in] -> [B*T, out] -> [B, T, out]
                g = self.g
                flat = g.op("Gemm", [g.op("Reshape", [x, g.const([-1, array.shape[0]], np.int64)]), w], transB=1)
                y = g.op("Reshape", [flat, self._bt_shape(array.shape[1])])
        else:
            y = self.g.op("MatMul", [x, self.vec(name, self.lo, array)])
        return self.cast(y, "f32")

    def _bt_shape(self, n: int):
        """The shape [B, T, n] as a tensor, built once per n from the tokens' shape: each node costs
        a fixed few microseconds per call on CPU, so the sequence graph's matrix products share it."""
        if "bt" not in self._shapes:
            self._shapes["bt"] = self.g.op("Shape", [self.tokens])
        if n not in self._shapes:
            self._shapes[n] = self.g.op("Concat", [self._shapes["bt"], self.g.const([n], np.int64)], axis=0)
        return self._shapes[n]

    def rescale(self, x, layer: int):
        """After block ``layer``: halve the residual stream every ``rescale_every`` blocks."""
        if self.rescale_every and (layer + 1) % self.rescale_every == 0:
            return self.g.op("Mul", [x, self.g.const(0.5)])
        return x

    def mm(self, x, name):
        """x @ W[name] in float32 (LoRA matrices: BlinkDL keeps them out of quantisation)."""
        return self.g.op("MatMul", [x, self.vec(name)])

    def ln(self, x, pre):
        return self.g.op(
            "LayerNormalization", [x, self.vec(pre + ".weight"), self.vec(pre + ".bias")], axis=-1, epsilon=self.eps
        )

    def shift(self, xx, prev):
        """The previous token's input for every position: prev (step) or [prev, xx_0..xx_{T-2}]."""
        g = self.g
        if not self.seq:
            return prev
        head = g.op("Unsqueeze", [prev, g.const([1], np.int64)])
        body = g.op("Slice", [xx, g.const([0], np.int64), g.const([-1], np.int64), g.const([1], np.int64)])
        return g.op("Concat", [head, body], axis=1)

    def last(self, xx, out):
        """The last position of ``xx`` under the name ``out`` (a state output)."""
        g = self.g
        if not self.seq:
            return g.op("Identity", [xx], out)
        lastx = g.op("Slice", [xx, g.const([-1], np.int64), g.const([2**62], np.int64), g.const([1], np.int64)])
        return g.op("Squeeze", [lastx, g.const([1], np.int64)], out)

    def mixes(self, xx, dx, names, key):
        """``xx + dx * W[n]`` for each vector name in ``names`` (the token-shift lerps), as one Mul and one
        Add over the stacked [len(names) * C] vectors (initializer ``key``) and one Split back to [B,(T),C]
        each: 5 nodes for RWKV-7's six lerps instead of 12 (each node costs a few microseconds per decode
        step on CPU). Tile only copies, so every value is the same float32 arithmetic as one lerp each."""
        g, C, k = self.g, self.cfg["n_embd"], len(names)
        stacked = self.vec(key, array=np.concatenate([np.asarray(self.W[n], np.float32).reshape(C) for n in names]))
        reps = g.const([1, 1, k] if self.seq else [1, k], np.int64)
        m = g.op("Add", [g.op("Tile", [xx, reps]), g.op("Mul", [g.op("Tile", [dx, reps]), stacked])])
        return g.op("Split", [m, g.const([C] * k, np.int64)], n_out=k, axis=-1)

    def relu_sq(self, x):
        """relu(x)^2, the channel mix's activation (float32, as every elementwise op)."""
        r = self.g.op("Relu", [x])
        return self.g.op("Mul", [r, r])

    def heads(self, x):
        """[B,(T),C] -> [B,(T),H,N]."""
        H, N = self.cfg["n_head"], self.cfg["head_size"]
        return self.g.op("Reshape", [x, self.g.const([0, 0, H, N] if self.seq else [0, H, N], np.int64)])

    def flat(self, x):
        """[B,(T),H,N] -> [B,(T),C]."""
        C = self.cfg["n_embd"]
        return self.g.op("Reshape", [x, self.g.const([0, 0, C] if self.seq else [0, C], np.int64)])

    def group_norm(self, y, pre):
        """ln_x on the WKV output in head form [B,(T),H,N] -> [B,(T),C]. LayerNormalization over the
        head size is the group norm; its affine weights are per channel ([H,N]), applied after."""
        g, N = self.g, self.cfg["head_size"]
        yn = g.op("LayerNormalization", [y, g.const(np.ones(N, np.float32))], axis=-1, epsilon=GN_EPS)
        yn = g.op("Add", [g.op("Mul", [yn, self.vec(pre + ".weight")]), self.vec(pre + ".bias")])
        return self.flat(yn)

    def embed(self):
        return self.cast(self.g.op("Gather", [self.vec("emb", self.lo), self.tokens], axis=0), "f32")

    def head(self, x):
        """ln_out and the head: the last thing every build_graph writes (it also tidies the graph)."""
        g = self.g
        last = self.seq and not self.all_logits
        if last:
            x = self.last(x, g.fresh("x_last"))
        g.op("Identity", [self.linear("head", self.ln(x, "ln_out"), rows=last)], "logits")
        elide_identities(g)


def wkv_node(g: GraphBuilder, op_type: str, formal_inputs, formal_outputs, body, plugin: bool, ins, outs):
    """The WKV of one layer: ``body(g, *ins)``'s standard ops inline (plain), or one
    ``rwkv::<op_type>`` node (plugin) backed by a model-local function with the same body (ONNX
    Runtime inlines it; TensorRT's parser prefers a registered plugin of that op type)."""
    if not plugin:
        for r, o in zip(body(g, *ins), outs):
            g.op("Identity", [r], o)
        return
    if (CUSTOM_DOMAIN, op_type) not in g.functions:
        # make_function renames the producers of the returned values but not their other readers
        # (WKV7's y reads the new state): return fresh Identity copies
        def fn_body(fg, *a):
            return [fg.op("Identity", [r]) for r in body(fg, *a)]

        g.add_function(
            make_function(
                op_type,
                list(formal_inputs),
                list(formal_outputs),
                fn_body,
                attributes=["plugin_version", "plugin_namespace"],
            )
        )
    g.op(op_type, ins, outs, domain=CUSTOM_DOMAIN, plugin_version="1", plugin_namespace=CUSTOM_DOMAIN)


def elide_identities(g: GraphBuilder):
    """Let the node producing a value write it under its graph-output name, dropping the Identity
    that copied it there (``last``, ``wkv_node``, the logits): ONNX Runtime keeps such copies, and
    each node costs a fixed few microseconds per token on CPU. Values read inside a subgraph (Scan
    bodies) and graph inputs keep their names."""
    outputs = {o.name for o in g.outputs}
    produced = {o for n in g.nodes for o in n.output}
    in_subgraphs = set()
    for n in g.nodes:
        for a in n.attribute:
            if a.type == a.GRAPH:
                in_subgraphs |= {i for sub in a.g.node for i in sub.input}
    rename, keep = {}, []
    for n in g.nodes:
        src = n.input[0] if n.op_type == "Identity" else None
        if (
            src
            and n.output[0] in outputs
            and src in produced
            and src not in outputs
            and src not in rename
            and src not in in_subgraphs
        ):
            rename[src] = n.output[0]
        else:
            keep.append(n)
    for n in keep:
        for i, name in enumerate(n.input):
            n.input[i] = rename.get(name, name)
        for i, name in enumerate(n.output):
            n.output[i] = rename.get(name, name)
    g.nodes[:] = keep


def embedding_and_head(w: dict, cfg: dict) -> dict:
    """The weights every version's graph reads alike, as ``export_weights`` returns them: the
    embedding with ln0 folded in (one LayerNorm less per token), ln_out, and the head [in, out].

    The folded embedding is a ``LazyArray``: computed (a chunk of rows at a time) only when it is
    written, so the export never holds a float32 [vocab, C] table; the same for a head that is not
    float32 in the checkpoint (bf16/fp16), while a float32 head stays a view into the checkpoint."""
    import torch.nn.functional as F

    from ..checkpoint import matrix_in_out

    def np32(t):
        return np.ascontiguousarray(t.detach().float().cpu().numpy())

    C = cfg["n_embd"]
    emb_w = w["emb.weight"]
    ln_w, ln_b = w["blocks.0.ln0.weight"].float(), w["blocks.0.ln0.bias"].float()
    eps = cfg.get("ln_eps", LN_EPS)
    # checked here: the table is computed later, possibly outside the export's shape-error handling
    if emb_w.ndim != 2 or emb_w.shape[1] != C:
        raise ValueError(f"emb.weight has shape {tuple(emb_w.shape)}, expected [vocab, {C}]")
    for n, t in (("weight", ln_w), ("bias", ln_b)):
        if tuple(t.shape) != (C,):
            raise ValueError(f"blocks.0.ln0.{n} has shape {tuple(t.shape)}, expected [{C}]")

    def emb_rows(i, j):  # F.layer_norm works row by row: chunks give the bytes the whole table would
        return F.layer_norm(emb_w[i:j].detach().float(), (C,), ln_w, ln_b, eps=eps).numpy()

    return {
        "emb": LazyArray(emb_rows, emb_w.shape),
        "ln_out.weight": np32(w["ln_out.weight"]),
        "ln_out.bias": np32(w["ln_out.bias"]),
        "head": matrix_in_out(w["head.weight"]),
    }


def layer_matrices(w: dict, b: str, names) -> dict:
    """Layer ``b``'s large matrices (checkpoint keys ``b + name + ".weight"``) as [in, out], under
    ``b + name``; bf16/fp16 ones are converted when written."""
    from ..checkpoint import matrix_in_out

    return {b + n: matrix_in_out(w[b + n + ".weight"]) for n in names}
