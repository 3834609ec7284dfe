"""The onnxruntime backend: runs an export's step graph (and, on first use, its sequence graph).

State values are ``OrtValue``s (on the GPU with the CUDA provider), bound with IOBinding so the state
never goes through numpy on the hot path.

The step loop binds its buffers once. Each (graph, batch size) has a small pool of *buffer sets*: state
output OrtValues, a logits OrtValue and a token OrtValue, pre-allocated and bound to an IOBinding of
their own. A step writes into a set no live ``State`` refers to (a set is free when only the pool holds
its values: CPython's reference count tells), so the usual loop ``logits, st = s.step(t, st)``
ping-pongs between two sets and rebinds nothing, while a state the caller still holds is never an
output target (the step takes another set, or falls back to fresh outputs).
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .artifact import Artifact, check_graph_io, plain_file_name
from .errors import RuntimeUserError
from .hugepages import anonymous_regions, collapse_new

_SETS_PER_SHAPE = 3  # two for the ping-pong, one spare for a state the caller keeps
_BATCH_SIZES_KEPT = 4  # buffer sets kept for this many batch sizes (a server's batch size varies)


def check_providers(ort, providers) -> list:
    """The requested execution providers, each one this onnxruntime has; else one clear error."""
    if providers is None:
        return ["CPUExecutionProvider"]
    if isinstance(providers, str):
        providers = [providers]
    if not isinstance(providers, (list, tuple)):
        raise RuntimeUserError(f"providers must be a list of execution provider names, not {type(providers).__name__}")
    available = ort.get_available_providers()
    out = []
    for p in providers:
        name = p[0] if isinstance(p, (tuple, list)) and p else p
        if not isinstance(name, str):
            raise RuntimeUserError(f"execution provider must be a name like 'CPUExecutionProvider', not {name!r}")
        if name not in available:
            raise RuntimeUserError(f"this onnxruntime has no {name} (available: {', '.join(available)})")
        out.append(tuple(p) if isinstance(p, list) else p)
    if not out:
        raise RuntimeUserError(f"no execution provider given (available: {', '.join(available)})")
    return out


class _BufferSet:
    """Pre-allocated outputs of one graph at one batch size, bound once to their own IOBinding."""

    def __init__(self, backend: OrtBackend, sess, kind: str, batch: int, specs: list):
        ort, dev = backend.ort, backend.device
        m = backend.manifest
        seq = kind == "sequence"  # a decode step through the sequence graph: T = 1
        rank = next(len(o.shape) for o in sess.get_outputs() if o.name == m.logits_output)
        self.tokens = ort.OrtValue.ortvalue_from_shape_and_type((batch, 1) if seq else (batch,), np.int64, "cpu", 0)
        self.logits = ort.OrtValue.ortvalue_from_shape_and_type(
            (batch, 1, m.vocab_size) if rank == 3 else (batch, m.vocab_size), np.float32, "cpu", 0
        )
        self.values = {
            s.name: ort.OrtValue.ortvalue_from_shape_and_type(s.concrete_shape(batch), np.dtype(s.dtype), dev, 0)
            for s in specs
        }
        self._probe = next(iter(self.values.values()))
        self.io = sess.io_binding()
        self.io.bind_ortvalue_input(m.tokens_input, self.tokens)
        self.io.bind_ortvalue_output(m.logits_output, self.logits)
        for s in specs:
            self.io.bind_ortvalue_output(s.output, self.values[s.name])
        self.bound_from = None  # the buffer set whose values are bound as this set's inputs
        self.busy = False
        # References to our values that are not a caller's: ours, and the IOBinding's (onnxruntime's Python
        # wrapper keeps the OrtValues it binds); measured, not assumed, so another onnxruntime version
        # that keeps more or fewer cannot make a held state look free.
        self.base_refs = sys.getrefcount(self._probe)
        self.extra_refs = 0  # held by other sets' bindings (our values bound as their inputs)
        self.input_refs = None  # (source set, refs this binding holds on it)

    def free(self) -> bool:
        # a live State holding these values adds references beyond the measured ones
        return not self.busy and sys.getrefcount(self._probe) <= self.base_refs + self.extra_refs

    def bind_inputs(self, values: dict, specs: list, src: _BufferSet | None):
        if self.input_refs is not None:  # our binding lets go of the previous source's values
            old, n = self.input_refs
            old.extra_refs -= n
            self.input_refs = None
        before = sys.getrefcount(src._probe) if src is not None else 0
        for s in specs:
            self.io.bind_ortvalue_input(s.name, values[s.name])
        if src is not None:
            n = sys.getrefcount(src._probe) - before
            src.extra_refs += n
            self.input_refs = (src, n)
        self.bound_from = src  # a set, never its values: holding those would keep the set "in use"


class OrtBackend:
    """onnxruntime + IOBinding; see the module docstring. Implements ``backend.Backend``."""

    def __init__(
        self,
        artifact: Artifact,
        providers=None,
        threads: int | None = None,
        session_options=None,
        low_memory: bool = False,
        decode_graph: str = "auto",
        huge_pages: bool = True,
    ):
        from ._ort import import_onnxruntime  # one clear line when onnxruntime is missing or doubly installed

        ort = import_onnxruntime()
        self.ort = ort
        self.artifact = artifact
        self.manifest = artifact.manifest
        self.path = artifact.path
        self.providers = check_providers(ort, providers)
        self.threads = threads
        if session_options is not None and not isinstance(session_options, ort.SessionOptions):
            # onnxruntime's own TypeError would be reported as the model failing to load
            raise RuntimeUserError(
                f"session_options must be an onnxruntime.SessionOptions, not {type(session_options).__name__}"
            )
        self._user_options = session_options
        # low_memory: also no weight prepacking for float graphs (smaller, slower)
        self.low_memory = bool(low_memory)
        if decode_graph not in ("auto", "step", "sequence"):
            raise RuntimeUserError(f"decode_graph must be 'auto', 'step' or 'sequence', not {decode_graph!r}")
        # Which graph decodes. "auto": the sequence graph (T = 1) when the export has one, so that one
        # onnxruntime session -- one copy of the (prepacked) weights -- serves decode and prefill
        # (onnxruntime's Python API cannot share prepacked weights between two sessions). Measured no
        # slower than the step graph on CPU (scripts/bench_memory.py); "step" keeps a second session.
        has_seq = artifact.companion_path("sequence") is not None
        has_step = artifact.companion_path("step") is not None
        if decode_graph == "sequence" and not has_seq:
            raise RuntimeUserError(f"{self.path.name}: decode_graph='sequence' but the export has no sequence graph")
        if decode_graph == "step" and not has_step:
            raise RuntimeUserError(f"{self.path.name}: decode_graph='step' but the export has no step graph")
        self.decode_kind = "step" if (decode_graph == "step" or not has_seq) else "sequence"
        if low_memory and has_seq:
            self.decode_kind = "sequence"
        self.device = "cuda" if any("CUDA" in (p if isinstance(p, str) else p[0]) for p in self.providers) else "cpu"
        self._sessions: dict = {}
        self._has: dict = {}
        self._sets: OrderedDict = OrderedDict()  # batch size -> [_BufferSet], most recently used last
        self._lock = threading.Lock()
        # Prefill runs (several tokens) hand the CPU arena's free regions back when they end. onnxruntime
        # plans one block for the intermediates of a run the second time it sees an input shape (its
        # memory pattern) and takes it from the arena, which cannot fit it into the regions the first run
        # left free: the second 256-token chunk of a prefill added the block on top of them. Shrinking
        # after each chunk (with the state outputs outside the arena, see _run_fresh) releases the first
        # run's regions before the block is taken. Decode steps keep the arena and their pattern.
        # Measured on the 0.1B RWKV-7, prefill 512 + decode 128, one process per run, 1 thread (issue #30,
        # scripts/profile_decode.py rss): peak RSS int4 336 -> 312 MB, int8 360 -> 348 MB, fp32 801 -> 800;
        # prefill within 1-3% (page faults of the fresh block), decode unchanged. Turning the memory
        # pattern off instead saved more (int4 -44 MB) but made int8 decode ~8% slower: not taken.
        # Only with the runtime's own session options: onnxruntime fails a run that asks to shrink an arena
        # the session does not have (a caller's options may turn it off or use the environment's allocator).
        # the weights a CPU session prepacks while it loads, in huge pages (hugepages.py: decode 10-13% faster)
        self.huge_pages = bool(huge_pages) and self.device == "cpu"
        self._prefill_run_options = None
        if self.device == "cpu" and session_options is None:
            self._prefill_run_options = ort.RunOptions()
            self._prefill_run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def _options(self):
        so = self._user_options or self.ort.SessionOptions()
        if self._user_options is None:
            so.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if self.threads:
                so.intra_op_num_threads = self.threads
                so.inter_op_num_threads = 1
            if self.low_memory and not self.manifest.options.get("quantize"):
                # (MatMulNBits computes from its prepacked form: without it int8/int4 are ~40x slower)
                so.add_session_config_entry("session.disable_prepacking", "1")
        return so

    def session(self, kind: str):
        with self._lock:
            if kind not in self._sessions:
                self._sessions[kind] = self._load(kind)
            return self._sessions[kind]

    def _load(self, kind: str):
        art = self.artifact.companion(kind)  # the export id and layout checked against the main graph
        path = art.path
        if self.manifest.precision == "bf16" and self.device == "cpu":
            raise RuntimeUserError(
                f"{path.name} is a bfloat16 export: onnxruntime's CPU provider has no bfloat16 "
                "MatMul; run it with TensorRT or onnxruntime's CUDA provider, or export fp32/fp16"
            )
        weights = art.manifest.options.get("weights_file")
        if isinstance(weights, str) and plain_file_name(weights) and not path.with_name(weights).is_file():
            # onnxruntime's own message for this is cut off before the file name
            raise RuntimeUserError(
                f"{path.name}: its weights file {weights} is missing; it must stay beside the "
                "graph under that name (copy or move the export's files together)"
            )
        before = anonymous_regions() if self.huge_pages else None
        try:
            sess = self.ort.InferenceSession(str(path), self._options(), providers=self.providers)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types (Fail, InvalidGraph, ...)
            msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            if "bfloat16" in msg.lower():
                raise RuntimeUserError(
                    f"{path.name}: this onnxruntime cannot run bfloat16 graphs on {self.providers[0]} ({msg})"
                ) from None
            if "GetExtDataFromTensorProto" in msg or "External data path" in msg:
                what = "missing" if "does not exist" in msg else "truncated or damaged"
                raise RuntimeUserError(
                    f"{path.name}: its weights file {weights or '(.onnx.data)'} is {what}; copy the "
                    f"export's files again or re-export ({msg})"
                ) from None
            raise RuntimeUserError(f"{path.name}: onnxruntime could not load the model ({msg})") from None
        check_graph_io(art.manifest, kind, sess.get_inputs(), sess.get_outputs(), path.name)
        if before is not None:
            collapse_new(before)
        return sess

    def graph_path(self, kind: str) -> Path:
        p = self.artifact.companion_path(kind)
        if p is None:
            raise RuntimeUserError(f"no {kind} graph for {self.path.name} (export it with --graphs step,sequence)")
        return p

    def has(self, kind: str) -> bool:
        if kind not in self._has:  # cached: asked on every step
            self._has[kind] = self.artifact.companion_path(kind) is not None
        return self._has[kind]

    def from_numpy(self, arr: np.ndarray):
        # An ORT-owned copy: ``ortvalue_from_numpy`` on the CPU would alias the numpy buffer
        arr = np.ascontiguousarray(arr)
        value = self.ort.OrtValue.ortvalue_from_shape_and_type(arr.shape, arr.dtype, self.device, 0)
        value.update_inplace(arr)
        return value

    def to_numpy(self, value) -> np.ndarray:
        return value.numpy() if hasattr(value, "numpy") else np.asarray(value)

    # -- running ----------------------------------------------------------------------------------
    def run(self, kind: str, tokens: np.ndarray, values: dict, specs: list):
        if kind == "step":  # one token per row: through the pre-bound buffer sets
            kind = self.decode_kind
            sess = self.session(kind)
            bs = self._take_set(sess, kind, tokens.shape[0], specs)
            if bs is not None:
                try:
                    logits, new = self._run_set(sess, bs, tokens, values, specs)
                finally:
                    bs.busy = False
            else:
                logits, new = self._run_fresh(sess, tokens[:, None] if kind == "sequence" else tokens, values, specs)
            return (logits[:, -1] if logits.ndim == 3 else logits), new
        return self._run_fresh(self.session(kind), tokens, values, specs, self._prefill_run_options)

    def _run_fresh(self, sess, tokens, values, specs, run_options=None):
        io = sess.io_binding()
        io.bind_cpu_input(self.manifest.tokens_input, tokens)
        for s in specs:
            io.bind_ortvalue_input(s.name, values[s.name])
        io.bind_output(self.manifest.logits_output, "cpu")  # logits go to the sampler on the host
        for s in specs:
            if run_options is None:
                io.bind_output(s.output, self.device)  # fresh outputs: never a caller's state
            else:  # outside the session's arena, so that the state kept after the run pins none of it
                out = self.ort.OrtValue.ortvalue_from_shape_and_type(
                    s.concrete_shape(tokens.shape[0]), np.dtype(s.dtype), self.device, 0
                )
                io.bind_ortvalue_output(s.output, out)
        self._execute(sess, io, run_options)
        outs = io.get_outputs()
        return np.array(outs[0].numpy(), copy=True), {s.name: o for s, o in zip(specs, outs[1:])}

    def _take_set(self, sess, kind: str, batch: int, specs: list):
        with self._lock:
            pool = self._sets.setdefault(batch, [])
            self._sets.move_to_end(batch)
            if len(self._sets) > _BATCH_SIZES_KEPT:
                # forget the least recently used batch size: a State still holding one of its sets keeps its
                # OrtValues alive, and a forgotten set is never written again (sets only bind their own size)
                self._sets.popitem(last=False)
            for bs in pool:
                if bs.free():
                    bs.busy = True
                    return bs
            if len(pool) < _SETS_PER_SHAPE:
                bs = _BufferSet(self, sess, kind, batch, specs)
                bs.busy = True
                pool.append(bs)
                return bs
        return None  # every set is held by a caller's State: fresh outputs this time

    def _run_set(self, sess, bs: _BufferSet, tokens, values, specs):
        src = self._source_set(values, tokens.shape[0], specs)
        if src is None or bs.bound_from is not src:
            bs.bind_inputs(values, specs, src)
        bs.tokens.update_inplace(tokens.reshape(bs.tokens.shape()))
        self._execute(sess, bs.io)
        return np.array(bs.logits.numpy(), copy=True), dict(bs.values)

    def _source_set(self, values, batch: int, specs: list):
        """The buffer set whose outputs ``values`` are (then its binding can stay), else None."""
        first = values[specs[0].name]
        for bs in self._sets.get(batch, ()):
            if bs._probe is first:
                return bs if all(values[s.name] is bs.values[s.name] for s in specs) else None
        return None

    def _execute(self, sess, io, run_options=None):
        try:
            sess.run_with_iobinding(io, run_options)
        except Exception as e:  # noqa: BLE001 - onnxruntime's own exception types
            msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise RuntimeUserError(f"{self.path.name}: onnxruntime failed to run the graph ({msg})") from None
