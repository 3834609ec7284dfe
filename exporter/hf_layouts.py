"""Hugging Face checkpoint layouts of every RWKV version, renamed to BlinkDL's keys (values unchanged
except where a layout stores a tensor transposed or squeezed).

| ``model_type`` | what publishes it | layout |
|---|---|---|
| ``rwkv`` (or none) | transformers' ``RwkvForCausalLM`` (RWKV-4) | ``rwkv.blocks.N.attention.time_mix_key`` ... |
| ``rwkv5`` | ``RWKV/v5-Eagle-*-HF`` remote code (``modeling_rwkv5.py``) | as RWKV-4, + ``time_mix_gate`` |
| ``rwkv6`` | ``RWKV/v6-Finch-*-HF`` remote code (``modeling_rwkv6.py``) | as RWKV-4; ``time_maa_*`` keep their names |
| ``rwkv7`` | fla-hub's ``RWKV7ForCausalLM`` (fla/models/rwkv7) | ``model.layers.N.attn.r_proj``, ``w_lora.lora.0``... |

fla's RWKV-7 layout differs in more than names: ``{w,a,v,g}_lora.lora.0.weight`` is BlinkDL's ``att.X1``
transposed (``nn.Linear(C, D)`` stores ``[D, C]``), ``lora.2.weight`` is ``att.X2`` transposed and
``lora.2.bias`` is ``att.X0``; the per-channel vectors are stored as ``[C]`` where BlinkDL has
``[1, 1, C]``. Transposes are views (nothing is copied from the memory-mapped file).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .errors import CheckpointError

MODEL_TYPES = {"rwkv": "rwkv4", "rwkv5": "rwkv5", "rwkv6": "rwkv6", "rwkv7": "rwkv7"}
# the versions each model_type may hold (the weights decide between 5.0/5.1 and 5.2)
_VERSIONS = {"rwkv4": ("rwkv4",), "rwkv5": ("rwkv5", "rwkv5.2"), "rwkv6": ("rwkv6",), "rwkv7": ("rwkv7",)}

# transformers' RWKV-4 and the RWKV-5/6 remote code: module renames, the time_mix_* long names
_V456_RENAMES = [
    (r"^rwkv\.", ""),
    (r"^embeddings\.", "emb."),
    (r"\.pre_ln\.", ".ln0."),
    (r"\.attention\.", ".att."),
    (r"\.feed_forward\.", ".ffn."),
    (r"\.time_mix_key$", ".time_mix_k"),
    (r"\.time_mix_value$", ".time_mix_v"),
    (r"\.time_mix_receptance$", ".time_mix_r"),
    (r"\.time_mix_gate$", ".time_mix_g"),
]

# fla RWKV7ForCausalLM -> BlinkDL
_V7_TOP = {
    "model.embeddings.weight": "emb.weight",
    "model.norm.weight": "ln_out.weight",
    "model.norm.bias": "ln_out.bias",
    "lm_head.weight": "head.weight",
}
_V7_MODULE = {"attn": "att", "ffn": "ffn", "pre_norm": "ln0", "attn_norm": "ln1", "ffn_norm": "ln2"}
_V7_PROJ = {"r_proj": "receptance", "k_proj": "key", "v_proj": "value", "o_proj": "output", "g_norm": "ln_x"}
_V7_LORA = {"lora.0.weight": "1", "lora.2.weight": "2", "lora.2.bias": "0"}
_V7_LAYER = re.compile(r"^model\.layers\.([0-9]+)\.([a-z_]+)\.(.+)$")


def version_of(model_type, cfg_path: Path) -> str:
    """The layout a config.json's model_type names (no model_type: transformers' RWKV-4)."""
    if model_type is None:
        return "rwkv4"
    if model_type not in MODEL_TYPES:
        raise CheckpointError(
            f"{cfg_path}: Hugging Face model_type {model_type!r} is not an RWKV layout this reads "
            f"({', '.join(repr(k) for k in MODEL_TYPES)})"
        )
    return MODEL_TYPES[model_type]


def to_blinkdl(layout: str, state: dict, hf_config: dict, where: Path) -> dict:
    """The checkpoint's tensors under BlinkDL's names."""
    if layout == "rwkv7":
        return _from_fla_rwkv7(state, hf_config, where)
    out = {}
    for k, v in state.items():
        name = k
        for pat, rep in _V456_RENAMES:
            name = re.sub(pat, rep, name)
        out[name] = v
    return out


def check_version(layout: str, detected: str, where: Path) -> None:
    """config.json's model_type and the weights must agree (a mislabelled folder is refused)."""
    if detected not in _VERSIONS[layout]:
        raise CheckpointError(
            f"{where}: config.json says model_type {layout.replace('rwkv4', 'rwkv')!r} but the weights are {detected}"
        )


def _from_fla_rwkv7(state: dict, hf_config: dict, where: Path) -> dict:
    out = {}
    for k, v in state.items():
        if k in _V7_TOP:
            out[_V7_TOP[k]] = v
            continue
        m = _V7_LAYER.match(k)
        if not m or m.group(2) not in _V7_MODULE:
            raise CheckpointError(f"{where}: key {k!r} is not part of fla's RWKV7ForCausalLM layout")
        i, module, rest = m.group(1), _V7_MODULE[m.group(2)], m.group(3)
        b = f"blocks.{i}.{module}."
        lora = re.match(r"^([wavg])_lora\.(.+)$", rest)
        if module == "att" and lora:
            which = _V7_LORA.get(lora.group(2))
            if which is None:
                raise CheckpointError(f"{where}: key {k!r} is not part of fla's RWKV7ForCausalLM layout")
            name = f"att.{lora.group(1)}{which}"
            if which == "0":
                v = v.reshape(1, 1, -1)
            elif v.ndim == 2:
                v = v.t()  # nn.Linear's [out, in] -> BlinkDL's [in, out]
            out[f"blocks.{i}.{name}"] = v
            continue
        if module == "att" and "." in rest and rest.split(".")[0] in _V7_PROJ:
            head, tail = rest.split(".", 1)
            out[b + _V7_PROJ[head] + "." + tail] = v
            continue
        if re.match(r"^(x_[rwkvag]|k_k|k_a)$", rest) or (module == "ffn" and rest == "x_k"):
            v = v.reshape(1, 1, -1)  # fla keeps some as [C]; BlinkDL's are [1, 1, C]
        out[b + rest] = v
    if "head.weight" not in out and hf_config.get("tie_word_embeddings") and "emb.weight" in out:
        out["head.weight"] = out["emb.weight"]
    return out


def weight_files(path: Path) -> list:
    """The weights of an HF folder: model.safetensors, pytorch_model.bin, or the shards a
    ``*.index.json`` names (plain file names inside the folder, nothing else)."""
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (path / single).is_file():
            return [path / single]
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        ip = path / index
        if not ip.is_file():
            continue
        try:
            data = json.loads(ip.read_bytes().decode("utf-8"))
            files = sorted(set(data["weight_map"].values()))
        except (
            OSError,
            UnicodeDecodeError,
            json.JSONDecodeError,
            KeyError,
            TypeError,
            AttributeError,
            RecursionError,
        ) as e:
            raise CheckpointError(f"{ip}: not a shard index ({type(e).__name__})") from None
        out = []
        for name in files:
            if (
                not isinstance(name, str)
                or not name
                or "/" in name
                or "\\" in name
                or name in (".", "..")
                or name.startswith(".")
            ):
                raise CheckpointError(f"{ip}: shard {str(name)[:60]!r} is not a file name inside {path}")
            if not (path / name).is_file():
                raise CheckpointError(f"{ip}: shard {name} is missing")
            out.append(path / name)
        if not out:
            raise CheckpointError(f"{ip}: names no shards")
        return [ip] + out
    raise CheckpointError(f"{path}: no model.safetensors, pytorch_model.bin or shard index (*.index.json)")
