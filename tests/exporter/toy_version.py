"""A test-only RWKV "version", written by following docs/adding-a-version.md: one module and one
registry entry (tests/exporter/test_adding_a_version.py puts ``tests.exporter.toy_version`` into ``arch.REGISTRY``).

The toy is RWKV without time mixing: per block only the channel mix (token shift, relu^2 key,
sigmoid receptance), so it has a recurrent state (``ffn_shift``) but no WKV op. Keys: emb.weight,
blocks.N.ln2.*, blocks.N.ffn.{time_mix_k, time_mix_r, key, receptance, value}, ln_out.*, head.weight.
"""

from __future__ import annotations

import torch
from torch import nn

from rwkv_export.arch import ArchSpec, keys
from rwkv_export.arch.graph import LN_EPS, Graph, GraphOptions
from rwkv_runtime.manifest import BATCH, StateSpec

VERSION = "toy"


def expected_shapes(cfg: dict) -> dict:
    C, F_, V = cfg["n_embd"], cfg["ffn_dim"], cfg["vocab_size"]
    s = {"emb.weight": (V, C), "ln_out.weight": (C,), "ln_out.bias": (C,), "head.weight": (V, C)}
    for i in range(cfg["n_layer"]):
        b = f"blocks.{i}."
        s.update(
            {
                b + "ln2.weight": (C,),
                b + "ln2.bias": (C,),
                b + "ffn.time_mix_k": (C,),
                b + "ffn.time_mix_r": (C,),
                b + "ffn.key.weight": (F_, C),
                b + "ffn.receptance.weight": (C, C),
                b + "ffn.value.weight": (C, F_),
            }
        )
    return s


def config_from_weights(w: dict, hf_config: dict | None = None) -> dict:
    V, C = keys.embedding_size(w)
    cfg = {
        "n_layer": keys.layer_count(w),
        "n_embd": C,
        "vocab_size": V,
        "ffn_dim": int(keys.need(w, "blocks.0.ffn.key.weight", 2).shape[0]),
    }
    keys.check_keys(w, expected_shapes(cfg), "the toy version")
    return cfg


def state_layout(cfg: dict) -> list:
    return [
        StateSpec(
            name=f"state.{i}.ffn_shift",
            output=f"new_state.{i}.ffn_shift",
            shape=[BATCH, cfg["n_embd"]],
            dtype="float32",
            init=0.0,
            layer=i,
        )
        for i in range(cfg["n_layer"])
    ]


class Model(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = cfg
        self.w = None

    @classmethod
    def from_weights(cls, w: dict, cfg: dict | None = None):
        m = cls(cfg or config_from_weights(w))
        m.w = {k: v.float() for k, v in w.items()}
        return m

    def new_state(self, batch_size: int = 1) -> dict:
        return {s.name: torch.zeros(s.concrete_shape(batch_size)) for s in state_layout(self.cfg)}

    def _run(self, x, state, parallel: bool):
        w, C, new = self.w, self.cfg["n_embd"], {}
        for i in range(self.cfg["n_layer"]):
            b = f"blocks.{i}."
            xx = nn.functional.layer_norm(x, (C,), w[b + "ln2.weight"], w[b + "ln2.bias"], LN_EPS)
            prev = state[f"state.{i}.ffn_shift"]
            sx = torch.cat([prev[:, None], xx[:, :-1]], 1) if parallel else prev
            mk, mr = w[b + "ffn.time_mix_k"], w[b + "ffn.time_mix_r"]
            k = torch.relu((xx * mk + sx * (1 - mk)) @ w[b + "ffn.key.weight"].T) ** 2
            r = torch.sigmoid((xx * mr + sx * (1 - mr)) @ w[b + "ffn.receptance.weight"].T)
            x = x + r * (k @ w[b + "ffn.value.weight"].T)
            new[f"state.{i}.ffn_shift"] = xx[:, -1] if parallel else xx
        x = nn.functional.layer_norm(x, (C,), w["ln_out.weight"], w["ln_out.bias"], LN_EPS)
        return x @ w["head.weight"].T, new

    @torch.no_grad()
    def step(self, tokens, state):
        return self._run(self.w["emb.weight"][tokens], state, parallel=False)

    @torch.no_grad()
    def sequence(self, tokens, state):
        return self._run(self.w["emb.weight"][tokens], state, parallel=True)


def export_weights(w: dict, cfg: dict) -> dict:
    """Vectors as they are, matrices as ``Graph.linear`` reads them ([in, out], no .weight suffix)."""
    out = {"emb": w["emb.weight"].float().numpy()}
    for k, v in w.items():
        if k != "emb.weight":
            out[k.removesuffix(".weight") if v.dim() == 2 else k] = (
                v.float().numpy().T if v.dim() == 2 else v.float().numpy()
            )
    return out


def build_graph(g, W: dict, cfg: dict, opts: GraphOptions):
    G = Graph(g, W, cfg, state_layout(cfg), opts)
    x = G.embed()
    for i in range(cfg["n_layer"]):
        b = f"blocks.{i}."
        xx = G.ln(x, b + "ln2")
        sx = G.shift(xx, f"state.{i}.ffn_shift")
        G.last(xx, f"new_state.{i}.ffn_shift")

        def mix(m, xx=xx, sx=sx, b=b):  # xx * m + sx * (1 - m)
            return g.op("Add", [sx, g.op("Mul", [g.op("Sub", [xx, sx]), G.vec(b + "ffn.time_mix_" + m)])])

        r = g.op("Sigmoid", [G.linear(b + "ffn.receptance", mix("r"))])
        x = g.op("Add", [x, g.op("Mul", [r, G.linear(b + "ffn.value", G.relu_sq(G.linear(b + "ffn.key", mix("k"))))])])
    G.head(x)


def detect(w: dict) -> str | None:
    return VERSION if "blocks.0.ffn.key.weight" in w and not any(".att." in k for k in w) else None


SPEC = ArchSpec(
    name="Toy",
    versions=(VERSION,),
    detect=detect,
    config_from_weights=config_from_weights,
    export_weights=export_weights,
    state_layout=state_layout,
    Model=Model,
    build_graph=build_graph,
    default_tokenizer=keys.default_tokenizer,
)


def random_checkpoint(path, C=24, L=2, F_=40, V=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = {"n_layer": L, "n_embd": C, "vocab_size": V, "ffn_dim": F_}
    w = {}
    for k, shape in expected_shapes(cfg).items():
        if k.endswith(("time_mix_k", "time_mix_r")):
            w[k] = torch.rand(shape, generator=g)
        elif k.endswith(("ln2.weight", "ln_out.weight")):
            w[k] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            w[k] = torch.randn(shape, generator=g) * (shape[-1] ** -0.5 if len(shape) == 2 else 0.1)
    torch.save(w, path)
    return path
