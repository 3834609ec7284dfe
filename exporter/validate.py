"""``rwkv-export validate``: an export against the PyTorch reference, over a rollout, through Polygraphy.

One step from a fresh state proves little: RWKV carries everything in its state and errors
accumulate there. So validation runs a whole rollout (the prompt's tokens, continued greedily by
the reference) and makes two checks:

1. **Teacher-forced, with Polygraphy alone.** The data loader *is* the reference rollout: feed ``i``
   holds token(s) ``i`` and the reference's state before them (from the manifest's initial state;
   RWKV-4's ``pp`` starts at -1e30). ``Comparator.run`` runs the backend runner (``OnnxrtRunner``
   around our own ``InferenceSession``, or ``TrtRunner``) and ``pytorch-reference`` (a Polygraphy
   ``BaseRunner`` around the torch model) on every feed; ``Comparator.compare_accuracy`` with
   Polygraphy's simple comparison decides, for ``logits`` and every ``new_state.*`` output. Because
   each step starts from the reference's state, this check is reproducible with ``polygraphy run``
   from the saved feeds and reference outputs (``--save-inputs``/``--save-outputs``).
2. **Free-running.** The same backend runner is fed back its own state, as in real use, and its
   logits are compared, step by step and with the same rule, with the reference's rollout: this
   catches errors that are small per step but accumulate.

The tolerance rule is Polygraphy's (``elemwise``): an element fails when both
``|export - ref| > atol`` and ``|export - ref| / |ref| > rtol``. The report shows, per step and per
output group (logits; each state field, over all layers), the largest absolute and relative error
and the share of the tolerance used (the largest ``min(abs/atol, rel/rtol)``: above 1 fails).
"""
from __future__ import annotations

import math
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

from rwkv_runtime.errors import BackendUnavailable, RuntimeUserError

REFERENCE_RUNNER = "pytorch-reference"
FREE_RUNNING_RUNNER = "export-free-running"
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
DEFAULT_STEPS = 32
DEFAULT_CHUNK = 8
# Default (atol, rtol) by what the export computes in. fp32, measured (ONNX Runtime CPU vs torch,
# 256 tokens of the embedded RWKV-4): no output uses more than 1.6% of this tolerance. The others
# catch a wrongly built graph; quantisation's quality cost is measured by `export --quantize`.
DEFAULT_TOLERANCES = {"fp32": (1e-4, 1e-3), "fp16": (5e-2, 5e-2), "bf16": (0.25, 0.1),
                      "int8": (0.5, 0.1), "int4": (2.0, 0.3)}
_EPS = 2.220446049250313e-16  # Polygraphy's epsilon for zero reference values in relative errors


class ValidationError(RuntimeUserError):
    """A problem with what validate was asked to do; printed as one line."""


# ---------------------------------------------------------------------------------------------
# What is being validated
# ---------------------------------------------------------------------------------------------
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
            raise ValidationError(f"{path.name} is a {man.graph} graph and its {graph} graph is not beside it "
                                  f"(give that file as MODEL{'' if read is _read_onnx else ', with its --onnx'})")
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
        raise ValidationError(f"{path.name} is a TensorRT engine with no {path.name}.json sidecar: pass --onnx with the "
                              f"ONNX file it was built from, which holds the manifest (looked for {src.name})")
    onnx_target = _read_onnx(src)
    return Target(path, src, onnx_target.manifest, onnx_target.tokenizer_json, onnx_target.initial)


def default_tolerances(manifest) -> tuple:
    kind = manifest.options.get("quantize") or manifest.precision
    return DEFAULT_TOLERANCES.get(kind, DEFAULT_TOLERANCES["fp32"])


# ---------------------------------------------------------------------------------------------
# The reference, as a Polygraphy runner
# ---------------------------------------------------------------------------------------------
def load_reference(checkpoint, manifest):
    """The PyTorch reference model for ``checkpoint``, checked to be the one ``manifest`` was exported from."""
    from . import arch
    from .checkpoint import load_checkpoint

    ck = load_checkpoint(checkpoint)
    spec = arch.get(ck.version)
    cfg = spec.config_from_weights(ck.weights, ck.hf_config)
    got = (ck.version, cfg["n_layer"], cfg["n_embd"], cfg["vocab_size"])
    want = (manifest.architecture, manifest.n_layer, manifest.n_embd, manifest.vocab_size)
    if got != want:
        raise ValidationError(f"--reference {Path(checkpoint).name} is {got[0]} with {got[1]} layers, n_embd {got[2]}, "
                              f"vocab {got[3]}; the model is {want[0]} with {want[1]}, {want[2]}, {want[3]}: "
                              "not its checkpoint")
    return spec.Model.from_weights(ck.weights, cfg)


def reference_runner(model, manifest):
    """A Polygraphy runner (``BaseRunner``) that runs the PyTorch reference on ONNX-style feeds.

    Its inputs and outputs are named as the exported graph's (``tokens``, ``state.{i}.{field}`` ->
    ``logits``, ``new_state.{i}.{field}``), so Polygraphy compares the two output by output.
    """
    import torch
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    seq = manifest.graph == "sequence"
    last_only = seq and not manifest.options.get("all_logits")

    class TorchReferenceRunner(BaseRunner):
        def __init__(self):
            super().__init__(name=REFERENCE_RUNNER)

        def get_input_metadata_impl(self):
            meta = TensorMetadata()
            meta.add(manifest.tokens_input, np.int64, ["batch", "T"] if seq else ["batch"])
            for s in manifest.state:
                meta.add(s.name, np.float32, list(s.shape))
            return meta

        def infer_impl(self, feed_dict):
            start = time.perf_counter()
            tokens = torch.from_numpy(np.asarray(feed_dict[manifest.tokens_input], dtype=np.int64))
            state = {s.name: torch.from_numpy(np.asarray(feed_dict[s.name], dtype=np.float32)) for s in manifest.state}
            with torch.no_grad():
                logits, new = model.sequence(tokens, state) if seq else model.step(tokens, state)
            if last_only:
                logits = logits[:, -1]
            out = OrderedDict([(manifest.logits_output, logits.float().numpy().copy())])
            for s in manifest.state:
                out[s.output] = new[s.name].float().numpy().copy()
            self.inference_time = time.perf_counter() - start
            return out

    return TorchReferenceRunner()


# ---------------------------------------------------------------------------------------------
# The exported model, as a Polygraphy runner
# ---------------------------------------------------------------------------------------------
def backend_runner(target: Target, backend: str, plugins=(), chunk: int = DEFAULT_CHUNK):
    if backend == "onnxruntime":
        return _onnxrt_runner(target)
    if backend == "tensorrt":
        return _trt_runner(target, plugins, chunk)
    raise ValidationError(f"--backend must be onnxruntime or tensorrt, not {backend!r}")


def _onnxrt_runner(target: Target):
    import onnxruntime as ort
    from polygraphy.backend.onnxrt import OnnxrtRunner

    if target.is_engine:
        raise ValidationError(f"{target.path.name} is a TensorRT engine: use --backend tensorrt")
    if target.manifest.precision == "bf16":
        raise ValidationError(f"{target.path.name} is a bfloat16 export: onnxruntime's CPU provider has no bfloat16 "
                              "MatMul; validate it with --backend tensorrt")
    try:
        # our own session: plugin-mode graphs run as they are (their rwkv:: nodes are model-local functions)
        sess = ort.InferenceSession(str(target.path), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ValidationError(f"{target.path.name}: onnxruntime could not load it ({str(e).splitlines()[0][:160]})") \
            from None
    return OnnxrtRunner(sess, name=f"onnxrt-{target.path.name}")


def require_tensorrt():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        raise BackendUnavailable("--backend tensorrt needs TensorRT's Python package: pip install tensorrt "
                                 "(NVIDIA's wheels, with a CUDA GPU), or pip install 'rwkv-export[tensorrt]'") from None


def _trt_runner(target: Target, plugins, chunk: int):
    """TensorRT through Polygraphy's documented loaders. Written against the API; not run here."""
    require_tensorrt()
    from polygraphy.backend.trt import TrtRunner

    libs = [str(p) for p in plugins] or list(target.plugins)
    if not libs and target.manifest.wkv == "plugin":
        from .targets.tensorrt.plugin import find_plugin

        found = find_plugin()
        if found is None:
            raise ValidationError(f"{target.path.name} is a plugin-mode export: pass --plugin with the TensorRT plugin "
                                  "library (or build it, or set RWKV_TRT_PLUGIN)")
        libs = [str(found)]
    for lib in libs:
        if not Path(lib).is_file():
            raise ValidationError(f"--plugin {lib}: no such file")
    # Registered here, TensorRT already imported: Polygraphy's LoadPlugins only dlopens, which registers
    # nothing for librwkv_trt_plugins.so (docs/validation.md); its dlopen afterwards is then a no-op.
    import tensorrt

    from .targets.tensorrt.polygraphy_run import register_plugins

    register_plugins(tensorrt, libs)
    # build once (plugins loaded first); the runner reuses the engine for both checks
    engine = trt_engine_loader(target, libs, chunk)()
    return TrtRunner(engine, name=f"trt-{target.path.name}")


def trt_engine_loader(target: Target, libs: list, chunk: int):
    """The lazy Polygraphy loader of the engine: plugins first, then the engine from its bytes, or
    built from the ONNX file (batch 1; a sequence graph takes 1..chunk tokens per call)."""
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import (CreateConfig, EngineFromBytes, EngineFromNetwork, LoadPlugins,
                                        NetworkFromOnnxPath)

    if target.is_engine:
        loader = EngineFromBytes(BytesFromPath(str(target.path)))
    else:
        # TensorRT 11 builds strongly typed networks only: precision comes from the ONNX types
        # (no fp16=True: that builder flag is gone)
        loader = EngineFromNetwork(NetworkFromOnnxPath(str(target.path), strongly_typed=True),
                                   config=CreateConfig(profiles=[trt_profile(target.manifest, chunk)]))
    return LoadPlugins(plugins=list(libs), obj=loader)


def trt_profile(man, chunk: int):
    """The optimisation profile of a graph: batch 1, the state at its shapes, and 1..chunk tokens per
    call for a sequence graph (Polygraphy's ``Profile``)."""
    from polygraphy.backend.trt import Profile

    tok_min, tok_opt = ([1, 1], [1, chunk]) if man.graph == "sequence" else ([1], [1])
    profile = Profile().add(man.tokens_input, tok_min, tok_opt, tok_opt)
    for s in man.state:
        shape = list(s.concrete_shape(1))
        profile.add(s.name, shape, shape, shape)
    return profile


# ---------------------------------------------------------------------------------------------
# The rollout
# ---------------------------------------------------------------------------------------------
@dataclass
class Rollout:
    ids: list  # every token, prompt then greedy continuation
    n_prompt: int
    pieces: list  # the tokens of each call: [t] for the step graph, chunks for the sequence graph
    feeds: list = field(default_factory=list)  # teacher-forced feeds, one per piece


def _tokenizer(target: Target):
    from rwkv_runtime.tokenizers import make_tokenizer

    return make_tokenizer(target.manifest.tokenizer, target.tokenizer_json)


def prompt_ids(target: Target, prompt: str | None, tokens: str | None) -> list:
    if prompt is not None and tokens is not None:
        raise ValidationError("give --prompt or --tokens, not both")
    vocab = target.manifest.vocab_size
    if tokens is not None:
        try:
            ids = [int(t) for t in tokens.replace(",", " ").split()]
        except ValueError:
            raise ValidationError(f"--tokens must be token ids separated by commas, not {tokens!r}") from None
    elif prompt is not None:
        try:
            ids = list(_tokenizer(target).encode(prompt))
        except RuntimeUserError as e:
            raise ValidationError(f"--prompt: {e}; use --tokens") from None
    else:
        ids = [0]  # the end-of-text token RWKV models start documents with
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad or not ids:
        raise ValidationError(f"token ids must be in 0..{vocab - 1} (got {bad[:4] or 'none'})")
    return ids


def _start_state(ref, target: Target) -> dict:
    import torch

    st = ref.new_state(1)
    for k, v in target.initial.items():
        st[k] = torch.from_numpy(np.asarray(v, dtype=np.float32)[:1].copy())
    return st


def make_rollout(ref, target: Target, ids: list, steps: int, chunk: int) -> Rollout:
    """Continue ``ids`` greedily with the reference to ``steps`` tokens, then build the
    teacher-forced feeds: each holds the call's token(s) and the reference's state before them."""
    import torch

    man = target.manifest
    seq = man.graph == "sequence"
    n_prompt = len(ids)
    ids = list(ids)
    with torch.no_grad():
        st = _start_state(ref, target)
        for t in ids[:-1]:
            _, st = ref.step(torch.tensor([t]), st)
        while len(ids) < steps:
            logits, st = ref.step(torch.tensor([ids[-1]]), st)
            ids.append(int(logits[0].argmax()))
        pieces = [ids[i:i + chunk] for i in range(0, len(ids), chunk)] if seq else [[t] for t in ids]
        roll = Rollout(ids, n_prompt, pieces)
        st = _start_state(ref, target)
        for piece in pieces:
            tokens = np.array([piece] if seq else piece, dtype=np.int64)
            feed = OrderedDict([(man.tokens_input, tokens)])
            for s in man.state:
                feed[s.name] = st[s.name].numpy().astype(np.float32, copy=True)
            roll.feeds.append(feed)
            t = torch.from_numpy(tokens)
            _, st = ref.sequence(t, st) if seq else ref.step(t, st)
    return roll


def free_run(runner, target: Target, roll: Rollout) -> list:
    """The export fed back its own state: one output dict per call (copies)."""
    man = target.manifest
    state = OrderedDict((name, arr) for name, arr in roll.feeds[0].items() if name != man.tokens_input)
    outs = []
    with runner:
        for feed in roll.feeds:
            f = OrderedDict([(man.tokens_input, feed[man.tokens_input])])
            f.update(state)
            out = runner.infer(f)
            out = OrderedDict((k, np.array(v, copy=True)) for k, v in out.items())
            outs.append(out)
            state = OrderedDict((s.name, np.ascontiguousarray(out[s.output], dtype=np.float32)) for s in man.state)
    return outs


# ---------------------------------------------------------------------------------------------
# Errors, by Polygraphy's rule
# ---------------------------------------------------------------------------------------------
@dataclass
class Err:
    """The largest absolute and relative errors and the share of the tolerance used (max over
    elements of min(abs/atol, rel/rtol); Polygraphy fails an element exactly when it is > 1)."""

    abs: float = 0.0
    rel: float = 0.0
    used: float = 0.0

    def merge(self, other: "Err") -> "Err":
        return Err(max(self.abs, other.abs), max(self.rel, other.rel), max(self.used, other.used))


def error_of(export: np.ndarray, ref: np.ndarray, atol: float, rtol: float) -> Err:
    e = np.asarray(export, dtype=np.float64)
    r = np.asarray(ref, dtype=np.float64)
    if e.shape != r.shape:
        return Err(math.inf, math.inf, math.inf)
    d = np.abs(e - r)
    d = np.where(np.isnan(d), np.inf, d)
    rel = d / np.where(r == 0, _EPS, np.abs(r))
    with np.errstate(divide="ignore", invalid="ignore"):
        a_share = d / atol if atol > 0 else np.where(d > 0, np.inf, 0.0)
        r_share = rel / rtol if rtol > 0 else np.where(rel > 0, np.inf, 0.0)
    used = np.minimum(a_share, r_share)
    return Err(float(d.max(initial=0.0)), float(rel.max(initial=0.0)), float(used.max(initial=0.0)))


def _group(output: str, man) -> str:
    return man.logits_output if output == man.logits_output else output.rsplit(".", 1)[-1]


def _argmax_agree(export: np.ndarray, ref: np.ndarray) -> tuple:
    a, b = np.asarray(export).argmax(-1), np.asarray(ref).argmax(-1)
    return int(np.sum(a == b)), int(a.size)


@dataclass
class StepRow:
    step: int
    groups: dict  # group -> Err
    agree: tuple  # (agreeing positions, positions)
    passed: bool
    failed_outputs: list


def compare(export_run, ref_run, target: Target, atol: float, rtol: float, outputs=None):
    """Polygraphy's verdict (``Comparator.compare_accuracy``, export first so that relative errors
    are relative to the reference, as in ``polygraphy run --load-outputs``) plus per-step rows.
    ``export_run``/``ref_run``: (runner name, [outputs of each iteration])."""
    from polygraphy.comparator import Comparator, RunResults

    try:
        from polygraphy.comparator import SimpleCompareFunc

        func = SimpleCompareFunc(atol=atol, rtol=rtol)
    except ImportError:  # Polygraphy before SimpleCompareFunc
        from polygraphy.comparator import CompareFunc

        func = CompareFunc.simple(atol=atol, rtol=rtol)
    man = target.manifest
    names = outputs or [man.logits_output] + [s.output for s in man.state]
    results = RunResults()
    for name, iters in (export_run, ref_run):
        results.add([OrderedDict((n, it[n]) for n in names) for it in iters], runner_name=name)
    return _rows(Comparator.compare_accuracy(results, compare_func=func), export_run[1], ref_run[1], names,
                 target, atol, rtol)


def _rows(accuracy, exp_iters, ref_iters, names, target: Target, atol, rtol) -> tuple:
    verdicts = next(iter(accuracy[0].values()))  # the one runner pair: [iteration] -> {output: result}
    man = target.manifest
    rows = []
    for i, (e, r, v) in enumerate(zip(exp_iters, ref_iters, verdicts)):
        groups: dict = OrderedDict()
        for n in names:
            g = _group(n, man)
            groups[g] = groups.get(g, Err()).merge(error_of(e[n], r[n], atol, rtol))
        failed = [n for n in names if not bool(v[n])]
        rows.append(StepRow(i, groups, _argmax_agree(e[man.logits_output], r[man.logits_output]),
                            not failed, failed))
    return bool(accuracy), rows


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------
def _g(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.2e}"


def _token_label(roll: Rollout, i: int, seq: bool) -> str:
    if not seq:
        return str(roll.ids[i])
    start = sum(len(p) for p in roll.pieces[:i])
    return f"{start}-{start + len(roll.pieces[i]) - 1}"


def _pct(x: float) -> str:
    if math.isinf(x):
        return "inf"
    return "<0.01%" if x < 1e-4 else f"{100 * x:.3g}%"


def _step_table(rows: list, roll: Rollout, seq: bool, verdict_groups: list, state_groups: list) -> list:
    """One line per step: logits errors and argmax, the share of the tolerance used by the outputs
    that decide (``verdict_groups``), and the largest state error with the field it is in."""
    head = (f"{'step':>5} {'positions' if seq else 'token':>9}  {'logits abs':>10} {'rel':>9} {'argmax':>7} "
            f"{'tol used':>9}  {'state abs':>10}  worst field")
    lines = [head]
    for row in rows:
        lg = row.groups[roll_logits(row)]
        ok, n = row.agree
        agree = "same" if ok == n else f"{ok}/{n}"
        used = max(row.groups[g].used for g in verdict_groups)
        worst = max(state_groups, key=lambda g: row.groups[g].abs)
        lines.append(f"{row.step:>5} {_token_label(roll, row.step, seq):>9}  {_g(lg.abs):>10} {_g(lg.rel):>9} "
                     f"{agree:>7} {_pct(used):>9}  {_g(row.groups[worst].abs):>10}  {worst:<11}"
                     + ("" if row.passed else "FAIL"))
    return _condense(lines)


def roll_logits(row: StepRow) -> str:
    return next(iter(row.groups))  # logits come first


def _condense(lines: list, head: int = 12, tail: int = 4) -> list:
    """The header, first and last rows and every failing row: readable for long rollouts."""
    body = lines[1:]
    if len(body) <= 48:
        return lines
    keep = set(range(head)) | set(range(len(body) - tail, len(body)))
    fails = [i for i, r in enumerate(body) if r.endswith("FAIL")]
    keep |= set(fails[:20])
    out, prev = [lines[0]], -1
    for i in sorted(keep):
        if i != prev + 1:
            out.append(f"{'...':>5}")
        out.append(body[i])
        prev = i
    return out


def _group_table(rows: list, groups: list, man) -> list:
    lines = [f"{'output':<15} {'max abs':>10} {'max rel':>9} {'tol used':>9}  first bad step"]
    n_layers = man.n_layer
    for g in groups:
        err = Err()
        first = None
        for row in rows:
            err = err.merge(row.groups[g])
            if first is None and row.groups[g].used > 1:
                first = row.step
        label = g if g == man.logits_output else f"{g} (x{n_layers})"
        lines.append(f"{label:<15} {_g(err.abs):>10} {_g(err.rel):>9} {_pct(err.used):>9}  "
                     f"{'-' if first is None else first}")
    return lines


@dataclass
class Report:
    passed: bool
    teacher_forced_first_bad: int | None
    free_running_first_bad: int | None
    lines: list

    @property
    def first_bad_step(self) -> int | None:
        bad = [s for s in (self.teacher_forced_first_bad, self.free_running_first_bad) if s is not None]
        return min(bad) if bad else None


def validate(model, reference, backend: str = "onnxruntime", graph: str | None = None, steps: int = DEFAULT_STEPS,
             prompt: str | None = None, tokens: str | None = None, atol: float | None = None,
             rtol: float | None = None, chunk: int = DEFAULT_CHUNK, save_inputs=None, save_outputs=None,
             plugins=(), onnx_path=None, echo=print) -> Report:
    """Run both checks, print the report through ``echo`` and return it."""
    from polygraphy.comparator import Comparator, RunResults
    from polygraphy.exception import PolygraphyException
    from polygraphy.json import save_json
    from polygraphy.logger import G_LOGGER

    if steps < 1:
        raise ValidationError(f"--steps must be at least 1, not {steps}")
    if chunk < 1:
        raise ValidationError(f"--chunk must be at least 1, not {chunk}")
    target = load_target(model, graph, onnx_path)
    man = target.manifest
    read = _input_files(model, target, reference, onnx_path, plugins)
    _check_save_paths({"--save-inputs": save_inputs, "--save-outputs": save_outputs}, read)
    if target.is_engine:
        backend = "tensorrt"
    if backend == "tensorrt":
        require_tensorrt()
    d_atol, d_rtol = default_tolerances(man)
    atol = d_atol if atol is None else float(atol)
    rtol = d_rtol if rtol is None else float(rtol)
    if atol < 0 or rtol < 0:
        raise ValidationError("--atol and --rtol must not be negative")
    ids = prompt_ids(target, prompt, tokens)
    ref = load_reference(reference, man)
    seq = man.graph == "sequence"
    # a sequence graph is compared once per call (its logits at the call's last token): --steps counts
    # calls there, so that `--steps 4` checks 4 steps on either graph (it used to be 4 tokens: one call)
    roll = make_rollout(ref, target, ids, max(steps * chunk if seq else steps, len(ids)), chunk)

    out = []

    def say(line=""):
        line = line.rstrip()
        out.append(line)
        echo(line)

    def say_all(lines):
        for line in lines:
            say(line)

    prec = man.precision + (f" {man.options['quantize']}" if man.options.get("quantize") else "")
    say(f"validating {target.path.name}: {man.architecture} {man.graph} graph, {prec}, wkv {man.wkv}, backend {backend}")
    say(f"reference: {Path(reference).name} (PyTorch, float32)")
    source = "the prompt" if prompt is not None or tokens is not None else "the start token"
    more = len(roll.ids) - roll.n_prompt
    say(f"rollout: {len(roll.ids)} tokens ({roll.n_prompt} from {source}"
        + (f", {more} the reference's greedy continuation)" if more else ")")
        + (f", fed {chunk} per call: {len(roll.pieces)} calls" if seq else ""))
    say(f"tolerance (Polygraphy's rule): an element fails when |err| > {atol:g} and |err|/|ref| > {rtol:g}")

    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):  # our report says it all; failures still raise
        try:
            runner = backend_runner(target, backend, plugins, chunk)
            # 1. teacher-forced: Polygraphy's Comparator over the reference rollout
            results = Comparator.run([runner, reference_runner(ref, man)], data_loader=roll.feeds)
            tf_ok, tf_rows = compare(results[0], results[1], target, atol, rtol)
            # 2. free-running: the export fed back its own state; its logits against the reference's
            fr_outs = free_run(runner, target, roll)
            fr_ok, fr_rows = compare((FREE_RUNNING_RUNNER, fr_outs), results[1], target, atol, rtol,
                                     outputs=[man.logits_output])
            if save_inputs:
                _save_atomically(save_inputs, lambda dest: save_json(roll.feeds, dest,
                                                                     description="rwkv-export validate: rollout feeds"),
                                 read)
            if save_outputs:
                only_ref = RunResults()
                only_ref.append(results[1])  # the reference's outputs alone, as polygraphy --load-outputs reads them
                _save_atomically(save_outputs, only_ref.save, read)
        except PolygraphyException as e:
            raise ValidationError(f"Polygraphy: {(str(e).strip().splitlines() or ['failed'])[0][:200]}") from None
    # free-running state drift, for information (the verdict is on the logits)
    for row, e_out, r_out in zip(fr_rows, fr_outs, results[1][1]):
        for s in man.state:
            g = _group(s.output, man)
            row.groups[g] = row.groups.get(g, Err()).merge(error_of(e_out[s.output], r_out[s.output], atol, rtol))

    state_groups = list(OrderedDict.fromkeys(_group(s.output, man) for s in man.state))
    tf_bad = next((r.step for r in tf_rows if not r.passed), None)
    fr_bad = next((r.step for r in fr_rows if not r.passed), None)

    say("")
    say(f"1. teacher-forced: every step starts from the reference's state (Polygraphy Comparator, "
        f"{runner.name} vs {REFERENCE_RUNNER})")
    say_all("  " + line for line in _step_table(tf_rows, roll, seq, [man.logits_output] + state_groups, state_groups))
    say("  per output group, over all steps (state fields over all layers):")
    say_all("  " + line for line in _group_table(tf_rows, [man.logits_output] + state_groups, man))
    agree = sum(r.agree[0] for r in tf_rows), sum(r.agree[1] for r in tf_rows)
    say(f"  logits argmax agreement: {agree[0]}/{agree[1]}; "
        + ("all steps within tolerance" if tf_bad is None else
           f"first bad step: {tf_bad} ({', '.join(_short(tf_rows[tf_bad].failed_outputs))})"))

    say("")
    say("2. free-running: the export fed back its own state, its logits compared with the reference's rollout "
        "(state drift shown for information)")
    say_all("  " + line for line in _step_table(fr_rows, roll, seq, [man.logits_output], state_groups))
    agree = sum(r.agree[0] for r in fr_rows), sum(r.agree[1] for r in fr_rows)
    say(f"  logits argmax agreement: {agree[0]}/{agree[1]}; "
        + ("all steps within tolerance" if fr_bad is None else f"first bad step: {fr_bad}"))

    if save_inputs and save_outputs:
        say("")
        say("reproduce the teacher-forced check with Polygraphy alone:")
        say("  " + polygraphy_command(target, backend, save_inputs, save_outputs, atol, rtol, plugins, chunk))

    passed = tf_ok and fr_ok and tf_bad is None and fr_bad is None
    say("")
    if passed:
        calls = f" (calls of the sequence graph, {chunk} tokens each)" if seq else ""
        say(f"PASS: {len(tf_rows)} teacher-forced and {len(fr_rows)} free-running steps{calls} within tolerance")
    elif tf_bad is None and fr_bad is None:
        say("FAIL: Polygraphy's comparison failed, though no single step did")
    else:
        parts = [f"{what} step {step}" for what, step in (("teacher-forced", tf_bad), ("free-running", fr_bad))
                 if step is not None]
        first = min(step for step in (tf_bad, fr_bad) if step is not None)
        say(f"FAIL: the export differs from the reference; first bad step: {first} ({', '.join(parts)})")
    return Report(passed, tf_bad, fr_bad, out)


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
        raise ValidationError(f"{dest}: cannot write it ({e.strerror or type(e).__name__}); "
                              "an existing file was left unchanged") from None


def _short(names: list, n: int = 4) -> list:
    return names[:n] + ([f"{len(names) - n} more"] if len(names) > n else [])


def polygraphy_command(target: Target, backend: str, save_inputs, save_outputs, atol, rtol, plugins=(),
                       chunk: int = DEFAULT_CHUNK) -> str:
    """The ``polygraphy run`` line that repeats the teacher-forced check from the saved files."""
    tail = f"--load-inputs {save_inputs} --load-outputs {save_outputs} --atol {atol:g} --rtol {rtol:g}"
    if backend == "onnxruntime":
        return f"polygraphy run {target.path} --onnxrt {tail}"
    libs = list(plugins) or list(target.plugins)
    if not libs and target.manifest.wkv == "plugin":
        from .targets.tensorrt.plugin import find_plugin

        libs = [find_plugin() or "librwkv_trt_plugins.so"]
    # with plugins, Polygraphy through our wrapper: it imports TensorRT before the libraries load
    prog = "python -m rwkv_export.targets.tensorrt.polygraphy_run run" if libs else "polygraphy run"
    cmd = f"{prog} {target.path} --trt" + ("" if target.is_engine else " --strongly-typed")
    if target.is_engine:
        cmd = f"{prog} {target.path} --model-type engine --trt"
    if libs:
        cmd += " --plugins " + " ".join(str(p) for p in libs)
    if target.manifest.graph == "sequence" and not target.is_engine:
        t = target.manifest.tokens_input
        cmd += f" --trt-min-shapes {t}:[1,1] --trt-opt-shapes {t}:[1,{chunk}] --trt-max-shapes {t}:[1,{chunk}]"
    return f"{cmd} {tail}"


# ---------------------------------------------------------------------------------------------
@click.command("validate")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--reference", required=True, type=click.Path(path_type=Path),
              help="The checkpoint MODEL was exported from (run in PyTorch, float32).")
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True,
              help="What runs the export (a .engine MODEL implies tensorrt).")
@click.option("--graph", type=click.Choice(["step", "sequence"]), default=None,
              help="Which graph of the export to check (default: the one MODEL is; the other is found beside it).")
@click.option("--steps", default=DEFAULT_STEPS, show_default=True, type=click.IntRange(1),
              help="Steps checked: tokens of the rollout for a step graph, calls of --chunk tokens for a sequence "
                   "graph (the rollout: the prompt, then the reference's greedy continuation).")
@click.option("--prompt", default=None, help="Start of the rollout, encoded with the model's tokenizer "
              "(default: the start token 0).")
@click.option("--tokens", default=None, help="Start of the rollout as token ids (1,2,3), instead of --prompt.")
@click.option("--atol", type=click.FloatRange(0), default=None,
              help="Absolute tolerance (default by precision: fp32 1e-4, fp16 5e-2, ...).")
@click.option("--rtol", type=click.FloatRange(0), default=None,
              help="Relative tolerance (default by precision: fp32 1e-3, fp16 5e-2, ...).")
@click.option("--chunk", default=DEFAULT_CHUNK, show_default=True, type=click.IntRange(1),
              help="Sequence graph: tokens per call.")
@click.option("--save-inputs", type=click.Path(path_type=Path), default=None,
              help="Write the rollout's feeds as Polygraphy JSON (for polygraphy run --load-inputs).")
@click.option("--save-outputs", type=click.Path(path_type=Path), default=None,
              help="Write the reference's outputs as Polygraphy RunResults (for polygraphy run --load-outputs).")
@click.option("--plugin", "plugins", multiple=True, type=click.Path(path_type=Path),
              help="TensorRT plugin library (default for plugin-mode exports: the built one).")
@click.option("--onnx", "onnx_path", type=click.Path(path_type=Path), default=None,
              help="For a TensorRT engine: the ONNX file it was built from (its manifest; default: beside it).")
def validate_command(model, reference, backend, graph, steps, prompt, tokens, atol, rtol, chunk, save_inputs,
                     save_outputs, plugins, onnx_path):
    """Check exported MODEL against the PyTorch reference over a multi-step rollout (Polygraphy).

    Exits 1 when the export is wrong, naming the first step that broke tolerance.
    """
    from .errors import user_errors

    run = user_errors(lambda: validate(model, reference, backend, graph, steps, prompt, tokens, atol, rtol, chunk,
                                       save_inputs, save_outputs, plugins, onnx_path, echo=click.echo))
    if not run().passed:
        click.get_current_context().exit(1)
