"""What ``validate`` checks: the model file, the manifest it carries (an engine's from its sidecar or its
ONNX file), the tolerances by precision, and every file the check reads (none may be written)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from rwkv_runtime.errors import RuntimeUserError

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")


DEFAULT_STEPS = 32


DEFAULT_CHUNK = 8
# Default (atol, rtol) by what the export computes in. fp32, measured (ONNX Runtime CPU vs torch,
# 256 tokens of the embedded RWKV-4): no output uses more than 1.6% of this tolerance. The others
# catch a wrongly built graph; quantisation's quality cost is measured by `export --quantize`.
DEFAULT_TOLERANCES = {
    "fp32": (1e-4, 1e-3),
    "fp16": (5e-2, 5e-2),
    "bf16": (0.25, 0.1),
    "int8": (0.5, 0.1),
    "int4": (2.0, 0.3),
}


class ValidationError(RuntimeUserError):
    """A problem with what validate was asked to do; printed as one line."""


@dataclass
class Target:
    """The model to check: its file, the ONNX file holding its manifest, and what that says."""

    path: Path  # what the backend runs (.onnx or a TensorRT engine)
    manifest_from: Path  # where the manifest comes from (``path``, or an engine's sidecar or ONNX file)
    manifest: object
    tokenizer_json: str | None
    initial: dict  # a learned initial state embedded by the exporter ({} if none)
    plugins: list = field(default_factory=list)  # plugin libraries an engine was built with (its sidecar)

    @property
    def is_engine(self) -> bool:
        return self.path.suffix in ENGINE_SUFFIXES


def load_target(model, graph: str | None = None, onnx_path=None) -> Target:
    """Resolve MODEL (+ ``--graph``, + ``--onnx`` for engines) and read its manifest."""
    path = Path(model)
    if not path.exists():
        raise ValidationError(f"{path}: no such file")
    read = _read_engine if path.suffix in ENGINE_SUFFIXES else _read_onnx
    target = read(path, onnx_path)
    man = target.manifest
    if graph and graph != man.graph:
        from rwkv_runtime.artifact import open_artifact, sidecar_path

        # the companion through the runtime's one reader (confined to the folder, of this export)
        own = read is _read_onnx or target.manifest_from == sidecar_path(path)  # not a manifest from --onnx
        art = open_artifact(path) if own else None
        other = art.companion_path(graph) if art is not None else None
        if other is None:
            raise ValidationError(
                f"{path.name} is a {man.graph} graph and its {graph} graph is not beside it "
                f"(give that file as MODEL{'' if read is _read_onnx else ', with its --onnx'})"
            )
        art.companion(graph)  # same export id and state layout
        target = read(other, None)
    return target


def _read_onnx(path: Path, _onnx_path=None) -> Target:
    from rwkv_runtime.artifact import open_artifact

    art = open_artifact(path)  # the runtime's one reader: manifest, tokenizer, initial state, validated
    return Target(path, path, art.manifest, art.tokenizer_json, art.initial_state())


def _read_engine(path: Path, onnx_path=None) -> Target:
    """An engine carries no metadata: its manifest comes from the sidecar ``MODEL.engine.json`` that
    ``build-engine`` writes (with the plugin libraries it was built with), or from ``--onnx``, the
    ONNX file it was built from (default: beside it)."""
    if onnx_path is None:
        from rwkv_runtime.artifact import open_artifact, outside_reason, sidecar_path

        if sidecar_path(path).is_file():
            art = open_artifact(path)  # the runtime's one reader (the sidecar, validated)
            # a recorded library is loaded (its code runs) only from inside the engine's folder: beside it
            # under its name, or where build-engine loaded it when that lies inside the folder
            found = []
            for rec in art.props.get("plugins", []):
                cands = [path.with_name(rec["name"])] + ([Path(rec["path"])] if rec.get("path") else [])
                hit = next((c for c in cands if c.is_file() and outside_reason(path, c) is None), None)
                if hit is not None:
                    found.append(str(hit))
            return Target(path, sidecar_path(path), art.manifest, art.tokenizer_json, art.initial_state(), found)
    src = Path(onnx_path) if onnx_path else path.with_suffix(".onnx")
    if not src.is_file():
        raise ValidationError(
            f"{path.name} is a TensorRT engine with no {path.name}.json sidecar: pass --onnx with "
            f"the ONNX file it was built from, which holds the manifest (looked for {src.name})"
        )
    onnx_target = _read_onnx(src)
    return Target(path, src, onnx_target.manifest, onnx_target.tokenizer_json, onnx_target.initial)


def default_tolerances(manifest) -> tuple:
    kind = manifest.options.get("quantize") or manifest.precision
    return DEFAULT_TOLERANCES.get(kind, DEFAULT_TOLERANCES["fp32"])


def _input_files(model, target: Target, reference, onnx_path, plugins) -> list:
    """Every file validate reads: MODEL, its companions and weights file, the engine's sidecar and ONNX
    source, the reference (a Hugging Face folder: its files) and plugin libraries."""
    files = [Path(model), target.path, target.manifest_from, Path(reference), *map(Path, plugins)]
    if onnx_path:
        files.append(Path(onnx_path))
    files.append(target.path.with_name(target.path.name + ".json"))
    man = target.manifest
    names = list(man.companions.values()) + [man.options.get("weights_file")]
    files += [target.manifest_from.with_name(n) for n in names if isinstance(n, str) and n]
    if Path(reference).is_dir():
        files += [f for f in Path(reference).iterdir() if f.is_file()]
    return files


def _check_save_paths(outputs: dict, inputs: list) -> None:
    """Before any work: each --save-* file can be written, and is none of the files validate reads (writing
    it would destroy the model or the reference) nor the other --save-* file."""
    seen = {}
    for opt, out in outputs.items():
        if not out:
            continue
        out = Path(out)
        if out.is_dir():
            raise ValidationError(f"{opt} {out}: is a directory; give a file name")
        if not out.parent.is_dir():
            raise ValidationError(f"{opt} {out}: the folder {out.parent} does not exist")
        for other in list(inputs) + list(seen):
            try:
                same = out.exists() and other.exists() and os.path.samefile(out, other)
            except OSError:
                same = False
            if same or os.path.realpath(out) == os.path.realpath(other):
                what = f"also {seen[other]}" if other in seen else f"a file this check reads ({other.name})"
                raise ValidationError(f"{opt} {out}: is {what}; choose another file")
        seen[out] = opt


def _save_atomically(dest, write, inputs=()) -> None:
    """``write(path)`` through ``safe_write.write_file``: staged beside ``dest``, then renamed over it; a
    failed write (disk full, Ctrl-C) leaves ``dest`` as it was and no partial file; never over an input."""
    from rwkv_runtime.safe_write import write_file

    dest = Path(dest)
    try:
        write_file(dest, lambda p: write(str(p)), inputs=inputs)
    except OSError as e:
        raise ValidationError(
            f"{dest}: cannot write it ({e.strerror or type(e).__name__}); an existing file was left unchanged"
        ) from None
