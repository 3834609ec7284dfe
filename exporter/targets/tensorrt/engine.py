"""ONNX export -> TensorRT engine(s): ``rwkv-export build-engine``.

The network is strongly typed (TensorRT 11 knows no other kind; on 10 we ask for it): every tensor's
precision comes from the ONNX types the exporter wrote, and no fp16/int8 builder flags exist. TF32 is
off unless asked for, so a float32 export computes in float32. Each engine gets one optimization
profile (batch 1..max for the tokens and every state input; for the sequence graph also T 1..max-seq)
and a JSON sidecar ``MODEL.engine.json`` carrying the manifest, the tokenizer JSON, a learned initial
state and the plugin libraries the built network really uses: the runtime needs neither the ONNX file
nor onnx to run it. Files are staged in a temporary directory and moved into place only when every
engine is built.

Parsing, plugin registration, the profile and the build itself are ``loader.EngineLoader``'s, the one
engine loader ``validate --backend tensorrt`` uses too. After parsing, the plugin layers of the network
are counted, and only a network that contains some records plugin libraries in its sidecar.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import click

from rwkv_runtime.artifact import ENGINE_SUFFIXES, SIDECAR_FORMAT, SIDECAR_VERSION, sidecar_path
from rwkv_runtime.manifest import INITIAL_STATE_KEY, Manifest
from rwkv_runtime.safe_write import SafeWrite, check_not_inputs, write_file
from rwkv_runtime.tensorrt.loader import import_tensorrt, trt_logger

from ... import __version__
from ...cli_options import output_option, path_argument, path_option, plugin_option
from .loader import EngineBuildError, EngineLoader, Profile, custom_ops


@dataclass
class EngineOptions:
    max_batch: int = 8
    opt_batch: int = 1
    max_seq: int = 256  # the sequence graph's largest T (the runtime splits longer chunks)
    opt_seq: int | None = None  # None: min(128, max_seq)
    plugins: tuple = ()  # plugin libraries; empty: the built rwkv plugin when the model has plugin nodes
    timing_cache: Path | None = None
    workspace_mb: int | None = None
    optimization_level: int | None = None  # TensorRT's builder_optimization_level (default 3)
    tf32: bool = False
    companions: bool = True  # also build the other graphs of the export (model.seq.onnx -> model.seq.engine)


@dataclass
class _Graph:
    kind: str
    onnx: Path
    engine: Path
    manifest: Manifest
    tokenizer_json: str | None
    initial_state: str | None
    custom_ops: list  # [(op_type, version, namespace)] of non-standard nodes


# ---------------------------------------------------------------------------------------------
# Reading the export
# ---------------------------------------------------------------------------------------------
def _read_onnx(path: Path):
    """Manifest, tokenizer JSON, initial state and custom nodes of an export (weights not loaded)."""
    from rwkv_runtime.artifact import open_artifact

    if not path.is_file():
        raise EngineBuildError(f"{path}: no such file")
    art = open_artifact(path)  # the one artifact reader: the manifest validated against its schema
    return art.manifest, art.tokenizer_json, art.props.get(INITIAL_STATE_KEY), custom_ops(path)


def _companion_engine(out: Path, primary: str, kind: str) -> Path:
    """Engine name of a companion graph, mirroring the exporter's model.onnx / model.seq.onnx."""
    if primary == "step" and kind == "sequence":
        return out.with_name(out.stem + ".seq" + out.suffix)
    if primary == "sequence" and kind == "step":
        stem = out.stem[:-4] if out.stem.endswith(".seq") else out.stem + ".step"
        return out.with_name(stem + out.suffix)
    return out.with_name(f"{out.stem}.{kind}{out.suffix}")


def plan_graphs(model: Path, out: Path, companions: bool = True, echo=None) -> list:
    """The graphs to build: MODEL itself, then the companions present beside it."""
    man, tok, init, ops = _read_onnx(model)
    if man.options.get("quantize"):
        raise EngineBuildError(
            f"{model.name} is a {man.options['quantize']} export (onnxruntime's CPU "
            "quantised ops); TensorRT cannot build it: export without --quantize"
        )
    graphs = [_Graph(man.graph, model, out, man, tok, init, ops)]
    if companions:
        for kind, name in sorted(man.companions.items()):
            if kind == man.graph:
                continue
            p = model.with_name(name)
            if not p.is_file():
                if echo:
                    echo(f"note: the {kind} graph {name} is not beside {model.name}; building {man.graph} only")
                continue
            from rwkv_runtime.artifact import open_artifact

            open_artifact(model).companion(kind)  # of this export (same id and layout): refused before building
            cman, ctok, cinit, cops = _read_onnx(p)
            graphs.append(_Graph(cman.graph, p, _companion_engine(out, man.graph, kind), cman, ctok, cinit, cops))
    names = {g.kind: g.engine.name for g in graphs}
    for g in graphs:
        g.manifest.companions = dict(names)
    return graphs


# ---------------------------------------------------------------------------------------------
# TensorRT pieces
# ---------------------------------------------------------------------------------------------
def _progress_monitor(trt, echo, max_depth: int = 1):
    """TensorRT's IProgressMonitor (10.0+) printing phases down to ``max_depth``; None if absent."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

    class Monitor(base):
        def __init__(self):
            base.__init__(self)
            self.depth: dict = {}
            self.started: dict = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            try:
                d = self.depth.get(parent_phase, -1) + 1 if parent_phase else 0
                self.depth[phase_name], self.started[phase_name] = d, time.perf_counter()
                if d <= max_depth:
                    echo(f"{'  ' * (d + 1)}{phase_name}" + (f" ({num_steps} steps)" if num_steps > 1 else ""))
            except Exception:  # noqa: BLE001 - never raise into TensorRT
                pass

        def step_complete(self, phase_name, step):
            return True  # keep building (returning False cancels)

        def phase_finish(self, phase_name):
            try:
                d = self.depth.pop(phase_name, 99)
                t0 = self.started.pop(phase_name, None)
                if d == 0 and t0 is not None:
                    echo(f"  {phase_name}: done in {time.perf_counter() - t0:.1f} s")
            except Exception:  # noqa: BLE001
                pass

    return Monitor()


# ---------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------
def _check_options(model: Path, out: Path, opts: EngineOptions):
    if out.suffix not in ENGINE_SUFFIXES:
        raise EngineBuildError(
            f"-o {out.name}: an engine file name must end in {', '.join(ENGINE_SUFFIXES)} "
            "(that is how Session recognises it)"
        )
    if not model.is_file():
        raise EngineBuildError(f"{model}: no such file")
    if not out.parent.is_dir():
        raise EngineBuildError(f"output directory {out.parent} does not exist")
    if opts.max_batch < 1 or not 1 <= opts.opt_batch <= opts.max_batch:
        raise EngineBuildError(f"--opt-batch {opts.opt_batch} must be between 1 and --max-batch {opts.max_batch}")
    if opts.max_seq < 1 or (opts.opt_seq is not None and not 1 <= opts.opt_seq <= opts.max_seq):
        raise EngineBuildError(f"--opt-seq {opts.opt_seq} must be between 1 and --max-seq {opts.max_seq}")
    for p in opts.plugins:
        if not Path(p).is_file():
            raise EngineBuildError(f"--plugin {p}: no such file")
    if opts.timing_cache is not None and not Path(opts.timing_cache).parent.is_dir():
        raise EngineBuildError(f"--timing-cache {opts.timing_cache}: its directory does not exist")
    if opts.timing_cache is not None:
        # the cache is written after the engines: naming an output (or the model) would replace that file
        cache = Path(opts.timing_cache)
        taken = [
            out,
            sidecar_path(out),
            model,
            *(_companion_engine(out, g, k) for g in ("step", "sequence") for k in ("step", "sequence") if g != k),
        ]
        taken += [sidecar_path(t) for t in taken[3:]]
        for t in taken:
            same = cache.exists() and t.exists() and os.path.samefile(cache, t)
            if os.path.abspath(cache) == os.path.abspath(t) or same:
                raise EngineBuildError(
                    f"--timing-cache {cache}: is {t.name}, an input or output of this build; choose another file"
                )


def build_engine(model, out, options: EngineOptions | None = None, echo=None) -> list:
    """Build MODEL.onnx (and its companions) into TensorRT engines + sidecars; returns the engine paths.

    ``echo`` receives progress lines (None: silent)."""
    opts = options or EngineOptions()
    model, out = Path(model), Path(out)
    say = echo or (lambda msg: None)
    _check_options(model, out, opts)
    trt = import_tensorrt()  # one line saying what to install, before any work
    log = trt_logger(trt)
    saved_echo, log.echo = log.echo, ((lambda m: say(m)) if echo else None)
    try:
        return _build(trt, log, model, out, opts, say, echo is not None)
    finally:
        log.echo = saved_echo


def _build(trt, log, model: Path, out: Path, opts: EngineOptions, say, progress: bool) -> list:
    graphs = plan_graphs(model, out, opts.companions, say)
    loader = EngineLoader(opts.plugins, any(g.custom_ops for g in graphs), say)  # plugins before parsing
    plugins = loader.plugins
    # which graphs must come out with plugin layers (any of their custom nodes has a registered creator)
    expects = {id(g): loader.expects_plugin_layers(g.custom_ops, g.onnx.name) for g in graphs}
    profile = Profile(max_batch=opts.max_batch, opt_batch=opts.opt_batch, max_seq=opts.max_seq, opt_seq=opts.opt_seq)

    cache = [None]
    cache_path = Path(opts.timing_cache) if opts.timing_cache else None

    def configure(config):  # build-engine's own settings on top of the loader's
        if opts.workspace_mb:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(opts.workspace_mb) << 20)
        if opts.optimization_level is not None:
            config.builder_optimization_level = int(opts.optimization_level)
        if cache_path is not None:
            cache[0] = _attach_timing_cache(config, cache[0], cache_path, log, say)
        monitor = _progress_monitor(trt, say) if progress else None
        if monitor is not None:
            config.progress_monitor = monitor

    built = []
    # every file the build reads: no engine, sidecar or cache may replace one (safe_write refuses)
    inputs = [g.onnx for g in graphs] + [Path(p) for p in plugins]
    inputs += [g.onnx.parent / n for g in graphs for n in (g.manifest.options.get("weights_file"),) if n]
    # refused before the build (minutes on a GPU), not when its result is committed
    targets = [p for g in graphs for p in (g.engine, sidecar_path(g.engine))] + ([cache_path] if cache_path else [])
    check_not_inputs(targets, inputs)
    with SafeWrite(out, inputs=inputs) as sw:
        tmp = sw.dir
        for g in graphs:
            say(f"parsing {g.onnx.name} ({g.kind} graph, {g.manifest.precision}, wkv {g.manifest.wkv})")
            seq = f", T 1..{opts.max_seq}" if g.kind == "sequence" else ""
            say(f"building {g.engine.name}: batch 1..{opts.max_batch} (opt {opts.opt_batch}){seq}")
            t0 = time.perf_counter()
            b = loader.build(
                g.onnx, g.manifest, profile, expect_plugins=expects[id(g)], tf32=opts.tf32, configure=configure
            )
            staged = Path(tmp) / g.engine.name
            with open(staged, "wb") as f:
                f.write(b.serialized)
            # only a network with plugin layers needs (and records) the plugin libraries
            side = _sidecar(trt, g, opts, plugins if b.plugin_layers else [], b.shapes, b.plugin_layers)
            sidecar_path(staged).write_text(json.dumps(side, indent=1, sort_keys=True), encoding="utf-8")
            say(f"built {g.engine.name} in {time.perf_counter() - t0:.1f} s")
            built.append((staged, g.engine))
        # everything built: one all-or-nothing commit, each sidecar before its engine
        moves = []
        for staged, target in built:
            moves += [(sidecar_path(staged).name, sidecar_path(target)), (staged.name, target)]
        sw.commit(moves)
    if cache[0] is not None:  # its own folder may differ: a second atomic write, after the engines
        data = bytes(memoryview(cache[0].serialize()))
        write_file(cache_path, lambda p: p.write_bytes(data), inputs=inputs)
    return [target for _, target in built]


def _attach_timing_cache(config, cache, path: Path, log, say):
    """The timing cache: created from ``path`` on first use (an empty one if absent or if it came from
    another device/TensorRT), then shared by the builds of every graph."""
    if cache is None:
        data = path.read_bytes() if path.is_file() else b""
        cache = config.create_timing_cache(data)
        if cache is None and data:  # corrupt, or not a timing cache at all (NVIDIA's samples check this too)
            raise EngineBuildError(
                f"--timing-cache {path}: TensorRT cannot read this file as a timing cache "
                f"({log.last_error('no message')}); delete it or pass another path"
            )
        if data and not config.set_timing_cache(cache, False):
            say(f"warning: {path.name} was made on another device or TensorRT version; starting a new cache")
            cache = config.create_timing_cache(b"")
        elif data:
            return cache
        if cache is None:
            raise EngineBuildError(f"TensorRT could not create a timing cache ({log.last_error('no message')})")
    if not config.set_timing_cache(cache, False):
        raise EngineBuildError(f"TensorRT refused the timing cache {path} ({log.last_error()})")
    return cache


def _sidecar(trt, g: _Graph, opts: EngineOptions, plugins: list, shapes: dict, plugin_layers: int) -> dict:
    return {
        "format": SIDECAR_FORMAT,
        "format_version": SIDECAR_VERSION,
        "manifest": json.loads(g.manifest.to_json()),
        "tokenizer_json": g.tokenizer_json,
        "initial_state": g.initial_state,
        "plugins": [{"name": Path(p).name, "path": str(Path(p).resolve())} for p in plugins],
        "plugin_layers": int(plugin_layers),
        "tensorrt_version": str(trt.__version__),
        "profile": shapes,
        "tf32": bool(opts.tf32),
        "source_onnx": g.onnx.name,
        "built_by": f"rwkv-export {__version__}",
    }


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
@click.command("build-engine")
@path_argument("model")
@output_option(
    "out",
    help="Engine path (model.engine); a sequence companion goes beside it as model.seq.engine.",
)
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1), help="Largest batch size.")
@click.option(
    "--opt-batch", default=1, show_default=True, type=click.IntRange(1), help="Batch size TensorRT tunes for."
)
@click.option(
    "--max-seq",
    default=256,
    show_default=True,
    type=click.IntRange(1),
    help="Sequence graph: most tokens per call (the runtime splits longer prompts).",
)
@click.option(
    "--opt-seq", default=None, type=click.IntRange(1), help="Sequence graph: T to tune for [min(128, max-seq)]."
)
@plugin_option(
    help="TensorRT plugin library to load (repeatable; default for plugin-mode exports: the built one).",
)
@path_option(
    "--timing-cache",
    default=None,
    help="TensorRT timing cache: read if present, written back after the build (faster rebuilds).",
)
@click.option("--workspace", "workspace_mb", type=click.IntRange(1), default=None, help="Workspace limit in MB.")
@click.option(
    "--builder-optimization-level",
    "opt_level",
    type=click.IntRange(0, 5),
    default=None,
    help="TensorRT builder optimization level (default 3; higher builds longer, may run faster).",
)
@click.option("--tf32", is_flag=True, help="Allow TF32 MatMuls for float32 graphs (faster, ~1e-3 relative error).")
@click.option(
    "--companions/--no-companions",
    default=True,
    show_default=True,
    help="Also build the export's other graph (model.seq.onnx) when it is beside MODEL.",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def build_engine_command(
    model,
    out,
    max_batch,
    opt_batch,
    max_seq,
    opt_seq,
    plugins,
    timing_cache,
    workspace_mb,
    opt_level,
    tf32,
    companions,
    quiet,
):
    """Build TensorRT engine(s) from an exported MODEL.onnx (strongly typed: precision from the ONNX)."""
    from ...errors import run_user_errors

    opts = EngineOptions(
        max_batch=max_batch,
        opt_batch=opt_batch,
        max_seq=max_seq,
        opt_seq=opt_seq,
        plugins=tuple(plugins),
        timing_cache=timing_cache,
        workspace_mb=workspace_mb,
        optimization_level=opt_level,
        tf32=tf32,
        companions=companions,
    )
    echo = None if quiet else (lambda msg: click.echo(msg, err=True))
    paths = run_user_errors(lambda: build_engine(model, out, opts, echo=echo))
    for p in paths:
        click.echo(f"wrote {p} ({p.stat().st_size / 1e6:.1f} MB) + {sidecar_path(p).name}")


__all__ = ["build_engine", "build_engine_command", "EngineOptions", "EngineBuildError", "plan_graphs"]
