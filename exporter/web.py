"""``rwkv-export web MODEL -o DIR``: a static web bundle that runs an export in the browser.

DIR gets the model's graphs (and their external-data files), the JavaScript runtime (js/src), ONNX
Runtime Web's module and WASM binaries, the tokenizer's files, the demo page (deploy_examples/web) and a
``bundle.json`` the page reads. Serve it with ``python DIR/serve.py`` (COOP/COEP headers, loopback only).
The bundle is written to a temporary folder beside DIR and renamed into place: nothing half-written.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from rwkv_runtime.artifact import open_artifact

from .errors import ExportError

REPO = Path(__file__).resolve().parents[1]
JS_DIR = REPO / "js"
DEMO_DIR = REPO / "deploy_examples" / "web"
DEMO_FILES = ("index.html", "app.js", "serve.py")
# onnxruntime-web 1.30: the WebGPU-capable module (it also runs WASM) and the binaries it may load
ORT_FILES = ("ort.webgpu.min.mjs", "ort-wasm-simd-threaded.jsep.mjs", "ort-wasm-simd-threaded.jsep.wasm",
             "ort-wasm-simd-threaded.asyncify.mjs", "ort-wasm-simd-threaded.asyncify.wasm")
BROWSER_LIMIT = 2**31 - 1  # Chrome's ArrayBuffer limit: one model file must fit


def external_files(model: Path) -> list[str]:
    """The external-data files a graph's initializers name (relative to its folder)."""
    import onnx

    m = onnx.load(str(model), load_external_data=False)
    names = set()
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                names.add(e.value)
    return sorted(names)


def world_vocab() -> Path:
    """The RWKV World vocabulary file shipped by BlinkDL's ``rwkv`` package (or pyrwkv-tokenizer)."""
    for mod in ("rwkv", "pyrwkv_tokenizer"):
        try:
            pkg = __import__(mod)
        except ImportError:
            continue
        for p in Path(pkg.__file__).parent.rglob("rwkv_vocab_v20230424*"):
            if p.suffix == ".txt":
                return p
    raise ExportError("the World tokenizer's vocabulary (rwkv_vocab_v20230424.txt) was not found: `pip install rwkv`")


def _js_sources(js_dir: Path) -> tuple[Path, Path]:
    src, ort = js_dir / "src", js_dir / "node_modules" / "onnxruntime-web" / "dist"
    if not (src / "web.js").is_file():
        raise ExportError(f"{js_dir}: the JavaScript runtime (js/src) is not there; run from a checkout of rwkv-export")
    missing = [f for f in ORT_FILES if not (ort / f).is_file()]
    if missing:
        raise ExportError(f"{ort}: onnxruntime-web is not installed ({missing[0]} missing); run "
                          f"`ONNXRUNTIME_NODE_INSTALL=skip npm ci` in {js_dir}")
    return src, ort


def write_web_bundle(model, out, js_dir: Path | None = None) -> list[Path]:
    """Write the bundle for ``model`` (an exported .onnx) into the new folder ``out``; returns its files."""
    model, out = Path(model), Path(out)
    art = open_artifact(model)
    if art.engine:
        raise ExportError(f"{model.name}: a TensorRT engine cannot run in a browser; pass the .onnx export")
    man = art.manifest
    if man.precision == "bf16":
        raise ExportError(f"{model.name} is a bfloat16 export: ONNX Runtime Web has no bfloat16 kernels; export fp32 or fp16")
    kind = man.tokenizer.get("kind", "none")
    # what the runtime would refuse, refused before writing a bundle that cannot run in the page
    art.initial_state()
    if kind not in ("bytes", "world", "hf-json", "none"):
        raise ExportError(f"{model.name}: tokenizer kind {kind[:40]!r} is not one the web runtime knows; re-export it")
    if kind == "hf-json" and not art.tokenizer_json:
        raise ExportError(f"{model.name}: the manifest names a tokenizer.json but the model does not embed it; re-export it")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out}: exists and is not an empty folder; choose another -o")
    if not out.parent.is_dir():
        raise ExportError(f"{out.parent}: no such folder")
    src, ort = _js_sources(Path(js_dir) if js_dir else JS_DIR)

    graphs = [model]
    for kind in ("step", "sequence"):
        p = art.companion_path(kind)
        if p is not None and p != model:
            art.companion(kind)  # checks it belongs to this export
            graphs.append(p)
    data = sorted({d for g in graphs for d in external_files(g)})
    for f in graphs + [model.with_name(d) for d in data]:
        if not f.is_file():
            raise ExportError(f"{f}: named by the export but missing")
        if f.stat().st_size > BROWSER_LIMIT:
            raise ExportError(f"{f.name} is {f.stat().st_size / 2**30:.1f} GiB: over the browser's 2 GiB ArrayBuffer "
                              "limit; export a smaller or quantized model")

    vocab = world_vocab() if kind == "world" else None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    except OSError as e:  # name the user's folder, not the temporary one
        raise ExportError(f"{out}: cannot write there ({e.strerror or type(e).__name__})") from None
    try:
        for f in graphs + [model.with_name(d) for d in data]:
            shutil.copy2(f, tmp / f.name)
        (tmp / "rwkv-runtime").mkdir()
        for f in [p for p in sorted(src.glob("*.js")) if p.name != "node.js"] + sorted(src.glob("*.d.ts")):
            shutil.copy2(f, tmp / "rwkv-runtime" / f.name)
        (tmp / "ort").mkdir()
        for f in ORT_FILES:
            shutil.copy2(ort / f, tmp / "ort" / f)
        tok_module = Path(js_dir or JS_DIR) / "node_modules" / "@huggingface" / "tokenizers" / "dist" / "tokenizers.min.mjs"
        if kind == "hf-json":
            if not tok_module.is_file():
                raise ExportError(f"{tok_module}: missing; run `npm ci` in js/")
            (tmp / "vendor").mkdir()
            shutil.copy2(tok_module, tmp / "vendor" / "tokenizers.min.mjs")
        if vocab is not None:
            shutil.copy2(vocab, tmp / vocab.name)
        for f in DEMO_FILES:
            shutil.copy2(DEMO_DIR / f, tmp / f)
        (tmp / "bundle.json").write_text(json.dumps({
            "model": model.name, "graphs": [g.name for g in graphs], "external_data": data,
            "architecture": man.architecture, "tokenizer": kind, "world_vocab": vocab.name if vocab else None,
            "export_id": man.export_id, "ort": "ort/ort.webgpu.min.mjs",
        }, indent=1))
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except OSError as e:  # (disk full, ...): one line naming the user's folder, never the temporary one
        shutil.rmtree(tmp, ignore_errors=True)
        where = out if e.filename is None or str(e.filename).startswith(str(tmp)) else e.filename
        raise ExportError(f"{where}: {e.strerror or type(e).__name__}; {out} was not written") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(p for p in out.rglob("*") if p.is_file())
