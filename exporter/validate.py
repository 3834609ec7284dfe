"""``rwkv-export validate``: the export against the PyTorch reference, through Polygraphy.

Two checks over one multi-step rollout (one step from a fresh state proves little: RWKV's errors
accumulate in the state):

1. Teacher-forced, with Polygraphy's own machinery: the data loader is the reference rollout — feed i
   holds token(s) i and the *reference's* state before them — and ``Comparator.run`` runs a
   ``pytorch-reference`` runner (a Polygraphy ``BaseRunner`` around the torch model) and the backend
   runner (``OnnxrtRunner`` / ``TrtRunner``) on every feed; ``Comparator.compare_accuracy`` with
   ``CompareFunc.simple`` decides, and the per-step report is read from the same ``RunResults``.
   ``--save-inputs/--save-outputs`` write these feeds and the reference's outputs as Polygraphy JSON, so
   ``polygraphy run MODEL --onnxrt --load-inputs IN --load-outputs OUT`` repeats the check alone.
2. Free-running: the exported model fed back its own state, its logits compared step by step with
   the reference's own rollout (what a user actually gets).
"""
from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path

import click
import numpy as np

from rwkv_runtime.errors import BackendUnavailable, RuntimeUserError

REFERENCE_RUNNER = "pytorch-reference"
# default tolerances by precision: |export - reference| <= atol + rtol * |reference|
DEFAULT_TOL = {"fp32": (1e-3, 1e-3), "fp16": (5e-2, 5e-2), "bf16": (0.25, 0.1), "int8": (0.5, 0.1), "int4": (2.0, 0.3)}


# ---------------------------------------------------------------------------------------------
# The reference as a Polygraphy runner
# ---------------------------------------------------------------------------------------------
def reference_runner(model, manifest):
    """A Polygraphy runner that runs the PyTorch reference on ONNX-style feeds."""
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    import torch

    class TorchReferenceRunner(BaseRunner):
        def __init__(self):
            super().__init__(name=REFERENCE_RUNNER)

        def activate_impl(self):
            pass

        def deactivate_impl(self):
            pass

        def get_input_metadata_impl(self):
            meta = TensorMetadata()
            meta.add(manifest.tokens_input, np.int64, ["batch"] + (["T"] if manifest.graph == "sequence" else []))
            for s in manifest.state:
                meta.add(s.name, np.float32, s.shape)
            return meta

        def infer_impl(self, feed_dict):
            t0 = time.perf_counter()
            state = {s.name: torch.from_numpy(np.asarray(feed_dict[s.name], np.float32)) for s in manifest.state}
            tokens = torch.from_numpy(np.asarray(feed_dict[manifest.tokens_input], np.int64))
            with torch.no_grad():
                if manifest.graph == "sequence":
                    logits, new = model.sequence(tokens, state)
                    if not manifest.options.get("all_logits"):
                        logits = logits[:, -1]
                else:
                    logits, new = model.step(tokens, state)
            out = OrderedDict([(manifest.logits_output, logits.float().numpy())])
            for s in manifest.state:
                out[s.output] = new[s.name].float().numpy()
            self.inference_time = time.perf_counter() - t0
            return out

    return TorchReferenceRunner()


def backend_runner(model_path: Path, backend: str, plugins=()):
    if backend == "onnxruntime":
        import onnxruntime as ort
        from polygraphy.backend.onnxrt import OnnxrtRunner

        return OnnxrtRunner(ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]))
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        raise BackendUnavailable("--backend tensorrt needs TensorRT: pip install tensorrt "
                                 "(NVIDIA's wheels) or install the [tensorrt] extra") from None
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import (CreateConfig, EngineFromBytes, EngineFromNetwork, LoadPlugins,
                                        NetworkFromOnnxPath, TrtRunner)

    if not plugins:
        from .trt_plugin import find_plugin

        found = find_plugin()
        plugins = [str(found)] if found else []
    if model_path.suffix in (".engine", ".plan", ".trt"):
        engine = EngineFromBytes(BytesFromPath(str(model_path)))
    else:
        # TensorRT 11 builds only strongly typed networks: precision comes from the ONNX types
        engine = EngineFromNetwork(NetworkFromOnnxPath(str(model_path), strongly_typed=True), config=CreateConfig())
    return TrtRunner(LoadPlugins(plugins=list(plugins), obj=engine))


# ---------------------------------------------------------------------------------------------
# The rollout
# ---------------------------------------------------------------------------------------------
def rollout_tokens(model, manifest, tokenizer, prompt: str | None, steps: int) -> list:
    """The prompt's tokens, continued greedily by the reference to ``steps`` tokens in all."""
    import torch

    if prompt:
        ids = list(tokenizer.encode(prompt)) if tokenizer is not None else list(prompt.encode("utf-8"))
    else:
        ids = [0]
    ids = [i for i in ids if 0 <= i < manifest.vocab_size][:steps] or [0]
    st = model.new_state(1)
    with torch.no_grad():
        for t in ids[:-1]:
            _, st = model.step(torch.tensor([t]), st)
        tok = ids[-1]
        while len(ids) < steps:
            logits, st = model.step(torch.tensor([tok]), st)
            tok = int(logits[0].argmax())
            ids.append(tok)
    return ids


def teacher_forced_feeds(model, manifest, ids: list, chunk: int, initial: dict | None) -> list:
    """Feed dicts: token(s) i with the reference's state before them (the state fed back)."""
    import torch

    st = model.new_state(1)
    if initial:
        st = {**st, **{k: torch.from_numpy(np.asarray(v[:1], np.float32)) for k, v in initial.items()}}
    feeds = []
    seq = manifest.graph == "sequence"
    pieces = [ids[i:i + chunk] for i in range(0, len(ids), chunk)] if seq else [[t] for t in ids]
    with torch.no_grad():
        for piece in pieces:
            tokens = np.array([piece] if seq else piece, dtype=np.int64)
            feed = OrderedDict([(manifest.tokens_input, tokens)])
            for s in manifest.state:
                feed[s.name] = st[s.name].numpy().astype(np.float32).copy()
            feeds.append(feed)
            t = torch.from_numpy(tokens)
            _, st = model.sequence(t, st) if seq else model.step(t, st)
    return feeds


def _err(a: np.ndarray, b: np.ndarray) -> tuple:
    """max |a-b| and max |a-b| / |b| (where |b| > 0)."""
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    denom = np.abs(b.astype(np.float64))
    rel = np.where(denom > 0, d / np.maximum(denom, 1e-30), 0.0)
    return float(d.max(initial=0.0)), float(rel.max(initial=0.0))


def _ok(a, b, atol, rtol) -> bool:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return bool(np.all(np.isfinite(a64)) and np.all(np.abs(a64 - b64) <= atol + rtol * np.abs(b64)))


def validate(model_path, reference, backend: str = "onnxruntime", steps: int = 32, prompt: str | None = None,
             atol: float | None = None, rtol: float | None = None, chunk: int = 8, save_inputs=None,
             save_outputs=None, plugins=(), echo=print) -> bool:
    """Run both checks and print the report; True when the export is right."""
    from polygraphy.comparator import Comparator, CompareFunc
    from polygraphy.json import save_json
    from polygraphy.logger import G_LOGGER

    import rwkv_runtime
    from rwkv_runtime.session import read_manifest

    from .export import reference_model

    model_path = Path(model_path)
    if model_path.suffix in (".engine", ".plan", ".trt"):
        from rwkv_runtime.trt_backend import read_engine_manifest

        manifest, _ = read_engine_manifest(model_path)
        backend = "tensorrt"
    else:
        manifest, _ = read_manifest(model_path)
    if steps < 1:
        raise RuntimeUserError(f"--steps must be >= 1, not {steps}")
    prec = manifest.options.get("quantize") or manifest.precision
    d_atol, d_rtol = DEFAULT_TOL.get(prec, DEFAULT_TOL["fp32"])
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol

    ref = reference_model(reference)
    got = (ref.cfg["n_layer"], ref.cfg["n_embd"], ref.cfg["vocab_size"])
    if got != (manifest.n_layer, manifest.n_embd, manifest.vocab_size):
        raise RuntimeUserError(f"--reference {reference} has {got[0]} layers, n_embd {got[1]}, vocab {got[2]}; the "
                               f"model has {manifest.n_layer}, {manifest.n_embd}, {manifest.vocab_size}: not its checkpoint")
    session = rwkv_runtime.Session(model_path)
    try:
        tokenizer = session.tokenizer
    except RuntimeUserError:
        tokenizer = None
    ids = rollout_tokens(ref, manifest, tokenizer, prompt, steps)
    initial = session._initial or None
    feeds = teacher_forced_feeds(ref, manifest, ids, chunk, initial)

    echo(f"validating {model_path.name}: {manifest.architecture} {manifest.graph} graph, {manifest.precision}"
         f"{' ' + manifest.options['quantize'] if manifest.options.get('quantize') else ''}, wkv {manifest.wkv}, "
         f"backend {backend}")
    echo(f"reference: {Path(reference).name} (PyTorch, float32); rollout of {len(ids)} tokens "
         f"({'prompt ' + repr(prompt) + ', ' if prompt else ''}continued greedily by the reference); "
         f"tolerance |err| <= {atol:g} + {rtol:g}*|ref|")

    # 1. teacher-forced, through Polygraphy
    G_LOGGER.module_severity = G_LOGGER.ERROR
    runners = [reference_runner(ref, manifest), backend_runner(model_path, backend, plugins)]
    results = Comparator.run(runners, data_loader=feeds)
    accuracy = Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(atol=atol, rtol=rtol))
    poly_ok = bool(accuracy)
    ref_iters, exp_iters = results[0][1], results[1][1]
    if save_inputs:
        save_json(feeds, str(save_inputs), description="rwkv-export validate rollout inputs")
    if save_outputs:
        from polygraphy.comparator import RunResults

        only_ref = RunResults()
        only_ref.add([OrderedDict((k, v) for k, v in it.items()) for it in ref_iters], runner_name=REFERENCE_RUNNER)
        only_ref.save(str(save_outputs))

    state_fields = sorted({s.output.split(".")[-1] for s in manifest.state})
    echo("")
    echo("teacher-forced (Polygraphy Comparator: pytorch-reference vs "
         f"{runners[1].name.split('-')[0]}; each step starts from the reference's state)")
    header = f"{'step':>5} {'logits abs':>11} {'rel':>9} {'argmax':>7}" + "".join(f" {f:>11}" for f in state_fields) + "  ok"
    echo(header)
    first_bad_tf = None
    rows = []
    for i, (r, e) in enumerate(zip(ref_iters, exp_iters)):
        la, lr = _err(e[manifest.logits_output], r[manifest.logits_output])
        agree = bool(np.all(e[manifest.logits_output].argmax(-1) == r[manifest.logits_output].argmax(-1)))
        per_field = {}
        ok = _ok(e[manifest.logits_output], r[manifest.logits_output], atol, rtol)
        for s in manifest.state:
            f = s.output.split(".")[-1]
            a, _ = _err(e[s.output], r[s.output])
            per_field[f] = max(per_field.get(f, 0.0), a)
            ok = ok and _ok(e[s.output], r[s.output], atol, rtol)
        if not ok and first_bad_tf is None:
            first_bad_tf = i
        rows.append(f"{i:>5} {la:>11.3g} {lr:>9.2g} {'yes' if agree else 'NO':>7}"
                    + "".join(f" {per_field[f]:>11.3g}" for f in state_fields) + ("  ok" if ok else "  FAIL"))
    for line in _condense(rows):
        echo(line)

    # 2. free-running: each side feeds back its own state
    import torch

    rs = ref.new_state(1)
    if initial:
        rs = {**rs, **{k: torch.from_numpy(np.asarray(v[:1], np.float32)) for k, v in initial.items()}}
    ms = None
    worst, first_bad_fr, agree_n = 0.0, None, 0
    with torch.no_grad():
        for i, t in enumerate(ids):
            rl, rs = ref.step(torch.tensor([t]), rs)
            ml, ms = session.step(np.array([t]), ms)
            rl = rl.numpy()
            a, _ = _err(ml, rl)
            worst = max(worst, a)
            agree_n += int(ml.argmax() == rl.argmax())
            if first_bad_fr is None and not _ok(ml, rl, atol, rtol):
                first_bad_fr = i
    echo("")
    echo(f"free-running ({len(ids)} steps, each side feeds back its own state): max logits error {worst:.3g}, "
         f"argmax agreement {agree_n}/{len(ids)}"
         + (f", first step out of tolerance: {first_bad_fr}" if first_bad_fr is not None else ""))
    ok = poly_ok and first_bad_tf is None and first_bad_fr is None
    echo("")
    if ok:
        echo(f"PASS: {len(feeds)} teacher-forced steps and {len(ids)} free-running steps within tolerance")
    else:
        bad = [f"teacher-forced step {first_bad_tf}" if first_bad_tf is not None else "",
               f"free-running step {first_bad_fr}" if first_bad_fr is not None else ""]
        echo(f"FAIL: the export differs from the reference; first bad step: {', '.join(b for b in bad if b)}")
    if save_inputs or save_outputs:
        echo("reproduce with Polygraphy alone:")
        echo(f"  polygraphy run {model_path} --onnxrt --load-inputs {save_inputs} --load-outputs {save_outputs} "
             f"--atol {atol:g} --rtol {rtol:g}")
    return ok


def _condense(rows: list, head: int = 12, tail: int = 4) -> list:
    """All rows that failed, plus the first and last few: readable for long rollouts."""
    if len(rows) <= head + tail:
        return rows
    keep = set(range(head)) | set(range(len(rows) - tail, len(rows))) | {i for i, r in enumerate(rows) if r.endswith("FAIL")}
    out, prev = [], -1
    for i in sorted(keep):
        if i != prev + 1:
            out.append(f"{'...':>5}")
        out.append(rows[i])
        prev = i
    return out


# ---------------------------------------------------------------------------------------------
@click.command("validate")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--reference", required=True, type=click.Path(path_type=Path), help="The checkpoint it was exported from.")
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True)
@click.option("--steps", default=32, show_default=True, type=int, help="Tokens in the rollout.")
@click.option("--prompt", default=None, help="Start of the rollout (then the reference continues greedily).")
@click.option("--atol", type=float, default=None, help="Absolute tolerance (default by precision; fp32: 1e-3).")
@click.option("--rtol", type=float, default=None, help="Relative tolerance (default by precision; fp32: 1e-3).")
@click.option("--chunk", default=8, show_default=True, type=click.IntRange(1), help="Sequence graph: tokens per feed.")
@click.option("--save-inputs", type=click.Path(path_type=Path), default=None, help="Polygraphy JSON of the feeds.")
@click.option("--save-outputs", type=click.Path(path_type=Path), default=None,
              help="Polygraphy RunResults JSON of the reference's outputs.")
@click.option("--plugin", "plugins", multiple=True, help="TensorRT plugin library (default: the built one).")
def validate_command(model, reference, backend, steps, prompt, atol, rtol, chunk, save_inputs, save_outputs, plugins):
    """Compare exported MODEL with the PyTorch reference over a multi-step rollout (Polygraphy)."""
    from .cli import run_user_errors

    ok = run_user_errors(lambda: validate(model, reference, backend, steps, prompt, atol, rtol, chunk, save_inputs,
                                          save_outputs, plugins, echo=click.echo))
    if not ok:
        raise SystemExit(1)
