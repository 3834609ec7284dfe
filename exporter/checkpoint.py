"""Loading checkpoints safely and recognising their RWKV version.

Formats: BlinkDL ``.pth`` (the official layout, ``blocks.N.att.time_decay`` ...), ``.safetensors`` in
the same layout, and Hugging Face directories of every version (config.json + model.safetensors,
pytorch_model.bin or shards; the layouts and their renames: ``hf_layouts``). Every path goes through
``torch.load(weights_only=True)`` or safetensors, so a checkpoint can never execute code. All tensors
come back in BlinkDL naming, as float32 (the export keeps large bf16/fp16 matrices in their own dtype:
``load_checkpoint(stream=True)``).
"""

from __future__ import annotations

import json
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CheckpointError


@dataclass
class Checkpoint:
    weights: dict  # BlinkDL name -> float32 torch.Tensor (with stream: large matrices in their own dtype)
    version: str  # "rwkv4" | "rwkv5" | "rwkv5.2" | "rwkv6" | "rwkv7"
    path: Path
    format: str  # "blinkdl-pth" | "safetensors" | "huggingface"
    hf_config: dict = field(default_factory=dict)
    tokenizer_file: Path | None = None  # a tokenizer.json found beside an HF checkpoint
    input_files: list = field(default_factory=list)  # every file read: an export must never replace one
    lora: object = None  # lora.Merge: the adapter merged in (``load_checkpoint(lora=...)``), or None


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
        with warnings.catch_warnings():  # e.g. torch's multi-line "Detected pickle protocol 4": the Error line says it
            warnings.simplefilter("ignore")
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "failed finding central directory" in msg or "truncated" in msg.lower() or isinstance(e, EOFError):
            raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({msg[:120]})") from None
        raise CheckpointError(f"{path}: not a loadable PyTorch checkpoint ({msg[:160]})") from None
    except Exception as e:  # pickle.UnpicklingError (weights_only refusal) and friends
        raise CheckpointError(
            f"{path}: refused to load: not a plain tensor checkpoint (torch's weights-only loader, which never runs "
            f"code from the file, cannot read it: {_refusal_reason(e)})"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(hasattr(v, "dtype") for v in obj.values()):
        raise CheckpointError(f"{path}: not a checkpoint (expected a dict of tensors)")
    if mmap:
        _check_zip_records(path, obj)
    return obj


def _check_zip_records(path: Path, tensors: dict) -> None:
    """A memory-mapped load trusts the archive's layout: each tensor is a slice of the file at its
    record's offset, as long as its storage says, whatever the record's own size (a record shorter than
    declared would be read from the next record's bytes; torch's non-mapped loader refuses it). So:
    every record is read once through ``zipfile`` (its local header, stored size and CRC-32 checked, by
    explicit reads, never through the mapping), and each tensor's storage must lie exactly on one
    record of its size."""
    import struct

    import torch

    try:
        with zipfile.ZipFile(path) as z:
            offsets = {}
            with open(path, "rb") as fh:
                for info in z.infolist():
                    if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
                        raise CheckpointError(
                            f"{path}: record {info.filename!r} is compressed; not a PyTorch checkpoint archive"
                        )
                    fh.seek(info.header_offset)
                    head = fh.read(30)
                    if len(head) != 30 or head[:4] != b"PK\x03\x04":
                        raise zipfile.BadZipFile(f"bad local header of {info.filename!r}")
                    n_name, n_extra = struct.unpack("<HH", head[26:30])
                    offsets[info.header_offset + 30 + n_name + n_extra] = info
                    with z.open(info) as f:  # zipfile checks the CRC-32 at the end of each record
                        while f.read(1 << 22):
                            pass
    except (zipfile.BadZipFile, OSError, EOFError, struct.error, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({msg[:120]})") from None
    storages = {}
    for v in tensors.values():
        if isinstance(v, torch.Tensor):
            st = v.untyped_storage()
            if st.nbytes():
                storages[st.data_ptr()] = st.nbytes()
    if not storages:
        return
    data = {o: i for o, i in offsets.items() if re.search(r"/data/[0-9]+$", i.filename)}
    base = _mapping_base(path, next(iter(storages)))
    if base is None:  # no /proc/self/maps: the one base that puts every storage on a data record's first byte
        bases = None
        for ptr in storages:
            cand = {ptr - o for o in data}
            bases = cand if bases is None else bases & cand
        if not bases or len(bases) != 1:
            raise CheckpointError(f"{path}: corrupt checkpoint (its tensors do not lie on the archive's records)")
        base = bases.pop()
    for ptr, nbytes in storages.items():
        info = data.get(ptr - base)
        if info is None:
            raise CheckpointError(
                f"{path}: corrupt checkpoint (a tensor's data does not start at a record of the archive)"
            )
        if info.file_size != nbytes:
            raise CheckpointError(
                f"{path}: truncated or corrupt checkpoint (record {info.filename!r} holds "
                f"{info.file_size} bytes, its tensor needs {nbytes})"
            )


def _mapping_base(path: Path, ptr: int) -> int | None:
    """The address at which the file's offset 0 is mapped, from the mapping holding ``ptr`` (Linux)."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                head = line.split(maxsplit=5)
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                if lo <= ptr < hi:
                    return lo - int(head[2], 16)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _refusal_reason(e: Exception) -> str:
    """The line of torch's weights-only refusal that says what was refused (its first lines are boilerplate
    about torch 2.6 and weights_only=False, advice this tool never follows)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    boiler = ("Weights only load failed", "Please file an issue", "Check the documentation")
    detail = [ln for ln in lines if not ln.startswith(boiler)]
    text = (detail or lines or [type(e).__name__])[0]
    if text.startswith("WeightsUnpickler error:"):
        text = text[len("WeightsUnpickler error:") :].strip() or text
    return text[:160]


# safetensors dtypes read straight from the memory-mapped file: numpy dtype, then the torch view of it
_ST_DTYPES = {
    "F64": ("float64", None),
    "F32": ("float32", None),
    "F16": ("float16", None),
    "BF16": ("int16", "bfloat16"),
    "I64": ("int64", None),
    "I32": ("int32", None),
    "I16": ("int16", None),
    "I8": ("int8", None),
    "U8": ("uint8", None),
    "BOOL": ("bool", None),
}


def _safetensors_load(path: Path) -> dict:
    """Every tensor of a .safetensors file as a view into one private memory mapping of it (as
    ``torch.load(mmap=True)`` gives for a .pth): nothing is read until it is used, and the pages read
    can be dropped again (``export.release_mapped``). safetensors' own ``safe_open`` validates the
    header first; a dtype numpy cannot view (or a misaligned tensor) is read by safetensors instead."""
    import struct

    import numpy as np
    import torch
    from safetensors import SafetensorError, safe_open

    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise _read_error(path, e) from None
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            with open(path, "rb") as fh:  # the offsets (safe_open checked them against the file)
                n = struct.unpack("<Q", fh.read(8))[0]
                header = json.loads(fh.read(n))
            start = 8 + n
            mm = None
            if path.stat().st_size > start:
                mm = np.memmap(path, dtype=np.uint8, mode="c")  # private, never written
            out = {}
            for k in keys:
                info = header[k]
                np_dt, view = _ST_DTYPES.get(info["dtype"], (None, None))
                b, e = (start + int(x) for x in info["data_offsets"])
                if mm is None or np_dt is None or b % np.dtype(np_dt).itemsize:
                    out[k] = f.get_tensor(k)
                    continue
                arr = mm[b:e].view(np_dt).reshape([int(d) for d in info["shape"]])
                t = torch.from_numpy(arr)
                out[k] = t.view(getattr(torch, view)) if view else t
            return out
    except (SafetensorError, OSError, ValueError, KeyError, struct.error) as e:
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({str(e)[:160]})") from None


# With ``stream``, non-float32 matrices of at least this many elements (1 MB as float32) are kept as
# they are in the checkpoint (views into its mapping); the export converts each when it writes it.
STREAM_MIN_ELEMENTS = 2**18


def load_checkpoint(path, stream: bool = False, lora=None, lora_alpha: float | None = None) -> Checkpoint:
    """Load (memory-map) a checkpoint. Tensors come back float32, except with ``stream`` (the export):
    then large bf16/fp16/fp64 matrices stay in their own dtype, views into the mapped file, and
    ``matrix_in_out`` converts each lazily, so the model is never held in float32 as a whole.
    ``lora``: an adapter merged in (exporter/lora.py; with ``stream``, layer matrices row by row as written)."""
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
        from . import hf_layouts

        hf_layout = hf_layouts.version_of(hf_config.get("model_type"), cfg)
        inputs = [cfg]
        raw = {}
        for f in hf_layouts.weight_files(path):  # one file, or an index and its shards
            inputs.append(f)
            if f.name.endswith(".index.json"):
                continue
            part = _safetensors_load(f) if f.suffix == ".safetensors" else _torch_load(f)
            twice = next((k for k in part if k in raw), None)
            if twice is not None:
                raise CheckpointError(f"{f}: tensor {str(twice)[:80]!r} is also in another shard")
            raw.update(part)
        raw = hf_layouts.to_blinkdl(hf_layout, raw, hf_config, path)
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
            raise CheckpointError(
                f"{path}: tensor {k!r} is {str(v.dtype).replace('torch.', '')}; RWKV weights are floating point"
            )
        # float32 tensors stay views into the memory-mapped file; others are converted here, except
        # (streaming) large matrices, which stay views until the export converts them one by one
        if stream and v.dtype != torch.float32 and v.ndim == 2 and v.numel() >= STREAM_MIN_ELEMENTS:
            weights[k] = v
        else:
            weights[k] = v.float()
    merge = None
    if lora is not None:
        from . import lora as _lora

        merge = _lora.apply(weights, lora, lora_alpha, lazy=stream)
        inputs.append(Path(lora))
    elif lora_alpha is not None:
        raise CheckpointError("--lora-alpha applies to --lora (no adapter given)")
    from . import arch  # each version's ArchSpec recognises its own keys

    version = arch.detect(weights)
    if fmt == "huggingface":
        hf_layouts.check_version(hf_layout, version, path)
    return Checkpoint(weights, version, path, fmt, hf_config, tokenizer_file, inputs, merge)


def matrix_in_out(t):
    """A checkpoint matrix [out, in] as the graphs read it, float32 [in, out]: a float32 tensor as a
    transposed view into the checkpoint, any other dtype as a ``LazyArray`` converted when written."""
    import numpy as np
    import torch

    from .lora import merged_rows, pending_of
    from .onnx_graph import LazyArray

    rec = pending_of(t)
    if rec is not None:  # a LoRA pair merged into each chunk of rows as it is written
        return LazyArray(merged_rows(t.detach(), rec), t.shape).T
    t = t.detach()
    if t.dtype == torch.float32 or t.ndim != 2:
        return np.ascontiguousarray(t.float().cpu().numpy()).T

    return LazyArray.of(t).T


_BLOCK_KEY = re.compile(r"^blocks\.(0|[1-9][0-9]{0,5})\.[A-Za-z_]")
# config.json fields that must be numbers when present (transformers' RwkvConfig)
_HF_NUMERIC = (
    "vocab_size",
    "context_length",
    "hidden_size",
    "num_hidden_layers",
    "attention_hidden_size",
    "intermediate_size",
    "layer_norm_epsilon",
    "rescale_every",
    "head_size",
    "bos_token_id",
    "eos_token_id",
)


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
        if v is not None and (
            isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or abs(v) == float("inf")
        ):
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


def read_state_tuning(path) -> dict:
    """The ``blocks.N.att.time_state`` tensors of a state-tuning file (.pth or .safetensors), checked:
    string keys, real floating-point tensors (complex ones would lose their imaginary part), finite."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such file")
    raw = _safetensors_load(p) if p.suffix == ".safetensors" else _torch_load(p)
    out = {}
    for k, v in raw.items():
        if not isinstance(k, str):
            raise CheckpointError(f"{p}: a key that is not a string ({type(k).__name__} {str(k)[:40]!r})")
        if not k.endswith("att.time_state"):
            continue
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            what = str(v.dtype).replace("torch.", "") if isinstance(v, torch.Tensor) else type(v).__name__
            raise CheckpointError(f"{p}: {k!r} is {what}; a learned state is real floating point")
        check_state_finite(v, f"{p}: {k!r}")
        out[k] = v
    return out


def check_state_finite(v, what: str) -> None:
    """A learned initial state with NaN/inf would make every output NaN (and the runtime refuses it)."""
    import numpy as np
    import torch

    ok = bool(torch.isfinite(v).all()) if isinstance(v, torch.Tensor) else bool(np.isfinite(v).all())
    if not ok:
        raise CheckpointError(f"{what} holds NaN or infinite values; a learned initial state must be finite")


def check_finite(ck: Checkpoint, release=None, every: int = 256 * 2**20) -> None:
    """Refuse NaN/inf weights, naming the first tensor holding one (one pass over the mapped file;
    ``release()`` is called after every ``every`` bytes read, to drop the pages read so far)."""
    import torch

    read = 0
    step = max(1, every // 4)  # elements per slice: isfinite's temporaries stay small
    for k, v in ck.weights.items():
        flat = v.reshape(-1)
        for i in range(0, flat.numel(), step):
            part = flat[i : i + step]
            if not bool(torch.isfinite(part).all()):
                raise CheckpointError(
                    f"{ck.path}: tensor {k!r} holds NaN or infinite values (pass --allow-nonfinite to export it anyway)"
                )
            read += part.numel() * part.element_size()
            if release is not None and read >= every:
                release()
                read = 0
