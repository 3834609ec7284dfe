"""Conversation states as portable text: what a client keeps to resume a conversation on any replica.

A blob is base64 of a compressed ``.npz`` holding the state tensors (batch 1) plus one ``__meta__``
entry (JSON bytes): format name, version, the model's export id and the number of tokens the state
has seen. Loading never unpickles (``allow_pickle=False``) and checks the model binding, the size and
every tensor against the manifest (``Session.state_from_numpy``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import math
import zipfile

import numpy as np

from rwkv_runtime import RuntimeUserError

FORMAT = "rwkv-conversation-state"
VERSION = 1
META = "__meta__"


def model_binding(manifest) -> str:
    """The id a state is bound to: the export id, or (exports made before export ids existed) a digest
    of the manifest, which at least tells apart models of different shapes or tokenizers."""
    if getattr(manifest, "export_id", ""):
        return manifest.export_id
    return "manifest-" + hashlib.sha256(manifest.to_json().encode()).hexdigest()[:24]


def encode(arrays: dict, binding: str, tokens_seen: int, tail: str = "") -> str:
    """``tail``: text the state has read after the reply it was returned with (the stop string that ended
    the reply, and anything after it in the same tokens): the next turn's render starts after it."""
    d = {"format": FORMAT, "version": VERSION, "export_id": binding, "tokens": int(tokens_seen)}
    if tail:
        d["tail"] = tail
    meta = json.dumps(d)
    buf = io.BytesIO()
    np.savez_compressed(
        buf, **{k: np.asarray(v) for k, v in arrays.items()}, **{META: np.frombuffer(meta.encode(), dtype=np.uint8)}
    )
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode(text: str, binding: str, max_bytes: int) -> tuple[dict, dict]:
    """(arrays, meta) from a blob; RuntimeUserError for anything that is not a state of this model."""
    if not isinstance(text, str) or not text:
        raise RuntimeUserError("state must be a non-empty base64 string")
    if len(text) > max_bytes * 4 // 3 + 4:
        raise RuntimeUserError(f"state is larger than this server accepts ({max_bytes} bytes)")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RuntimeUserError("state is not valid base64") from None
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            total = sum(z.zip.getinfo(n).file_size for n in z.zip.namelist())
            if total > max_bytes:  # checked before inflating: a small zip may expand hugely
                raise RuntimeUserError(f"state is larger than this server accepts ({max_bytes} bytes)")
            for name in z.zip.namelist():
                if not name.endswith(".npy"):  # (np.load would hand back its raw bytes, not an array)
                    raise RuntimeUserError(
                        f"state is not a saved conversation state (it holds {name[:60]!r}, which is not an array)"
                    )
                _check_declared_size(z.zip, name)
            arrays = {k: z[k] for k in z.files}
    except RuntimeUserError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, AttributeError, KeyError):
        raise RuntimeUserError("state is not a saved conversation state") from None
    meta_arr = arrays.pop(META, None)
    try:
        meta = json.loads(bytes(meta_arr.astype(np.uint8)).decode()) if meta_arr is not None else None
    except (ValueError, UnicodeDecodeError):
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise RuntimeUserError("state is not a saved conversation state (no rwkv state header)")
    if meta.get("version") != VERSION:
        raise RuntimeUserError(
            f"state format version {meta.get('version')!r} is not supported (this server reads version {VERSION})"
        )
    tokens = meta.get("tokens", 0)
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise RuntimeUserError(f"state header: tokens must be a whole number >= 0, not {tokens!r}")
    if not isinstance(meta.get("tail", ""), str):
        raise RuntimeUserError(f"state header: tail must be a string, not {type(meta['tail']).__name__}")
    if meta.get("export_id") != binding:
        raise RuntimeUserError(
            "state belongs to another model export (export id differs); "
            "it can only be resumed on a server running the same export"
        )
    # a state the model made is finite; NaN/inf would make NaN logits (garbage text, a failed sampler)
    for k, v in arrays.items():
        if v.dtype.kind in "fc" and not np.isfinite(v).all():
            raise RuntimeUserError(f"state holds NaN or infinite values (in {k!r}): it is damaged")
    return arrays, meta


def _check_declared_size(zf: zipfile.ZipFile, name: str):
    """An ``.npy`` member whose header declares more data than the member holds is damaged; refused
    before numpy allocates what the header says (a 100-byte member may declare 2**40 elements)."""
    if not name.endswith(".npy"):
        return
    with zf.open(name) as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
        header = f.tell()
    size = math.prod(shape) * dtype.itemsize
    if size > zf.getinfo(name).file_size - header:
        raise RuntimeUserError(
            f"state is not a saved conversation state ({name[:-4][:60]!r} declares "
            f"{math.prod(shape)} elements, more than it holds)"
        )


def check_batch_one(arrays: dict):
    """A conversation state has batch 1; naming the tensor that does not (Session.state_from_numpy takes
    the first tensor's batch as the truth and blames the next one)."""
    for k, v in arrays.items():
        if v.ndim == 0 or v.shape[0] != 1:
            raise RuntimeUserError(
                f"state must hold one conversation (batch 1): tensor {k[:60]!r} has shape {list(v.shape)}"
            )


def digest(text: str) -> str:
    """Names an imported state in the prefix cache (prefixes after it are cached under this base)."""
    return hashlib.blake2b(text.encode("ascii"), digest_size=16).hexdigest()
