"""Checkpoint -> ONNX: the step graph (one token) and the sequence graph (a prompt), each carrying
the manifest in its metadata. Files are written atomically: a failed export leaves nothing behind."""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx

from rwkv_runtime.manifest import INITIAL_STATE_KEY, MANIFEST_KEY, TOKENIZER_KEY, Manifest, encode_state

from . import __version__, arch
from .checkpoint import Checkpoint, load_checkpoint
from .errors import ExportError
from .onnx_graph import OPSET, GraphBuilder

TWO_GB = 2**31 - 1
GRAPHS = ("step", "sequence")
PRECISIONS = {"fp32": np.float32, "fp16": np.float16, "bf16": ml_dtypes.bfloat16}


@dataclass
class ExportOptions:
    graphs: tuple = GRAPHS
    wkv: str = "plain"  # "plain" | "plugin"
    precision: str = "fp32"  # weights and MatMuls: fp32 | fp16 | bf16 (state, WKV, norms stay fp32)
    quantize: str | None = None  # None | "int8" | "int4": weight-only MatMulNBits (onnxruntime CPU)
    rescale_every: int | None = None  # RWKV-4 fp16/bf16 residual rescaling; None = 6 there, else 0
    quant_block: int = 32
    state_tuning: str | None = None  # a state-tuning file (blocks.N.att.time_state) baked in as the start state
    all_logits: bool = False  # sequence graph: logits for every position instead of the last
    tokenizer: str | None = None  # "bytes" | "world" | path to a tokenizer.json | None (= from the model)
    external_data: bool | None = None  # None: only when the model is over 2 GB
    extra: dict = field(default_factory=dict)


def sequence_path(step_path: Path) -> Path:
    """Where the sequence graph goes beside the step graph: model.onnx -> model.seq.onnx."""
    return step_path.with_name(step_path.stem + ".seq" + step_path.suffix)


def _tokenizer(opt: ExportOptions, ck: Checkpoint, default: dict) -> tuple[dict, str | None]:
    choice = opt.tokenizer
    if choice is None and ck.tokenizer_file is not None:
        choice = str(ck.tokenizer_file)
    if choice is None:
        return default, None
    if choice in ("bytes", "world", "none"):
        return {"kind": choice}, None
    p = Path(choice)
    if not p.is_file():
        raise ExportError(f"--tokenizer {choice}: not 'bytes', 'world', 'none' or an existing tokenizer.json")
    try:
        from tokenizers import Tokenizer

        Tokenizer.from_file(str(p))
    except Exception as e:  # the tokenizers package raises its own exception type
        raise ExportError(f"--tokenizer {p}: not a Hugging Face tokenizer.json ({str(e)[:100]})") from None
    return {"kind": "hf-json", "name": p.name}, p.read_text(encoding="utf-8")


def export(checkpoint, out, options: ExportOptions | None = None, progress=None) -> list[Path]:
    """Export ``checkpoint`` to ``out`` (step graph) and its sequence companion. Returns the paths."""
    opt = options or ExportOptions()
    out = Path(out)
    if opt.wkv not in ("plain", "plugin"):
        raise ExportError(f"--wkv must be 'plain' or 'plugin', not {opt.wkv!r}")
    if opt.precision not in PRECISIONS:
        raise ExportError(f"--precision must be one of {', '.join(PRECISIONS)}, not {opt.precision!r}")
    if opt.quantize not in (None, "int8", "int4"):
        raise ExportError(f"--quantize must be int8 or int4, not {opt.quantize!r}")
    if opt.quantize and opt.precision != "fp32":
        raise ExportError("--quantize applies to fp32 exports (weight-only int8/int4 for ONNX Runtime on CPU)")
    bad = [g for g in opt.graphs if g not in GRAPHS]
    if bad or not opt.graphs:
        raise ExportError(f"--graphs must name some of {', '.join(GRAPHS)} (got {', '.join(opt.graphs) or 'none'})")
    if not out.parent.exists():
        raise ExportError(f"output directory {out.parent} does not exist")
    tick = progress or (lambda msg: None)

    tick("loading checkpoint")
    ck = load_checkpoint(checkpoint)
    mod = arch.get(ck.version)
    cfg = mod.config_from_weights(ck.weights, ck.hf_config)
    tok, tok_json = _tokenizer(opt, ck, mod.default_tokenizer(cfg))
    tick("preparing weights")
    W = mod.export_weights(ck.weights, cfg)
    rescale = opt.rescale_every
    if rescale is None:
        if ck.format == "huggingface" and "rescale_every" in cfg:
            rescale = cfg["rescale_every"]  # what transformers computes, in every precision
        else:
            rescale = 6 if (ck.version == "rwkv4" and opt.precision != "fp32") else 0
    graph_kwargs = {"dtype": PRECISIONS[opt.precision]}
    if ck.version == "rwkv4":
        graph_kwargs["step_gemm"] = not opt.quantize  # the MatMulNBits quantiser rewrites MatMul nodes
    if rescale:
        graph_kwargs["rescale_every"] = int(rescale)
    initial = _initial_state(mod, ck, cfg, opt)
    paths = {"step": out, "sequence": sequence_path(out) if "step" in opt.graphs else out}
    written = []
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".rwkv-export-") as tmp:
        staged = []
        for kind in opt.graphs:
            tick(f"building {kind} graph")
            g = GraphBuilder(f"{ck.version}_{kind}")
            mod.build_graph(g, W, cfg, seq=kind == "sequence", plugin=opt.wkv == "plugin",
                            all_logits=opt.all_logits, **graph_kwargs)
            man = Manifest(
                architecture=ck.version, n_layer=cfg["n_layer"], n_embd=cfg["n_embd"],
                vocab_size=cfg["vocab_size"], graph=kind, precision=opt.precision, opset=OPSET, wkv=opt.wkv,
                tokenizer=tok, state=mod.state_layout(cfg), dims={k: v for k, v in cfg.items()},
                options={"all_logits": bool(opt.all_logits and kind == "sequence"), "rescale_every": int(rescale),
                         "quantize": opt.quantize, **({"quant_block": opt.quant_block} if opt.quantize else {}),
                         **opt.extra},
                companions={k: paths[k].name for k in opt.graphs},
                source={"checkpoint": ck.path.name, "format": ck.format}, exporter_version=__version__,
                initial_state="embedded" if initial else "")
            meta = {MANIFEST_KEY: man.to_json()}
            if tok_json is not None:
                meta[TOKENIZER_KEY] = tok_json
            if initial:
                meta[INITIAL_STATE_KEY] = encode_state(initial)
            model = g.model(doc=f"RWKV {ck.version} {kind} graph exported by rwkv-export {__version__}", metadata=meta)
            if opt.quantize:
                tick(f"quantizing {kind} graph ({opt.quantize})")
                model = quantize_weights(model, 8 if opt.quantize == "int8" else 4, opt.quant_block)
            target = paths[kind]
            tmp_path = Path(tmp) / target.name
            tick(f"writing {target.name}")
            _save(model, tmp_path, opt.external_data)
            staged.append((tmp_path, target))
        # everything built and checked: move into place (data files before the models naming them)
        for tmp_path, target in staged:
            data = tmp_path.with_name(tmp_path.name + ".data")
            if data.exists():
                os.replace(data, target.with_name(target.name + ".data"))
            os.replace(tmp_path, target)
            written.append(target)
    return written


def _initial_state(mod, ck: Checkpoint, cfg: dict, opt: ExportOptions) -> dict:
    """A learned initial state: from --state-tuning, or time_state tensors merged into the checkpoint."""
    merged = any(k.endswith("att.time_state") for k in ck.weights)
    if opt.state_tuning is None and not merged:
        return {}
    if not hasattr(mod, "load_state_tuning"):
        raise ExportError(f"{ck.version.replace('rwkv', 'RWKV-')} has no learned initial state (state tuning "
                          "applies to RWKV-5/6/7)")
    if opt.state_tuning is not None and not Path(opt.state_tuning).is_file():
        raise ExportError(f"--state-tuning {opt.state_tuning}: no such file")
    return mod.load_state_tuning(opt.state_tuning if opt.state_tuning is not None else ck.weights, cfg)


def state_tuning_to_npz(checkpoint, tuning, out) -> Path:
    """Convert a state-tuning .pth into an .npz the runtime loads (``Session(initial_state=...)``)."""
    ck = load_checkpoint(checkpoint)
    mod = arch.get(ck.version)
    cfg = mod.config_from_weights(ck.weights, ck.hf_config)
    if not hasattr(mod, "load_state_tuning"):
        raise ExportError(f"{ck.version.replace('rwkv', 'RWKV-')} has no learned initial state")
    if not Path(tuning).is_file():
        raise ExportError(f"{tuning}: no such file")
    arrays = mod.load_state_tuning(tuning, cfg)
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, out)
    return out


def quantize_weights(model: onnx.ModelProto, bits: int, block: int) -> onnx.ModelProto:
    """Weight-only block quantisation of every MatMul with a constant weight (onnxruntime's
    MatMulNBits). accuracy_level=4 lets onnxruntime compute in int8, which is what makes it fast on
    CPUs (measured: several times faster than without)."""
    import logging

    from onnxruntime.quantization import matmul_nbits_quantizer as mnq
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    mnq.logger.setLevel(logging.WARNING)  # it logs every node at INFO

    meta = {p.key: p.value for p in model.metadata_props}
    q = MatMulNBitsQuantizer(model, bits=bits, block_size=block, is_symmetric=True, accuracy_level=4)
    q.process()
    out = q.model.model
    onnx.helper.set_model_props(out, meta)
    return out


def _save(model: onnx.ModelProto, path: Path, external: bool | None):
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    if external is None:
        external = size > TWO_GB - 64 * 2**20
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
        onnx.checker.check_model(str(path), full_check=False)
    else:
        onnx.checker.check_model(model, full_check=False)
        onnx.save_model(model, str(path))


def load_manifest(path) -> Manifest:
    """Read the manifest of an exported model without loading its weights."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such file")
    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends
        raise ExportError(f"{path}: not an ONNX model ({type(e).__name__})") from None
    props = {p.key: p.value for p in m.metadata_props}
    if MANIFEST_KEY not in props:
        raise ExportError(f"{path}: an ONNX model without an rwkv manifest (not exported by rwkv-export)")
    return Manifest.from_json(props[MANIFEST_KEY])


def reference_model(checkpoint):
    """The PyTorch reference for a checkpoint (used by validate and the tests)."""
    ck = load_checkpoint(checkpoint)
    mod = arch.get(ck.version)
    cfg = mod.config_from_weights(ck.weights, ck.hf_config)
    return mod.Model.from_weights(ck.weights, cfg)


__all__ = ["export", "ExportOptions", "load_manifest", "reference_model", "sequence_path"]
