"""Loading checkpoints safely and recognising their RWKV version.

Formats: BlinkDL ``.pth`` (the official layout, ``blocks.N.att.time_decay`` ...), ``.safetensors`` in
the same layout, and Hugging Face ``RwkvForCausalLM`` directories (config.json + model.safetensors or
pytorch_model.bin). Every path goes through ``torch.load(weights_only=True)`` or safetensors, so a
checkpoint can never execute code. All tensors come back in BlinkDL naming, as float32.
"""
from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CheckpointError

# Hugging Face RwkvForCausalLM -> BlinkDL names (values are unchanged).
_HF_RENAMES = [
    (r"^rwkv\.", ""),
    (r"^embeddings\.", "emb."),
    (r"\.pre_ln\.", ".ln0."),
    (r"\.attention\.", ".att."),
    (r"\.feed_forward\.", ".ffn."),
    (r"\.time_mix_key$", ".time_mix_k"),
    (r"\.time_mix_value$", ".time_mix_v"),
    (r"\.time_mix_receptance$", ".time_mix_r"),
]


@dataclass
class Checkpoint:
    weights: dict  # BlinkDL name -> float32 torch.Tensor
    version: str  # "rwkv4" | "rwkv5" | "rwkv5.2" | "rwkv6" | "rwkv7"
    path: Path
    format: str  # "blinkdl-pth" | "safetensors" | "huggingface"
    hf_config: dict = field(default_factory=dict)
    tokenizer_file: Path | None = None  # a tokenizer.json found beside an HF checkpoint


def detect_version(keys) -> str:
    """Recognise the architecture from BlinkDL key names (see docs/architecture.md)."""
    keys = set(keys)
    if any(k.endswith("att.k_k") or k.endswith("att.r_k") for k in keys):
        return "rwkv7"
    if any(k.endswith("att.time_maa_x") for k in keys):
        return "rwkv6"
    if any(k.endswith("att.ln_x.weight") for k in keys):
        return "rwkv5"  # refined to "rwkv5.2" by the shape of time_decay, below
    if "emb.weight" in keys and any(k.endswith("att.time_first") for k in keys):
        return "rwkv4"
    raise CheckpointError(
        "not an RWKV checkpoint: no emb.weight / blocks.N.att.* keys found "
        f"(first keys: {', '.join(sorted(keys)[:5]) or 'none'})"
    )


def _torch_load(path: Path) -> dict:
    import torch

    with open(path, "rb") as f:
        magic = f.read(4)
    # zip-format checkpoints (torch >= 1.6) are memory-mapped; legacy pickle files load whole
    mmap = magic.startswith(b"PK")
    if not mmap and magic[:1] != b"\x80":
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle)")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "failed finding central directory" in msg or "truncated" in msg.lower() or isinstance(e, EOFError):
            raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({msg[:120]})") from None
        raise CheckpointError(f"{path}: not a loadable PyTorch checkpoint ({msg[:160]})") from None
    except Exception as e:  # pickle.UnpicklingError (weights_only refusal) and friends
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"{path}: refused to load: not a plain tensor checkpoint ({type(e).__name__}: {msg[:160]})"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(hasattr(v, "dtype") for v in obj.values()):
        raise CheckpointError(f"{path}: not a checkpoint (expected a dict of tensors)")
    return obj


def _safetensors_load(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({str(e)[:160]})") from None


def _from_hf(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        for pat, rep in _HF_RENAMES:
            k = re.sub(pat, rep, k)
        out[k] = v
    return out


def load_checkpoint(path) -> Checkpoint:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    hf_config: dict = {}
    tokenizer_file = None
    if path.is_dir():
        cfg = path / "config.json"
        if not cfg.is_file():
            raise CheckpointError(f"{path}: a directory without config.json is not a Hugging Face checkpoint")
        try:
            hf_config = json.loads(cfg.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg}: invalid JSON ({e})") from None
        if hf_config.get("model_type") not in (None, "rwkv"):
            raise CheckpointError(
                f"{path}: Hugging Face model_type {hf_config.get('model_type')!r} is not RWKV-4 ('rwkv')"
            )
        if (path / "model.safetensors").is_file():
            raw = _safetensors_load(path / "model.safetensors")
        elif (path / "pytorch_model.bin").is_file():
            raw = _torch_load(path / "pytorch_model.bin")
        else:
            raise CheckpointError(f"{path}: no model.safetensors or pytorch_model.bin (sharded checkpoints: merge first)")
        raw = _from_hf(raw)
        fmt = "huggingface"
        if (path / "tokenizer.json").is_file():
            tokenizer_file = path / "tokenizer.json"
    elif path.suffix == ".safetensors":
        raw, fmt = _safetensors_load(path), "safetensors"
    else:
        if path.stat().st_size == 0:
            raise CheckpointError(f"{path}: empty file")
        raw, fmt = _torch_load(path), "blinkdl-pth"

    import torch

    weights = {}
    for k, v in raw.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: entry {k!r} is not a tensor")
        weights[k] = v.float() if v.is_floating_point() else v
    version = detect_version(weights)
    if version == "rwkv5":
        td = [v for k, v in weights.items() if k.endswith("att.time_decay")]
        if td and td[0].dim() == 2 and td[0].shape[-1] > 1:
            version = "rwkv5.2"
    return Checkpoint(weights, version, path, fmt, hf_config, tokenizer_file)
