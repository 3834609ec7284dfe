"""``rwkv-export mobile MODEL -o DIR``: ONNX Runtime (ORT) format models for mobile apps.

Each graph of the export (step, and the sequence companion if present) is converted with
``onnxruntime.tools.convert_onnx_models_to_ort`` (functions inlined, external data folded in: each
``.ort`` is self-contained). DIR also gets ``required_operators.config`` (for a reduced-operator ONNX
Runtime build) and ``MODEL.manifest.json``: the manifest with companions renamed to the ``.ort`` files
(apps read it instead of parsing flatbuffers; the ``.ort`` keeps the metadata too, checked here).
Optimisation level "extended": no hardware-specific layouts, so a file converted on x86 runs on ARM.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

from rwkv_runtime.artifact import open_artifact
from rwkv_runtime.manifest import MANIFEST_KEY
from rwkv_runtime.safe_write import PREFIX, SafeWrite

from ..errors import ExportError
from . import check_new_folder

ORT_FORMAT_LIMIT = 2**31 - 1  # flatbuffers: one .ort file must stay under 2 GB


def _convert(src: Path, out_dir: Path) -> Path:
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    old = os.environ.get("ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL")
    os.environ["ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL"] = "extended"
    import logging

    logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)  # it logs every config it writes
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            convert_onnx_models_to_ort(src, output_dir=out_dir, optimization_styles=[OptimizationStyle.Fixed])
    except Exception as e:  # onnxruntime raises its own types (Fail, InvalidGraph, RuntimeError)
        raise ExportError(f"{src.name}: conversion to ORT format failed ({str(e).splitlines()[0][:200]})") from None
    finally:
        if old is None:
            os.environ.pop("ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL", None)
        else:
            os.environ["ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL"] = old
    found = sorted(out_dir.glob("*.ort"))
    if len(found) != 1:
        raise ExportError(f"{src.name}: the ORT converter wrote {len(found)} .ort files, expected 1")
    return found[0]


def ort_metadata(path: Path) -> dict:
    """The custom metadata of an .ort model, as onnxruntime reads it."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return dict(
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    )


def write_mobile(model, out) -> list[Path]:
    """Convert ``model`` (an exported .onnx) and its companions into the new folder ``out``."""
    model, out = Path(model), Path(out)
    art = open_artifact(model)
    if art.engine:
        raise ExportError(f"{model.name}: a TensorRT engine cannot be converted; pass the .onnx export")
    if art.manifest.precision == "bf16":
        raise ExportError(
            f"{model.name} is a bfloat16 export: ONNX Runtime Mobile has no bfloat16 kernels; export fp32 or fp16"
        )
    check_new_folder(out)
    art.initial_state()  # a manifest that promises an embedded initial state has one (as the runtime checks)
    graphs = {}
    for kind in ("step", "sequence"):
        p = art.companion_path(kind)
        if p is not None:
            art.companion(kind)  # same export (export id, state layout)
            graphs[kind] = p

    from .web import external_files

    inputs = []
    for src in graphs.values():
        inputs.append(src)
        for f in external_files(src):
            # an external-data location is a plain name in the model's folder: never a path elsewhere
            if not _plain_name(f):
                raise ExportError(
                    f"{src}: its weights are stored at {f!r}, not a file in the model's folder; "
                    "refused (re-export the model)"
                )
            if not src.with_name(f).is_file():
                raise ExportError(f"{src}: its weights file {src.with_name(f)} is missing")
            inputs.append(src.with_name(f))
    try:
        with SafeWrite(out, inputs=inputs) as sw:
            tmp = sw.path(out.name)
            tmp.mkdir()
            names = {}
            for kind, src in graphs.items():
                work = sw.path(f".convert-{kind}")
                work.mkdir()
                # convert from a folder holding only this graph (and its external data), so the tool's
                # directory scan cannot pick up the other graph
                staged = work / "in"
                staged.mkdir()
                for f in [src.name, *external_files(src)]:
                    os.symlink(src.with_name(f).resolve(), staged / f)
                ort_file = _convert(staged / src.name, work / "out")
                if ort_file.stat().st_size > ORT_FORMAT_LIMIT:
                    raise ExportError(
                        f"{ort_file.name}: over the ORT format's 2 GB limit; export a smaller or quantized model"
                    )
                if MANIFEST_KEY not in ort_metadata(ort_file):
                    raise ExportError(f"{ort_file.name}: the ORT format dropped the model's metadata (rwkv manifest)")
                names[kind] = src.stem + ".ort"  # the tool appends the optimisation level; drop it
                os.replace(ort_file, tmp / names[kind])
                configs = sorted((work / "out").glob("*.config"))
                if configs:
                    os.replace(configs[0], tmp / f"{kind}.required_operators.config")
                shutil.rmtree(work)
            # one config for both graphs: the union of their operators (the format's lines are "domain;opset;ops")
            _merge_configs(sorted(tmp.glob("*.required_operators.config")), tmp / "required_operators.config")
            man = json.loads(art.manifest.to_json())
            man["companions"] = names
            main_name = names[art.manifest.graph]
            (tmp / (Path(main_name).stem + ".manifest.json")).write_text(json.dumps(man, indent=1, sort_keys=True))
            if art.tokenizer_json:
                (tmp / "tokenizer.json").write_text(art.tokenizer_json, encoding="utf-8")
            sw.commit([(out.name, out)])  # the new folder replaces the absent (or empty) one in one rename
    except OSError as e:  # (disk full, ...): one line naming the user's folder, never the staging one
        inside = e.filename is None or PREFIX in str(e.filename)
        where = out if inside else e.filename
        why = e.strerror or type(e).__name__
        raise ExportError(f"{where}: cannot write there ({why}); {out} was not written") from None
    return sorted(p for p in out.iterdir() if p.is_file())


def _plain_name(f: str) -> bool:
    return bool(f) and f not in (".", "..") and "/" not in f and "\\" not in f and ":" not in f and "\0" not in f


def _merge_configs(parts: list, target: Path) -> None:
    ops: dict = {}
    for p in parts:
        for line in p.read_text().splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            domain, opset, names = line.split(";", 2)
            ops.setdefault((domain, opset), set()).update(n for n in names.split(",") if n)
        p.unlink()
    lines = ["# operators the graphs of this export use (for a reduced-operator ONNX Runtime build)"]
    lines += [f"{d};{o};{','.join(sorted(n))}" for (d, o), n in sorted(ops.items())]
    target.write_text("\n".join(lines) + "\n")
