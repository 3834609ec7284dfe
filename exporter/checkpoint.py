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
    input_files: list = field(default_factory=list)  # every file read: an export must never replace one


def _read_error(path: Path, e: OSError) -> CheckpointError:
    if isinstance(e, IsADirectoryError):
        return CheckpointError(f"{path}: is a directory, not a checkpoint file")
    return CheckpointError(f"{path}: cannot read ({e.strerror or type(e).__name__})")


def _torch_load(path: Path) -> dict:
    import torch

    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise _read_error(path, e) from None
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
        with open(path, "rb"):
            pass
    except OSError as e:
        raise _read_error(path, e) from None
    try:
        return load_file(str(path))  # memory-mapped by safetensors
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
        hf_config = _read_hf_config(cfg)
        if hf_config.get("model_type") not in (None, "rwkv"):
            raise CheckpointError(
                f"{path}: Hugging Face model_type {hf_config.get('model_type')!r} is not RWKV-4 ('rwkv')"
            )
        inputs = [cfg]
        if (path / "model.safetensors").is_file():
            raw = _safetensors_load(path / "model.safetensors")
            inputs.append(path / "model.safetensors")
        elif (path / "pytorch_model.bin").is_file():
            raw = _torch_load(path / "pytorch_model.bin")
            inputs.append(path / "pytorch_model.bin")
        else:
            raise CheckpointError(f"{path}: no model.safetensors or pytorch_model.bin (sharded checkpoints: merge first)")
        raw = _from_hf(raw)
        fmt = "huggingface"
        if (path / "tokenizer.json").is_file():
            tokenizer_file = path / "tokenizer.json"
            inputs.append(tokenizer_file)
    elif path.suffix == ".safetensors":
        raw, fmt = _safetensors_load(path), "safetensors"
        inputs = [path]
    else:
        if path.stat().st_size == 0:
            raise CheckpointError(f"{path}: empty file")
        raw, fmt = _torch_load(path), "blinkdl-pth"
        inputs = [path]

    import torch

    weights = {}
    for k, v in raw.items():
        if not isinstance(k, str):
            raise CheckpointError(f"{path}: a key that is not a string ({type(k).__name__} {str(k)[:40]!r})")
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: entry {k!r} is not a tensor")
        if k.startswith("blocks.") and not _BLOCK_KEY.match(k):
            raise CheckpointError(f"{path}: key {k[:80]!r} does not name a layer (expected blocks.<N>.<name>)")
        if not v.is_floating_point():
            raise CheckpointError(f"{path}: tensor {k!r} is {str(v.dtype).replace('torch.', '')}; "
                                  "RWKV weights are floating point")
        # float32 tensors stay views into the memory-mapped file; others are converted here
        weights[k] = v.float()
    from . import arch  # each version's ArchSpec recognises its own keys

    return Checkpoint(weights, arch.detect(weights), path, fmt, hf_config, tokenizer_file, inputs)


_BLOCK_KEY = re.compile(r"^blocks\.(0|[1-9][0-9]{0,5})\.[A-Za-z_]")
# config.json fields that must be numbers when present (transformers' RwkvConfig)
_HF_NUMERIC = ("vocab_size", "context_length", "hidden_size", "num_hidden_layers", "attention_hidden_size",
               "intermediate_size", "layer_norm_epsilon", "rescale_every", "head_size", "bos_token_id",
               "eos_token_id")


def _read_hf_config(cfg: Path) -> dict:
    try:
        text = cfg.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"{cfg}: not UTF-8 text") from None
    except OSError as e:
        raise _read_error(cfg, e) from None
    try:
        d = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{cfg}: invalid JSON ({str(e)[:100]})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{cfg}: expected a JSON object, found {type(d).__name__ if d is not None else 'null'}")
    for k in _HF_NUMERIC:
        v = d.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or abs(v) == float("inf")):
            raise CheckpointError(f"{cfg}: {k} must be a number, not {json.dumps(v)[:40]}")
    eps, every = d.get("layer_norm_epsilon"), d.get("rescale_every")
    if eps is not None and not 0 < eps < 1:
        raise CheckpointError(f"{cfg}: layer_norm_epsilon must be in (0, 1), not {eps!r}")
    if every is not None and (every < 0 or every != int(every) or every > 1 << 20):
        raise CheckpointError(f"{cfg}: rescale_every must be a whole number >= 0, not {every!r}")
    mt = d.get("model_type")
    if mt is not None and not isinstance(mt, str):
        raise CheckpointError(f"{cfg}: model_type must be a string")
    return d


def check_finite(ck: Checkpoint, release=None, every: int = 256 * 2**20) -> None:
    """Refuse NaN/inf weights, naming the first tensor holding one (one pass over the mapped file;
    ``release()`` is called after every ``every`` bytes read, to drop the pages read so far)."""
    import torch

    read = 0
    step = max(1, every // 4)  # elements per slice: isfinite's temporaries stay small
    for k, v in ck.weights.items():
        flat = v.reshape(-1)
        for i in range(0, flat.numel(), step):
            part = flat[i:i + step]
            if not bool(torch.isfinite(part).all()):
                raise CheckpointError(f"{ck.path}: tensor {k!r} holds NaN or infinite values "
                                      "(pass --allow-nonfinite to export it anyway)")
            read += part.numel() * part.element_size()
            if release is not None and read >= every:
                release()
                read = 0
