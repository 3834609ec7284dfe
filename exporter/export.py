"""Checkpoint -> ONNX: the step graph (one token) and the sequence graph (a prompt), each carrying
the manifest in its metadata.

Streaming: the checkpoint is memory-mapped, each weight is converted and written to the export's one
weights file (``onnx_graph.WeightStore``) as the graph builder asks for it, and both graphs point into
that file, so the weights are neither held in memory nor stored twice. The set of files is replaced
all-or-nothing (``staging``)."""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx

from rwkv_runtime.manifest import INITIAL_STATE_KEY, MANIFEST_KEY, TOKENIZER_KEY, Manifest, encode_state

from . import __version__, arch
from .arch.graph import GraphOptions
from .checkpoint import Checkpoint, check_finite, check_state_finite, load_checkpoint, read_state_tuning
from .errors import CheckpointError, ExportError
from .lora import check_all_used
from .onnx_graph import OPSET, GraphBuilder, WeightStore
from .quantize import DynamicInt8Quantizer, PendingStore, Quantizer, quantize_into
from .staging import Staging, Terminated

TWO_GB = 2**31 - 1
GRAPHS = ("step", "sequence")
PRECISIONS = {"fp32": np.float32, "fp16": np.float16, "bf16": ml_dtypes.bfloat16}
QUANTIZE = ("int8", "int4", "int8-dynamic")
QUANT_BLOCKS = (16, 32, 64, 128, 256)  # MatMulNBits: a power of two, at least 16
# Default block per format, from `make bench-quant` (docs/benchmarks.md): int8 at block 128 decodes ~17%
# faster than at 32 for the same accuracy on every reference; int4 keeps 32 (128 costs up to +2 points of
# cross-entropy on RWKV-5.2)
DEFAULT_QUANT_BLOCK = {"int8": 128, "int4": 32}


@dataclass
class ExportOptions:
    graphs: tuple = GRAPHS
    wkv: str = "plain"  # "plain" | "plugin"
    precision: str = "fp32"  # weights and MatMuls: fp32 | fp16 | bf16 (state, WKV, norms stay fp32)
    # None | "int8" | "int4": weight-only MatMulNBits | "int8-dynamic": DynamicQuantizeMatMul (onnxruntime CPU)
    quantize: str | None = None
    rescale_every: int | None = None  # RWKV-4 fp16/bf16 residual rescaling; None = 6 there, else 0
    quant_block: int | None = None  # int8/int4 block size; None = DEFAULT_QUANT_BLOCK of the format
    state_tuning: str | None = None  # a state-tuning file (blocks.N.att.time_state) baked in as the start state
    all_logits: bool = False  # sequence graph: logits for every position instead of the last
    tokenizer: str | None = None  # "bytes" | "world" | path to a tokenizer.json | None (= from the model)
    external_data: bool | None = None  # None: when exporting two graphs (one shared file) or over 2 GB
    allow_nonfinite: bool = False  # export weights holding NaN/inf instead of refusing the checkpoint
    lora: str | None = None  # a LoRA adapter (<weight>.lora_A/.lora_B, RWKV-PEFT) merged while streaming
    lora_alpha: float | None = None  # its alpha (scale alpha/r); None: alpha = r, scale 1

    def __post_init__(self):
        self.check()  # options that cannot go together are refused where they are made

    def check(self) -> None:
        """Raise :class:`ExportError` (the one line the CLI prints) for a bad value or combination."""
        if self.wkv not in ("plain", "plugin"):
            raise ExportError(f"--wkv must be 'plain' or 'plugin', not {self.wkv!r}")
        if self.precision not in PRECISIONS:
            raise ExportError(f"--precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.quantize not in (None, *QUANTIZE):
            raise ExportError(f"--quantize must be one of {', '.join(QUANTIZE)}, not {self.quantize!r}")
        if self.quant_block is not None and self.quantize not in DEFAULT_QUANT_BLOCK:
            raise ExportError(
                "--quant-block applies to --quantize int8 or int4 (int8-dynamic has one scale per column)"
            )
        if self.quant_block is not None and self.quant_block not in QUANT_BLOCKS:
            raise ExportError(
                f"--quant-block must be one of {', '.join(map(str, QUANT_BLOCKS))}, not {self.quant_block!r}"
            )
        if self.quantize and self.precision != "fp32":
            raise ExportError("--quantize applies to fp32 exports (its int8/int4 formats are for ONNX Runtime on CPU)")
        bad = [g for g in self.graphs if g not in GRAPHS]
        if bad or not self.graphs:
            raise ExportError(
                f"--graphs must name some of {', '.join(GRAPHS)} (got {', '.join(self.graphs) or 'none'})"
            )
        twice = sorted({g for g in self.graphs if list(self.graphs).count(g) > 1})
        if twice:
            raise ExportError(f"--graphs names {', '.join(twice)} more than once (got {','.join(self.graphs)})")

    def progress_steps(self) -> int:
        """How many times :func:`export` calls its ``progress`` callback: loading, preparing, then per
        graph building (+ quantizing) and writing; a progress bar's total."""
        return 2 + len(self.graphs) * (3 if self.quantize else 2)


def sequence_path(step_path: Path) -> Path:
    """Where the sequence graph goes beside the step graph: model.onnx -> model.seq.onnx."""
    return step_path.with_name(step_path.stem + ".seq" + step_path.suffix)


def _tokenizer(opt: ExportOptions, ck: Checkpoint, default: dict, vocab_size: int) -> tuple[dict, str | None]:
    choice = opt.tokenizer
    if choice is None and ck.tokenizer_file is not None:
        choice = str(ck.tokenizer_file)
    if choice is None:
        return default, None
    if choice == "bytes" and int(vocab_size) != 256:
        raise ExportError(
            f"--tokenizer bytes needs a 256-token vocabulary; this model has {vocab_size} tokens "
            "(use world, a tokenizer.json or none)"
        )
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
    """Export ``checkpoint`` to ``out`` (step graph) and its sequence companion. Returns the paths.

    All-or-nothing: the graphs and the shared weights file are staged beside ``out`` and moved into
    place together (``staging.Staging``); on any failure the previous files are left as they were."""
    opt = options or ExportOptions()
    out = Path(out)
    opt.check()  # again: the fields may have changed since construction
    block = opt.quant_block if opt.quant_block is not None else DEFAULT_QUANT_BLOCK.get(opt.quantize)
    paths = {"step": out, "sequence": sequence_path(out) if "step" in opt.graphs else out}
    data_path = out.with_name(out.name + ".data")  # the one weights file of the export, when external
    # the set this export replaces: its graphs, the shared weights file, and per-graph weights files
    # of older exports (their data would otherwise outlive the graphs naming them)
    targets = [paths[k] for k in opt.graphs]
    replaced = [data_path] + [p.with_name(p.name + ".data") for p in targets if p != out]
    _check_output_paths(out, targets + replaced)
    tick = progress or (lambda msg: None)

    tick("loading checkpoint")
    # large bf16/fp16 matrices: converted when written; a LoRA pair merged into its matrix then too
    ck = load_checkpoint(checkpoint, stream=True, lora=opt.lora, lora_alpha=opt.lora_alpha)
    _check_not_inputs(ck, opt, targets + replaced)
    if not opt.allow_nonfinite:
        check_finite(ck, release=lambda: release_mapped(ck.input_files), every=RELEASE_EVERY)
    release_mapped(ck.input_files)
    spec = arch.get(ck.version)
    with _inconsistent(ck):
        cfg = spec.config_from_weights(ck.weights, ck.hf_config)
    if int(cfg.get("vocab_size", 0)) < 1:
        raise CheckpointError(f"{ck.path}: empty vocabulary (emb.weight has no rows)")
    tok, tok_json = _tokenizer(opt, ck, spec.default_tokenizer(cfg), cfg["vocab_size"])
    tick("preparing weights")
    with _inconsistent(ck):
        W = spec.export_weights(ck.weights, cfg)  # views into the memory-mapped checkpoint where possible
    check_all_used(ck.lora)
    release_mapped(ck.input_files)  # the pages export_weights read (the embedding, folded with ln0)
    rescale = opt.rescale_every
    if rescale is None:
        if ck.format == "huggingface" and "rescale_every" in cfg:
            rescale = cfg["rescale_every"]  # what transformers computes, in every precision
        else:
            rescale = spec.half_rescale_every if opt.precision != "fp32" else 0
    with _inconsistent(ck, opt.state_tuning):
        initial = _initial_state(spec, ck, cfg, opt)
    external = opt.external_data
    if external is None:
        # two graphs: one weights file both point into (each graph embedding every weight doubled the
        # disk, issue #30); one graph: self-contained unless protobuf's 2 GB limit forbids it
        itemsize = np.dtype(PRECISIONS[opt.precision]).itemsize
        external = len(opt.graphs) > 1 or sum(t.numel() for t in ck.weights.values()) * itemsize > TWO_GB - 64 * 2**20
    # A random id, not a content hash: hashing would read every weight once more, and two exports of
    # the same checkpoint with different options must not pass for companions of each other.
    export_id = uuid.uuid4().hex
    allowed = {p.name for p in (out, sequence_path(out))} | {p.name + ".data" for p in (out, sequence_path(out))}
    try:
        with Staging(out, inputs=_input_files(ck, opt), allowed=allowed) as st:
            store = st.closing(WeightStore(st.path(data_path.name))) if external else None
            if store is not None:
                store.after_write = _every(RELEASE_EVERY, lambda: release_mapped(ck.input_files))
            quantizer = None
            if opt.quantize:
                quantizer = (
                    DynamicInt8Quantizer()
                    if opt.quantize == "int8-dynamic"
                    else Quantizer(8 if opt.quantize == "int8" else 4, block)
                )
                quantizer.after_write = _every(RELEASE_EVERY, lambda: release_mapped(ck.input_files))
            for kind in opt.graphs:
                tick(f"building {kind} graph")
                # quantising: the graph holds references to the float weights until quantize_into
                pending = PendingStore() if opt.quantize else None
                g = GraphBuilder(f"{ck.version}_{kind}", store=pending if opt.quantize else store)
                with _inconsistent(ck):
                    # no Gemm when quantising: the MatMulNBits quantiser rewrites MatMul nodes only
                    spec.build_graph(
                        g,
                        W,
                        cfg,
                        GraphOptions(
                            seq=kind == "sequence",
                            plugin=opt.wkv == "plugin",
                            all_logits=opt.all_logits,
                            dtype=PRECISIONS[opt.precision],
                            rescale_every=int(rescale),
                            gemm=not opt.quantize,
                        ),
                    )
                man = Manifest(
                    architecture=ck.version,
                    n_layer=cfg["n_layer"],
                    n_embd=cfg["n_embd"],
                    vocab_size=cfg["vocab_size"],
                    graph=kind,
                    precision=opt.precision,
                    opset=OPSET,
                    wkv=opt.wkv,
                    tokenizer=tok,
                    state=spec.state_layout(cfg),
                    dims={k: v for k, v in cfg.items()},
                    options={
                        "all_logits": bool(opt.all_logits and kind == "sequence"),
                        "rescale_every": int(rescale),
                        "quantize": opt.quantize,
                        **({"quant_block": block} if block is not None else {}),
                        "weights_file": data_path.name if external else None,
                    },
                    companions={k: paths[k].name for k in opt.graphs},
                    source={
                        "checkpoint": ck.path.name,
                        "format": ck.format,
                        **({"lora": ck.lora.path.name, "lora_alpha": ck.lora.alpha} if ck.lora else {}),
                    },
                    exporter_version=__version__,
                    initial_state="embedded" if initial else "",
                    export_id=export_id,
                )
                meta = {MANIFEST_KEY: man.to_json()}
                if tok_json is not None:
                    meta[TOKENIZER_KEY] = tok_json
                if initial:
                    meta[INITIAL_STATE_KEY] = encode_state(initial)
                model = g.model(
                    doc=f"RWKV {ck.version} {kind} graph exported by rwkv-export {__version__}", metadata=meta
                )
                del g
                if opt.quantize:
                    tick(f"quantizing {kind} graph ({opt.quantize})")
                    quantize_into(model, pending, store, quantizer)
                    del pending
                tick(f"writing {paths[kind].name}")
                if not external:
                    _check(model)
                onnx.save_model(model, str(st.path(paths[kind].name)))
                del model
            if store is not None:
                store.close()
                for kind in opt.graphs:  # every graph checked (with its weights file) before any move
                    _check(st.path(paths[kind].name))
            # commit order: the weights first, the step graph (what users open) last
            moves = [(data_path.name if external else None, data_path)]
            moves += [(None, p) for p in replaced[1:]]
            moves += [(paths[k].name, paths[k]) for k in sorted(opt.graphs, key=lambda k: k == "step")]
            st.commit(moves)
    except OSError as e:
        raise ExportError(_os_message(e, out)) from None
    except Terminated as e:
        raise ExportError(
            f"interrupted (SIGTERM); {out} and its companions were "
            + ("already replaced" if e.committed else "left unchanged")
        ) from None
    return [paths[k] for k in opt.graphs]


def _check(model_or_path):
    try:
        onnx.checker.check_model(
            model_or_path if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path), full_check=False
        )
    except onnx.checker.ValidationError as e:  # an exporter bug, but never a traceback
        raise ExportError(f"the exported graph failed onnx's checker ({str(e).splitlines()[0][:200]})") from None


RELEASE_EVERY = 32 * 2**20  # bytes converted between two releases of the checkpoint's mapped pages


def _every(nbytes: int, fn):
    """A callback for ``WeightStore.after_write``: ``fn()`` after every ``nbytes`` processed."""
    done = [0]

    def after(store, force: bool = False):
        if force or store.processed - done[0] >= nbytes:
            done[0] = store.processed
            fn()

    return after


def release_mapped(files) -> None:
    """Drop the resident pages of the memory-mapped checkpoint (Linux; elsewhere a no-op).

    Reading a mapped checkpoint leaves every page it touched resident, so the whole file would count
    in the export's memory. torch maps it private and file-backed; as long as nothing wrote to it
    (no anonymous pages, i.e. no copy-on-write copies, checked first), MADV_DONTNEED only drops pages,
    and a later read maps them in again from the file (page cache). Only mappings of ``files`` are
    touched. (Not ``Private_Dirty``: that also counts page-cache pages not yet written back, so a
    checkpoint written moments before the export would never be released.)"""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        names = {os.path.realpath(f) for f in files}
        ranges, current = [], None
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(maxsplit=5)
                if "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping's first line
                    path = head[5].strip() if len(head) == 6 else ""
                    current = None
                    if path in names and head[1].endswith("p"):
                        lo, hi = (int(x, 16) for x in head[0].split("-"))
                        current = [lo, hi]
                elif current is not None and head[0] == "Anonymous:":
                    if int(head[1]) == 0:  # never written: dropping its pages cannot lose data
                        ranges.append(current)
                    current = None
        if not ranges:
            return
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        for lo, hi in ranges:
            libc.madvise(lo, hi - lo, 4)  # MADV_DONTNEED
    except (OSError, ValueError, AttributeError, IndexError):
        pass  # only a memory optimisation


def _os_message(e: OSError, out: Path) -> str:
    """One line naming the user's path (never the staging folder's)."""
    where = out if e.errno in (errno.EISDIR, errno.ENOTDIR) else out.parent
    if e.errno == errno.ENOSPC:
        what = "no space left on device"
    elif e.errno == getattr(errno, "EDQUOT", errno.ENOSPC):
        what = "disk quota exceeded"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        what = f"cannot write here ({e.strerror or 'permission denied'})"
    else:
        what = e.strerror or type(e).__name__
    return f"{where}: {what}; {out} and its companions were left unchanged"


def _check_output_paths(out: Path, paths: list) -> None:
    if not out.parent.exists():
        raise ExportError(f"output directory {out.parent} does not exist")
    if not out.parent.is_dir():
        raise ExportError(f"{out.parent}: not a directory")
    for p in paths:
        if p.is_dir():
            what = "the output" if p == out else "an output of this export"
            raise ExportError(f"{p}: is a directory ({what}); remove it or choose another --output")


def _input_files(ck: Checkpoint, opt: ExportOptions) -> list:
    """Every file the export reads (the checkpoint's files, the state-tuning and tokenizer files)."""
    inputs = list(ck.input_files)
    for extra in (opt.state_tuning, opt.tokenizer, opt.lora):
        if extra and extra not in ("bytes", "world", "none") and Path(extra).is_file():
            inputs.append(Path(extra))
    return inputs


def _check_not_inputs(ck: Checkpoint, opt: ExportOptions, outputs: list) -> None:
    """Refuse an output path that is one of the export's inputs (it would be replaced)."""
    inputs = _input_files(ck, opt)
    for o in outputs:
        for i in inputs:
            try:
                same = o.exists() and os.path.samefile(o, i)
            except OSError:
                same = False
            if same or os.path.realpath(o) == os.path.realpath(i):
                raise ExportError(f"{o}: is an input of this export ({i.name}); choose another --output")


@contextlib.contextmanager
def _inconsistent(ck: Checkpoint, other=None):
    """Tensors of the wrong shape or rank that the version module did not check by name end as
    torch/numpy errors deep in its code: report them as one line about the checkpoint."""
    try:
        yield
    except (KeyError, ValueError, RuntimeError, IndexError, TypeError) as e:
        if isinstance(e, ExportError):
            raise
        msg = str(e).splitlines()[0][:160] if str(e) else ""
        what = f"{other}: a state-tuning file inconsistent with" if other else f"{ck.path}: inconsistent"
        raise CheckpointError(f"{what} {ck.version} checkpoint ({type(e).__name__}: {msg})") from None


def _initial_state(spec, ck: Checkpoint, cfg: dict, opt: ExportOptions) -> dict:
    """A learned initial state: from --state-tuning, or time_state tensors merged into the checkpoint."""
    merged = any(k.endswith("att.time_state") for k in ck.weights)
    if opt.state_tuning is None and not merged:
        return {}
    if spec.load_state_tuning is None:
        raise ExportError(f"{spec.name} has no learned initial state (state tuning applies to RWKV-5/6/7)")
    if opt.state_tuning is not None and not Path(opt.state_tuning).is_file():
        raise ExportError(f"--state-tuning {opt.state_tuning}: no such file")
    src = read_state_tuning(opt.state_tuning) if opt.state_tuning is not None else ck.weights
    return _finite_state(spec.load_state_tuning(src, cfg), opt.state_tuning or ck.path)


def _finite_state(arrays: dict, where) -> dict:
    for k, v in arrays.items():
        check_state_finite(v, f"{where}: the learned state ({k})")
    return arrays


def state_tuning_to_npz(checkpoint, tuning, out) -> Path:
    """Convert a state-tuning .pth into an .npz the runtime loads (``Session(initial_state=...)``).

    Written with ``safe_write.write_file``: all or nothing, never over the checkpoint or the tuning file."""
    import io

    from rwkv_runtime.safe_write import write_file

    out = Path(out)
    if out.is_dir():
        raise ExportError(f"{out}: is a directory")
    if not out.parent.is_dir():
        raise ExportError(f"output directory {out.parent} does not exist")
    ck = load_checkpoint(checkpoint)
    spec = arch.get(ck.version)
    cfg = spec.config_from_weights(ck.weights, ck.hf_config)
    if spec.load_state_tuning is None:
        raise ExportError(f"{spec.name} has no learned initial state")
    if not Path(tuning).is_file():
        raise ExportError(f"{tuning}: no such file")
    inputs = [*ck.input_files, Path(tuning)]
    for i in inputs:
        if _same_file(out, i):
            raise ExportError(f"{out}: is an input ({i.name}); choose another --output")
    with _inconsistent(ck, tuning):
        arrays = _finite_state(spec.load_state_tuning(read_state_tuning(tuning), cfg), tuning)
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # small (one state): built in memory, so the write is one step
    try:
        write_file(out, lambda p: p.write_bytes(buf.getvalue()), inputs=inputs)
    except OSError as e:
        raise ExportError(f"{out}: cannot write ({e.strerror or type(e).__name__}); it was left unchanged") from None
    return out


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and os.path.samefile(a, b):
            return True
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def load_manifest(path) -> Manifest:
    """Read the manifest of an exported model without loading its weights (the runtime's one reader)."""
    from rwkv_runtime.artifact import read_manifest

    return read_manifest(path)[0]


def reference_model(checkpoint):
    """The PyTorch reference for a checkpoint (used by validate and the tests); ``checkpoint`` may be a
    loaded ``Checkpoint`` (e.g. with a LoRA adapter merged)."""
    ck = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    spec = arch.get(ck.version)
    return spec.Model.from_weights(ck.weights, spec.config_from_weights(ck.weights, ck.hf_config))


__all__ = ["export", "ExportOptions", "load_manifest", "reference_model", "sequence_path"]
