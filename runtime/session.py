"""``rwkv_runtime.Session``: load an exported model, step it, prefill prompts, generate text.

Everything about the model comes from its manifest. The state between calls stays in onnxruntime
``OrtValue``s bound with IOBinding (on the GPU with the CUDA provider), so it is never copied through
numpy on the hot path; ``State.numpy()`` is there when you want to look at it.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import RuntimeUserError
from .manifest import INITIAL_STATE_KEY, MANIFEST_KEY, TOKENIZER_KEY, Manifest, StateSpec, decode_state
from .sampling import Sampler, SamplingParams
from .tokenizers import StreamDecoder, make_tokenizer

_NP_DTYPES = {"float32": np.float32, "float16": np.float16}


# ---------------------------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------------------------
class State:
    """The recurrent state of a batch: one tensor per manifest state entry (backend-native values).

    Indexing (``state["state.0.wkv_pp"]``) returns a numpy copy. A state belongs to one backend; use
    ``numpy()`` / ``Session.state_from_numpy`` to move it between sessions or to disk.
    """

    def __init__(self, values: dict, specs: list, batch_size: int, backend):
        self._values = values
        self.specs = specs
        self.batch_size = batch_size
        self._backend = backend

    def numpy(self) -> dict:
        return {s.name: self._backend.to_numpy(self._values[s.name]) for s in self.specs}

    def __getitem__(self, name: str) -> np.ndarray:
        return self._backend.to_numpy(self._values[name])

    def keys(self):
        return [s.name for s in self.specs]

    def copy(self) -> "State":
        """An independent copy (the runtime never writes into a state in place, but users may)."""
        return State({s.name: self._backend.from_numpy(self._backend.to_numpy(self._values[s.name]).copy())
                      for s in self.specs}, self.specs, self.batch_size, self._backend)

    def save(self, path) -> None:
        """Write the state to an ``.npz`` file (plain arrays; loading it never runs code)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **self.numpy())
        tmp.replace(path)

    def select(self, rows) -> "State":
        """The states of some sequences of the batch (gather along the batch axis)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.batch_size):
            raise RuntimeUserError(f"batch rows {rows.tolist()} out of range for a batch of {self.batch_size}")
        arrays = {k: np.ascontiguousarray(v[rows]) for k, v in self.numpy().items()}
        return State({k: self._backend.from_numpy(v) for k, v in arrays.items()}, self.specs, len(rows), self._backend)

    @staticmethod
    def concat(states: list) -> "State":
        """Join the states of several batches into one batch (sequences joining a running batch)."""
        if not states:
            raise RuntimeUserError("State.concat needs at least one state")
        first = states[0]
        arrays = [s.numpy() for s in states]
        joined = {k: np.concatenate([a[k] for a in arrays], 0) for k in arrays[0]}
        return State({k: first._backend.from_numpy(v) for k, v in joined.items()}, first.specs,
                     sum(s.batch_size for s in states), first._backend)

    def __repr__(self):
        return f"State(batch_size={self.batch_size}, tensors={len(self.specs)})"


# ---------------------------------------------------------------------------------------------
# onnxruntime backend
# ---------------------------------------------------------------------------------------------
class OrtBackend:
    """Runs the step graph (and, on first use, the sequence graph) with onnxruntime + IOBinding."""

    def __init__(self, path: Path, manifest: Manifest, providers=None, threads: int | None = None,
                 session_options=None, low_memory: bool = False):
        import onnxruntime as ort

        # low_memory: one session (the sequence graph, also used for single steps with T=1) and no
        # weight prepacking, so the weights are in memory once (~1.2x their size instead of ~2-2.7x)
        self.low_memory = bool(low_memory)

        self.ort = ort
        self.manifest = manifest
        self.path = path
        self.providers = providers or ["CPUExecutionProvider"]
        self.threads = threads
        self._user_options = session_options
        self.device = "cuda" if any("CUDA" in (p if isinstance(p, str) else p[0]) for p in self.providers) else "cpu"
        self._sessions: dict = {}
        self._has: dict = {}

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
        if kind not in self._sessions:
            path = self.graph_path(kind)
            if self.manifest.precision == "bf16" and self.device == "cpu":
                raise RuntimeUserError(f"{path.name} is a bfloat16 export: onnxruntime's CPU provider has no bfloat16 "
                                       "MatMul; run it with TensorRT or onnxruntime's CUDA provider, or export fp32/fp16")
            try:
                self._sessions[kind] = self.ort.InferenceSession(str(path), self._options(), providers=self.providers)
            except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
                msg = str(e).splitlines()[0][:200]
                if "bfloat16" in msg.lower() or "BFloat16" in msg:
                    raise RuntimeUserError(f"{path.name}: this onnxruntime cannot run bfloat16 graphs "
                                           f"on {self.providers[0]} ({msg})") from None
                raise RuntimeUserError(f"{path.name}: onnxruntime could not load the model ({msg})") from None
        return self._sessions[kind]

    def graph_path(self, kind: str) -> Path:
        if self.manifest.graph == kind:
            return self.path
        name = self.manifest.companions.get(kind)
        p = self.path.with_name(name) if name else None
        if p is None or not p.is_file():
            raise RuntimeUserError(f"no {kind} graph for {self.path.name} (export it with --graphs step,sequence)")
        return p

    def has(self, kind: str) -> bool:
        if kind not in self._has:  # cached: asked on every step
            try:
                self.graph_path(kind)
                self._has[kind] = True
            except RuntimeUserError:
                self._has[kind] = False
        return self._has[kind]

    def from_numpy(self, arr: np.ndarray):
        # An ORT-owned copy: ``ortvalue_from_numpy`` on the CPU would alias the numpy buffer without
        # keeping it alive, and the state would then read freed memory.
        arr = np.ascontiguousarray(arr)
        value = self.ort.OrtValue.ortvalue_from_shape_and_type(arr.shape, arr.dtype, self.device, 0)
        value.update_inplace(arr)
        return value

    def to_numpy(self, value) -> np.ndarray:
        return value.numpy() if hasattr(value, "numpy") else np.asarray(value)

    def run(self, kind: str, tokens: np.ndarray, values: dict, specs: list):
        if kind == "step" and (self.low_memory or not self.has("step")) and self.has("sequence"):
            logits, new = self.run("sequence", tokens[:, None], values, specs)
            return (logits[:, -1] if logits.ndim == 3 else logits), new
        sess = self.session(kind)
        io = sess.io_binding()
        io.bind_cpu_input(self.manifest.tokens_input, tokens)
        for s in specs:
            io.bind_ortvalue_input(s.name, values[s.name])
        io.bind_output(self.manifest.logits_output, "cpu")  # logits go to the sampler on the host
        for s in specs:
            io.bind_output(s.output, self.device)
        sess.run_with_iobinding(io)
        outs = io.get_outputs()
        return outs[0].numpy(), {s.name: o for s, o in zip(specs, outs[1:])}


# ---------------------------------------------------------------------------------------------
# Session
# ---------------------------------------------------------------------------------------------
def read_manifest(path) -> tuple[Manifest, str | None]:
    """The manifest (and embedded tokenizer JSON) of an ONNX model, read with onnxruntime only."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise RuntimeUserError(f"{path}: no such file")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        meta = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).get_modelmeta()
    except Exception as e:  # noqa: BLE001 - onnxruntime's own exception types
        raise RuntimeUserError(f"{path}: not a loadable ONNX model ({str(e).splitlines()[0][:160]})") from None
    props = meta.custom_metadata_map
    if MANIFEST_KEY not in props:
        raise RuntimeUserError(f"{path}: no rwkv manifest in this ONNX model (was it exported by rwkv-export?)")
    return Manifest.from_json(props[MANIFEST_KEY]), props.get(TOKENIZER_KEY)


class Session:
    """An exported RWKV model, ready to run.

    >>> s = Session("model.onnx")                   # onnxruntime; providers=[...] to choose
    >>> state = s.new_state(batch_size=1)
    >>> logits, state = s.step(np.array([tok]), state)
    """

    def __init__(self, path, providers=None, threads: int | None = None, session_options=None,
                 prefill_chunk: int = 256, low_memory: bool = False, initial_state=None, cuda_graphs=None):
        path = Path(path)
        if not path.exists():
            raise RuntimeUserError(f"{path}: no such file")
        if path.suffix in (".engine", ".plan", ".trt"):
            from .trt_backend import TrtBackend, read_engine_manifest  # optional: tensorrt + cuda-python

            self.manifest, self._tokenizer_json = read_engine_manifest(path)
            self.backend = TrtBackend(path, self.manifest, cuda_graphs=cuda_graphs)
        else:
            self.manifest, self._tokenizer_json = _read_manifest_fast(path)
            self.backend = OrtBackend(path, self.manifest, providers, threads, session_options, low_memory)
            first = "sequence" if (low_memory or not self.backend.has("step")) else "step"
            self.backend.session(first)  # fail early on bad files
        self.path = path
        self.prefill_chunk = int(prefill_chunk)
        self._tokenizer = None
        self._specs: list[StateSpec] = self.manifest.state
        # a learned starting state: embedded by the exporter, or given here (.npz path or arrays)
        self._initial: dict = {}
        if self.manifest.initial_state == "embedded":
            if path.suffix in (".engine", ".plan", ".trt"):
                from .trt_backend import read_engine_initial_state

                self._initial = read_engine_initial_state(path)
            else:
                self._initial = decode_state(_read_props(path).get(INITIAL_STATE_KEY, ""))
        if initial_state is not None:
            self.set_initial_state(initial_state)

    # -- model facts --------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = make_tokenizer(self.manifest.tokenizer, self._tokenizer_json)
        return self._tokenizer

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids)

    # -- state --------------------------------------------------------------------------------
    def new_state(self, batch_size: int = 1) -> State:
        """A fresh state: zeros, except where the manifest says otherwise (RWKV-4's pp = -1e30)."""
        if int(batch_size) < 1:
            raise RuntimeUserError(f"batch_size must be >= 1, not {batch_size}")
        arrays = {s.name: np.full(s.concrete_shape(int(batch_size)), s.init, dtype=_NP_DTYPES[s.dtype])
                  for s in self._specs}
        for k, v in self._initial.items():
            arrays[k][...] = v[:1]  # broadcast the learned state over the batch
        return self.state_from_numpy(arrays)

    def set_initial_state(self, initial) -> None:
        """Make ``new_state`` start from ``initial`` (an .npz path or {name: array}, batch 1 or any
        leading axis of 1), e.g. a state-tuned state from ``rwkv-export convert-state``."""
        if not isinstance(initial, dict):
            p = Path(initial)
            if not p.is_file():
                raise RuntimeUserError(f"{p}: no such initial-state file")
            with np.load(p, allow_pickle=False) as z:
                initial = {k: z[k] for k in z.files}
        specs = {s.name: s for s in self._specs}
        for k, v in initial.items():
            if k not in specs:
                raise RuntimeUserError(f"initial state names {k!r}, which this model has no state tensor for")
            if tuple(np.shape(v)[1:]) != specs[k].concrete_shape(1)[1:]:
                raise RuntimeUserError(f"initial state {k} has shape {list(np.shape(v))}, expected {specs[k].shape}")
        self._initial = {k: np.asarray(v, np.float32) for k, v in initial.items()}

    def state_from_numpy(self, arrays: dict) -> State:
        """Build a state from numpy arrays (checked against the manifest: names, shapes, dtypes)."""
        missing = [s.name for s in self._specs if s.name not in arrays]
        if missing:
            raise RuntimeUserError(f"state is missing {len(missing)} tensor(s), e.g. {missing[0]}")
        batch = None
        values = {}
        for s in self._specs:
            a = np.asarray(arrays[s.name])
            if a.dtype != np.dtype(s.dtype):
                raise RuntimeUserError(f"state tensor {s.name} has dtype {a.dtype}, expected {s.dtype}")
            if a.ndim != len(s.shape) or a.ndim == 0:
                raise RuntimeUserError(f"state tensor {s.name} has shape {list(a.shape)}, expected {s.shape}")
            batch = a.shape[0] if batch is None else batch
            if tuple(a.shape) != s.concrete_shape(batch):
                raise RuntimeUserError(f"state tensor {s.name} has shape {list(a.shape)}, "
                                       f"expected {list(s.concrete_shape(batch))} (batch {batch})")
            values[s.name] = self.backend.from_numpy(a)
        return State(values, self._specs, int(batch), self.backend)

    def load_state(self, path) -> State:
        path = Path(path)
        if not path.is_file():
            raise RuntimeUserError(f"{path}: no such state file")
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (ValueError, OSError) as e:
            raise RuntimeUserError(f"{path}: not a saved state ({str(e)[:100]})") from None
        return self.state_from_numpy(arrays)

    def save_state(self, state: State, path) -> None:
        state.save(path)

    def _coerce_state(self, state, batch: int) -> State:
        if state is None:
            return self.new_state(batch)
        if isinstance(state, dict):
            state = self.state_from_numpy(state)
        if not isinstance(state, State):
            raise RuntimeUserError(f"state must be a State (from new_state) or a dict of arrays, not {type(state).__name__}")
        if state._backend is not self.backend:
            state = self.state_from_numpy(state.numpy())
        if state.batch_size != batch:
            raise RuntimeUserError(f"state is for a batch of {state.batch_size}, but {batch} token row(s) were given")
        return state

    def _tokens(self, tokens, ndim: int) -> np.ndarray:
        t = np.asarray(tokens)
        if t.dtype.kind not in "iu":
            raise RuntimeUserError(f"token ids must be integers, not {t.dtype}")
        if ndim == 1 and t.ndim == 0:
            t = t.reshape(1)
        if ndim == 2 and t.ndim == 1:
            t = t.reshape(1, -1)
        if t.ndim != ndim or t.size == 0:
            raise RuntimeUserError(f"tokens must have shape {'[batch]' if ndim == 1 else '[batch, T]'}, got {list(t.shape)}")
        bad = (t < 0) | (t >= self.vocab_size)
        if bad.any():
            raise RuntimeUserError(f"token id {int(t[bad][0])} is outside [0, {self.vocab_size})")
        return np.ascontiguousarray(t, dtype=np.int64)

    # -- running --------------------------------------------------------------------------------
    def step(self, tokens, state=None):
        """One token per sequence: tokens [batch] -> (logits float32 [batch, vocab], new State)."""
        t = self._tokens(tokens, 1)
        st = self._coerce_state(state, t.shape[0])
        logits, values = self.backend.run("step", t, st._values, self._specs)
        return logits, State(values, self._specs, st.batch_size, self.backend)

    def prefill(self, tokens, state=None, chunk_size: int | None = None):
        """A prompt per sequence: tokens [batch, T] -> (logits of the last position [batch, vocab], State).

        Uses the sequence graph in chunks of ``chunk_size`` tokens (the result does not depend on the
        chunk size beyond float rounding); without a sequence graph it steps token by token.
        """
        t = self._tokens(tokens, 2)
        st = self._coerce_state(state, t.shape[0])
        values = st._values
        chunk = int(self.prefill_chunk if chunk_size is None else chunk_size)
        if chunk < 1:
            raise RuntimeUserError(f"chunk_size must be >= 1, not {chunk}")
        logits = None
        if self.backend.has("sequence"):
            for s in range(0, t.shape[1], chunk):
                logits, values = self.backend.run("sequence", t[:, s:s + chunk], values, self._specs)
            if logits.ndim == 3:  # a graph exported with all_logits: keep the last position
                logits = logits[:, -1]
        else:
            for j in range(t.shape[1]):
                logits, values = self.backend.run("step", np.ascontiguousarray(t[:, j]), values, self._specs)
        return logits, State(values, self._specs, st.batch_size, self.backend)

    def prefill_many(self, prompts: list, state=None, chunk_size: int | None = None):
        """Prompts of different lengths as one batch -> (last logits [N, vocab], State); see batch.py."""
        from .batch import prefill_many

        return prefill_many(self, prompts, state, chunk_size)

    def generate_tokens(self, prompt_tokens, max_new_tokens: int = 100, sampling: SamplingParams | None = None,
                        state=None) -> Iterator[int]:
        """Prefill the prompt, then sample and step; yields token ids as they are produced."""
        sampler = Sampler(sampling or SamplingParams())
        if len(prompt_tokens) == 0:
            raise RuntimeUserError("the prompt is empty")
        logits, st = self.prefill(np.asarray([list(prompt_tokens)]), state)
        self.last_state = st
        for _ in range(int(max_new_tokens)):
            tok = sampler(logits[0])
            if tok in sampler.params.stop:
                return
            yield tok
            logits, st = self.step(np.array([tok]), st)
            self.last_state = st

    def generate(self, prompt, max_new_tokens: int = 100, sampling: SamplingParams | None = None, state=None,
                 **sampling_kwargs) -> Iterator[str]:
        """Stream text: yields pieces of decoded text as tokens are sampled.

        ``prompt`` is text (or a list of token ids); sampling settings as ``SamplingParams`` or keywords
        (temperature, top_p, top_k, presence_penalty, frequency_penalty, penalty_decay, seed).
        """
        if sampling is None:
            sampling = SamplingParams(**sampling_kwargs)
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        dec = StreamDecoder(self.tokenizer)
        self.stats = {"prompt_tokens": len(ids), "new_tokens": 0, "prefill_s": 0.0, "decode_s": 0.0}
        t0 = time.perf_counter()
        first = True
        for tok in self.generate_tokens(ids, max_new_tokens, sampling, state):
            now = time.perf_counter()
            if first:
                self.stats["prefill_s"], t0, first = now - t0, now, False
            self.stats["new_tokens"] += 1
            piece = dec.push(tok)
            if piece:
                yield piece
            self.stats["decode_s"] = time.perf_counter() - t0
        tail = dec.flush()
        if tail:
            yield tail


def _read_props(path: Path) -> dict:
    """The model's metadata properties (onnx if installed: it reads no weights; else onnxruntime)."""
    try:
        import onnx
    except ImportError:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return dict(ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).get_modelmeta()
                    .custom_metadata_map)
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def _read_manifest_fast(path: Path):
    """Read only the metadata: parse the protobuf header with onnx if present, else onnxruntime."""
    try:
        import onnx  # optional for the runtime; much cheaper than building a session
    except ImportError:
        return read_manifest(path)
    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - protobuf DecodeError etc.
        raise RuntimeUserError(f"{path}: not an ONNX model") from None
    props = {p.key: p.value for p in m.metadata_props}
    if MANIFEST_KEY not in props:
        raise RuntimeUserError(f"{path}: no rwkv manifest in this ONNX model (was it exported by rwkv-export?)")
    return Manifest.from_json(props[MANIFEST_KEY]), props.get(TOKENIZER_KEY)
