"""``rwkv-export web MODEL -o DIR``: a static web bundle that runs an export in the browser.

DIR gets the model's graphs (and their external-data files), the JavaScript runtime, ONNX Runtime
Web's module and WASM binaries, the tokenizer's files, the demo page and a ``bundle.json`` the page
reads. Serve it with ``python DIR/serve.py`` (COOP/COEP headers, loopback only).

The runtime and the demo page ship inside this package (``rwkv_export/targets/web_assets``: in the
repository two links, to js/src and deploy_examples/web, so there is one copy of each file; a wheel
holds the files themselves), so the command works from an installed rwkv-export. ONNX Runtime Web is not ours to ship: its files come from
``--ort-web DIR`` (a folder from ``npm install onnxruntime-web@1.30.0``), or, in a checkout, from
js/node_modules. The bundle is staged and committed through rwkv_runtime.safe_write: nothing
half-written, an existing folder is only ever an empty one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rwkv_runtime.artifact import open_artifact
from rwkv_runtime.safe_write import SafeWrite

from ..errors import ExportError
from . import check_new_folder

REPO = Path(__file__).resolve().parents[2]
JS_DIR = REPO / "js"  # a checkout's js/ (its node_modules is the fallback for ORT Web)
ASSETS = Path(__file__).resolve().parent / "web_assets"
RUNTIME_DIR = ASSETS / "rwkv-runtime"  # js/src (its Node entry, node.js, is not copied into a bundle)
NODE_ONLY = {"node.js"}
DEMO_DIR = ASSETS / "demo"
DEMO_FILES = ("index.html", "app.js", "serve.py")
ORT_WEB_VERSION = "1.30.0"
# onnxruntime-web 1.30: the WebGPU-capable module (it also runs WASM) and the binaries it may load
ORT_FILES = (
    "ort.webgpu.min.mjs",
    "ort-wasm-simd-threaded.jsep.mjs",
    "ort-wasm-simd-threaded.jsep.wasm",
    "ort-wasm-simd-threaded.asyncify.mjs",
    "ort-wasm-simd-threaded.asyncify.wasm",
)
HF_MODULE = Path("@huggingface") / "tokenizers" / "dist" / "tokenizers.min.mjs"
BROWSER_LIMIT = 2**31 - 1  # Chrome's ArrayBuffer limit: one model file must fit
NPM_STEP = f"`npm install onnxruntime-web@{ORT_WEB_VERSION}` in a folder, then --ort-web FOLDER/node_modules"


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


def find_ort_web(ort_web=None, js_dir: Path | None = None) -> Path:
    """The folder holding ORT Web's files: ``ort_web`` itself, its ``dist``, or its
    ``onnxruntime-web/dist`` (so a dist folder, the package folder or a node_modules folder all work);
    without it, a checkout's js/node_modules."""
    if ort_web is not None:
        base = Path(ort_web)
        if not base.is_dir():
            raise ExportError(f"--ort-web {base}: no such folder")
        for d in (base, base / "dist", base / "onnxruntime-web" / "dist"):
            if (d / ORT_FILES[0]).is_file():
                missing = [f for f in ORT_FILES if not (d / f).is_file()]
                if missing:
                    raise ExportError(
                        f"--ort-web {base}: {missing[0]} is missing from {d} (onnxruntime-web "
                        f"{ORT_WEB_VERSION} ships it); {NPM_STEP}"
                    )
                return d
        raise ExportError(f"--ort-web {base}: no ONNX Runtime Web files there ({ORT_FILES[0]}); {NPM_STEP}")
    d = Path(js_dir or JS_DIR) / "node_modules" / "onnxruntime-web" / "dist"
    if all((d / f).is_file() for f in ORT_FILES):
        return d
    raise ExportError(f"ONNX Runtime Web's files are needed (they are not part of rwkv-export): {NPM_STEP}")


def _hf_module(ort: Path, js_dir: Path | None) -> Path:
    """@huggingface/tokenizers' browser module, from the node_modules that ORT Web came from (or js/)."""
    roots = [p for p in ort.parents if p.name == "node_modules"][:1] + [Path(js_dir or JS_DIR) / "node_modules"]
    for r in roots:
        if (r / HF_MODULE).is_file():
            return r / HF_MODULE
    raise ExportError(
        "this model's tokenizer.json needs @huggingface/tokenizers in the browser: `npm install "
        "@huggingface/tokenizers` beside onnxruntime-web, and pass that node_modules as --ort-web"
    )


def write_web_bundle(model, out, js_dir: Path | None = None, ort_web=None) -> list[Path]:
    """Write the bundle for ``model`` (an exported .onnx) into the new folder ``out``; returns its files.
    ``ort_web``: a folder with ONNX Runtime Web's files (see find_ort_web); ``js_dir``: a checkout's js/."""
    model, out = Path(model), Path(out)
    art = open_artifact(model)
    if art.engine:
        raise ExportError(f"{model.name}: a TensorRT engine cannot run in a browser; pass the .onnx export")
    man = art.manifest
    if man.precision == "bf16":
        raise ExportError(
            f"{model.name} is a bfloat16 export: ONNX Runtime Web has no bfloat16 kernels; export fp32 or fp16"
        )
    kind = man.tokenizer.get("kind", "none")
    # what the runtime would refuse, refused before writing a bundle that cannot run in the page
    art.initial_state()
    if kind not in ("bytes", "world", "hf-json", "none"):
        raise ExportError(f"{model.name}: tokenizer kind {kind[:40]!r} is not one the web runtime knows; re-export it")
    if kind == "none":  # the demo page generates text; the runtime refuses that as Python does
        raise ExportError(
            f"{model.name} was exported with --tokenizer none: the demo page needs a tokenizer to "
            "turn text into tokens; re-export with --tokenizer"
        )
    if kind == "hf-json" and not art.tokenizer_json:
        raise ExportError(
            f"{model.name}: the manifest names a tokenizer.json but the model does not embed it; re-export it"
        )
    check_new_folder(out)
    if not (RUNTIME_DIR / "web.js").is_file() or not all((DEMO_DIR / f).is_file() for f in DEMO_FILES):
        raise ExportError(f"{ASSETS}: the web runtime's files are missing from this rwkv-export install; reinstall it")
    ort = find_ort_web(ort_web, js_dir)
    tok_module = _hf_module(ort, js_dir) if kind == "hf-json" else None

    graphs = [model]
    for g in ("step", "sequence"):
        p = art.companion_path(g)
        if p is not None and p != model:
            art.companion(g)  # checks it belongs to this export
            graphs.append(p)
    data = sorted({d for g in graphs for d in external_files(g)})
    for f in graphs + [model.with_name(d) for d in data]:
        if not f.is_file():
            raise ExportError(f"{f}: named by the export but missing")
        if f.stat().st_size > BROWSER_LIMIT:
            raise ExportError(
                f"{f.name} is {f.stat().st_size / 2**30:.1f} GiB: over the browser's 2 GiB ArrayBuffer "
                "limit; export a smaller or quantized model"
            )

    vocab = world_vocab() if kind == "world" else None
    try:
        with SafeWrite(out, inputs=graphs + [model.with_name(d) for d in data]) as sw:
            tmp = sw.path("bundle")
            tmp.mkdir()
            for f in graphs + [model.with_name(d) for d in data]:
                shutil.copy2(f, tmp / f.name)
            (tmp / "rwkv-runtime").mkdir()
            for f in sorted(RUNTIME_DIR.iterdir()):
                if f.is_file() and f.name not in NODE_ONLY:
                    shutil.copy2(f, tmp / "rwkv-runtime" / f.name)
            (tmp / "ort").mkdir()
            for f in ORT_FILES:
                shutil.copy2(ort / f, tmp / "ort" / f)
            if tok_module is not None:
                (tmp / "vendor").mkdir()
                shutil.copy2(tok_module, tmp / "vendor" / "tokenizers.min.mjs")
            if vocab is not None:
                shutil.copy2(vocab, tmp / vocab.name)
            for f in DEMO_FILES:
                shutil.copy2(DEMO_DIR / f, tmp / f)
            (tmp / "bundle.json").write_text(
                json.dumps(
                    {
                        "model": model.name,
                        "graphs": [g.name for g in graphs],
                        "external_data": data,
                        "architecture": man.architecture,
                        "tokenizer": kind,
                        "world_vocab": vocab.name if vocab else None,
                        "export_id": man.export_id,
                        "ort": "ort/ort.webgpu.min.mjs",
                    },
                    indent=1,
                )
            )
            sw.commit([("bundle", out)])
    except OSError as e:  # (disk full, ...): one line naming the user's folder, never the staging one
        where = out if e.filename is None or ".rwkv-export-" in str(e.filename) else e.filename
        raise ExportError(f"{where}: {e.strerror or type(e).__name__}; {out} was not written") from None
    return sorted(p for p in out.rglob("*") if p.is_file())
