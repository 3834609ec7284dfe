"""Merging a LoRA adapter into a checkpoint's weights at export (``rwkv-export export --lora``).

The adapter layout is RWKV-PEFT's (and ChatRWKV's ``v2/merge_lora.py``): for a weight
``<prefix>.weight`` of shape ``[out, in]`` the adapter holds ``<prefix>.lora_A`` ``[r, in]`` and
``<prefix>.lora_B`` ``[out, r]``, merged as ``W + (B @ A) * alpha / r`` (r read per weight from the
tensors, alpha given by the user). Other keys of the adapter are trained parameters saved beside the
LoRA pairs (RWKV-PEFT's ``--train_parts``: ln, time_*...): they replace the checkpoint's tensor of the
same name and shape, as RWKV-PEFT's merge does. Anything else is refused, with one line.

Streaming: in an export (``load_checkpoint(stream=True)``) a merged layer matrix is never computed
whole: the base tensor stays a view into the memory-mapped checkpoint and carries its LoRA pair;
``checkpoint.matrix_in_out`` turns it into a ``LazyArray`` whose rows are merged as they are written.
Every other load (the PyTorch reference, validate) merges eagerly, in float32.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CheckpointError

_ATTR = "_rwkv_lora"  # the LoRA pair a base tensor carries in a streaming load
# weights whose only reader in every version's export_weights is checkpoint.matrix_in_out
_LAZY_KEY = re.compile(r"^(blocks\.[0-9]+\.(att|ffn)\.[A-Za-z_0-9]+|head)\.weight$")


@dataclass
class Pending:
    """A LoRA pair waiting to be merged into one matrix when it is written."""

    key: str
    A: object  # torch float32 [r, in]
    B: object  # torch float32 [out, r]
    scale: float
    used: bool = False


@dataclass
class Merge:
    """What a merge did: the keys merged (lazily or not), replaced, ranks, the alpha used."""

    path: Path
    alpha: float | None
    merged: list = field(default_factory=list)
    replaced: list = field(default_factory=list)
    ranks: set = field(default_factory=set)
    pending: list = field(default_factory=list)  # lazily merged pairs (stream loads)

    def summary(self) -> str:
        ranks = ", ".join(str(r) for r in sorted(self.ranks)) or "-"
        alpha = "rank (scale 1)" if self.alpha is None else f"{self.alpha:g}"
        extra = f", {len(self.replaced)} tensors replaced" if self.replaced else ""
        return f"merged LoRA {self.path.name}: {len(self.merged)} matrices (rank {ranks}, alpha {alpha}){extra}"


def read_adapter(path) -> dict:
    """The adapter's tensors (.pth through torch's weights-only loader, or .safetensors): never runs code."""
    from .checkpoint import _safetensors_load, _torch_load

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"--lora {p}: no such file")
    raw = _safetensors_load(p) if p.suffix == ".safetensors" else _torch_load(p)
    return raw


def apply(weights: dict, path, alpha: float | None, lazy: bool) -> Merge:
    """Merge the adapter at ``path`` into ``weights`` (BlinkDL names, float tensors) in place.

    ``alpha`` None: alpha = r (scale 1). ``lazy``: layer matrices carry their pair for
    ``matrix_in_out`` instead of being merged here."""
    import torch

    p = Path(path)
    if alpha is not None and (not math.isfinite(alpha) or alpha <= 0):
        raise CheckpointError(f"--lora-alpha must be a positive number, not {alpha!r}")
    raw = read_adapter(p)
    where = f"--lora {p}"
    pairs, plain = {}, {}
    for k, v in raw.items():
        if not isinstance(k, str):
            raise CheckpointError(f"{where}: a key that is not a string ({type(k).__name__})")
        if not isinstance(v, torch.Tensor) or not v.is_floating_point() or v.is_complex():
            what = str(v.dtype).replace("torch.", "") if isinstance(v, torch.Tensor) else type(v).__name__
            raise CheckpointError(f"{where}: {k!r} is {what}; adapter tensors are real floating point")
        m = re.match(r"^(.*)\.lora_([AB])$", k)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)] = v
        elif "lora" in k:  # init_lora_A (PiSSA), lora_up/down (other trainers): not this layout
            raise CheckpointError(
                f"{where}: key {k!r} is not a LoRA pair of this layout "
                "(<weight>.lora_A / <weight>.lora_B, as RWKV-PEFT writes them)"
            )
        else:
            plain[k] = v
    if not pairs:
        raise CheckpointError(f"{where}: no <weight>.lora_A / .lora_B pairs (not a LoRA adapter)")
    out = Merge(p, alpha)
    checked = []
    for prefix in sorted(pairs):
        ab = pairs[prefix]
        for half in "AB":
            if half not in ab:
                raise CheckpointError(
                    f"{where}: {prefix}.lora_{half} is missing (its pair "
                    f"{prefix}.lora_{'B' if half == 'A' else 'A'} is there)"
                )
        key = prefix + ".weight"
        if key not in weights:
            raise CheckpointError(f"{where}: {prefix}.lora_A/B adapt {key}, which the checkpoint does not have")
        W, A, B = weights[key], ab["A"], ab["B"]
        if W.ndim != 2 or A.ndim != 2 or B.ndim != 2:
            raise CheckpointError(
                f"{where}: {prefix}.lora_A {list(A.shape)} / lora_B {list(B.shape)} do not "
                f"adapt {key} {list(W.shape)} (LoRA adapts matrices)"
            )
        r = int(A.shape[0])
        if r < 1 or tuple(B.shape) != (W.shape[0], r) or tuple(A.shape) != (r, W.shape[1]):
            raise CheckpointError(
                f"{where}: shapes do not match {key} {list(W.shape)}: lora_A {list(A.shape)}, lora_B "
                f"{list(B.shape)} (expected lora_A [r, {W.shape[1]}], lora_B [{W.shape[0]}, r])"
            )
        A32, B32 = A.detach().float().clone(), B.detach().float().clone()  # small: out of the mapping
        for name, t in (("lora_A", A32), ("lora_B", B32)):
            if not bool(torch.isfinite(t).all()):
                raise CheckpointError(f"{where}: {prefix}.{name} holds NaN or infinite values")
        checked.append((key, A32, B32, (alpha if alpha is not None else r) / r))
        out.ranks.add(r)
    for k, v in plain.items():
        if k not in weights:
            raise CheckpointError(f"{where}: key {k!r} is neither a LoRA pair nor a tensor of the checkpoint")
        if tuple(v.shape) != tuple(weights[k].shape):
            raise CheckpointError(
                f"{where}: {k!r} has shape {list(v.shape)}, the checkpoint's {list(weights[k].shape)}"
            )
        if not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"{where}: {k!r} holds NaN or infinite values")
    # everything checked: now change the weights
    for k, v in plain.items():
        weights[k] = v.detach().float().clone()
        out.replaced.append(k)
    for key, A32, B32, scale in checked:
        if lazy and _LAZY_KEY.match(key):
            base = weights[key]
            rec = Pending(key, A32, B32, scale)
            setattr(base, _ATTR, rec)
            out.pending.append(rec)
        else:
            weights[key] = weights[key].float() + (B32 @ A32) * scale
        out.merged.append(key)
    return out


def pending_of(t):
    """The LoRA pair a streamed base tensor carries, or None."""
    return getattr(t, _ATTR, None)


def merged_rows(t, rec: Pending):
    """Rows i:j of ``t`` with its LoRA pair merged, float32 numpy (``LazyArray``'s row source)."""
    rec.used = True
    A, B, scale = rec.A, rec.B, rec.scale

    def rows(i, j):
        return (t[i:j].float() + (B[i:j] @ A) * scale).numpy()

    return rows


def check_all_used(merge: Merge | None) -> None:
    """Every lazily merged pair was read by ``matrix_in_out``: a version module that read an adapted
    matrix another way would otherwise export it unmerged, silently."""
    if merge is None:
        return
    unused = [r.key for r in merge.pending if not r.used]
    if unused:
        from .errors import ExportError

        raise ExportError(
            f"--lora: this version's export does not read {unused[0]} as a layer matrix; "
            "an adapter for it cannot be merged while streaming"
        )
