"""``rwkv_runtime.Session``: load an exported model, step it, prefill prompts, generate text.

Everything about the model comes from its manifest. The state between calls stays in onnxruntime
``OrtValue``s bound with IOBinding (on the GPU with the CUDA provider), so it is never copied through
numpy on the hot path; ``State.numpy()`` is there when you want to look at it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .artifact import is_engine, open_artifact
from .backend import Backend
from .errors import PROMPT_ERRORS, RuntimeUserError, nonempty_list
from .generation import Batch, Row, TextStream
from .manifest import StateSpec
from .sampling import Sampler, SamplingParams
from .state import EXPORT_ID_KEY, MAX_STATE_BATCH, STATE_DTYPES, State, check_state_arrays, read_state_npz
from .tokenizers import make_tokenizer

__all__ = ["Session", "State", "Generation"]


class Session:
    """An exported RWKV model, ready to run.

    >>> s = Session("model.onnx")                   # onnxruntime; providers=[...] to choose
    >>> state = s.new_state(batch_size=1)
    >>> logits, state = s.step(np.array([tok]), state)

    Memory: by default one onnxruntime session, the export's sequence graph, serves both decode (T = 1)
    and prefill, so the weights are held once; ``decode_graph="step"`` decodes with the step graph in a
    second session (a second copy of the weights). ``low_memory=True`` also turns off weight prepacking.
    ``huge_pages`` (CPU, Linux): the memory onnxruntime fills while loading (the prepacked weights) is
    moved to huge pages, for a faster decode (runtime/hugepages.py); False leaves it as allocated.
    ``plugin``: the TensorRT plugin library for an engine that needs one (else found from the sidecar/env).

    Inputs are checked here (tokens, states, sizes); the backend (``backend.Backend``) only runs graphs.
    No call writes into a state the caller holds: every call returns a new ``State``.
    """

    def __init__(
        self,
        path,
        providers=None,
        threads: int | None = None,
        session_options=None,
        prefill_chunk: int = 256,
        low_memory: bool = False,
        initial_state=None,
        cuda_graphs=None,
        decode_graph: str = "auto",
        plugin=None,
        huge_pages: bool = True,
    ):
        self.artifact = open_artifact(path)  # the manifest validated; no weights read yet
        self.path = path = self.artifact.path
        self.manifest = self.artifact.manifest
        self._tokenizer_json = self.artifact.tokenizer_json
        if not isinstance(prefill_chunk, (int, np.integer)) or isinstance(prefill_chunk, bool) or prefill_chunk < 1:
            raise RuntimeUserError(f"prefill_chunk must be >= 1, not {prefill_chunk}")
        # onnxruntime's own error for a bad thread count blames the model file ("could not load the model")
        if threads is not None and (
            not isinstance(threads, (int, np.integer)) or isinstance(threads, bool) or threads < 0
        ):
            raise RuntimeUserError(
                f"threads must be an integer >= 1 (or None/0: onnxruntime's default), not {threads!r}"
            )
        if is_engine(path):
            from .tensorrt import TrtBackend  # optional: tensorrt + cuda.core

            self.backend: Backend = TrtBackend(path, self.manifest, cuda_graphs=cuda_graphs, plugin=plugin)
        else:
            from .ort_backend import OrtBackend

            self.backend = OrtBackend(
                self.artifact, providers, threads, session_options, low_memory, decode_graph, huge_pages
            )
            self.backend.session(self.backend.decode_kind)  # fail early on bad files; graph checked against manifest
        for kind in ("step", "sequence"):  # companions bound to this export (same id), checked up front
            if self.artifact.companion_path(kind) is not None:
                self.artifact.companion(kind)
        self.prefill_chunk = int(prefill_chunk)
        self._tokenizer = None
        self._specs: list[StateSpec] = self.manifest.state
        self.export_id = self.manifest.export_id
        # a learned starting state: embedded by the exporter, or given here (.npz path or arrays)
        self._initial: dict = self.artifact.initial_state()
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
        if not isinstance(text, str):
            raise RuntimeUserError(f"a prompt must be text (str) or a list of token ids, not {type(text).__name__}")
        return self.tokenizer.encode(text)

    def _prompt_ids(self, prompt):
        """A prompt to run: text encoded (checked to fit the model), or the caller's token ids as given."""
        if not isinstance(prompt, str):
            return prompt
        ids = self.encode(prompt)
        # an export whose tokenizer is larger than the model's vocabulary (e.g. --tokenizer world on a
        # byte-level model): say so, not as an anonymous bad token id at the first step
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise RuntimeUserError(
                f"the model's tokenizer ({self.manifest.tokenizer.get('kind', 'none')}) encoded the "
                f"prompt to token id {bad}, outside the model's vocabulary [0, {self.vocab_size}): "
                "the export's tokenizer does not fit this model; re-export with the right --tokenizer"
            )
        return ids

    def decode(self, ids) -> str:
        """Token ids (integers >= 0; the tokenizer checks its own range) -> text."""
        try:
            t = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids))  # any iterable of ids, as before
        except (TypeError, ValueError):  # not iterable; ragged
            t = np.asarray([None], dtype=object)
        if t.ndim != 1 or (t.size and t.dtype.kind not in "iu"):
            raise RuntimeUserError(f"decode needs a list of integer token ids, not {str(ids)[:40]!r}")
        if t.size and (t.min() < 0 or t.max() >= 1 << 32):
            raise RuntimeUserError(f"token id {int(t.min() if t.min() < 0 else t.max())} is not a token id")
        return self.tokenizer.decode([int(i) for i in t])

    # -- state --------------------------------------------------------------------------------
    def new_state(self, batch_size: int = 1) -> State:
        """A fresh state: zeros, except where the manifest says otherwise (RWKV-4's pp = -1e30)."""
        if (
            not isinstance(batch_size, (int, np.integer))
            or isinstance(batch_size, bool)
            or not 1 <= int(batch_size) <= MAX_STATE_BATCH
        ):  # (the bound of saved states too)
            raise RuntimeUserError(f"batch_size must be an integer in [1, {MAX_STATE_BATCH}], not {batch_size!r}")
        arrays = {
            s.name: np.full(s.concrete_shape(int(batch_size)), s.init, dtype=STATE_DTYPES[s.dtype]) for s in self._specs
        }
        for k, v in self._initial.items():
            arrays[k][...] = v[:1]  # broadcast the learned state over the batch
        return self.state_from_numpy(arrays)

    def set_initial_state(self, initial) -> None:
        """Make ``new_state`` start from ``initial`` (an .npz path or {name: array}, batch 1 or any
        leading axis of 1), e.g. a state-tuned state from ``rwkv-export convert-state``."""
        if isinstance(initial, State):
            initial = self._coerce_state(initial, initial.batch_size).numpy()
        if isinstance(initial, dict):
            arrays = check_state_arrays(
                {k: np.asarray(v) for k, v in initial.items()}, self._specs, "initial state", None
            )
        elif not isinstance(initial, (str, os.PathLike)):
            raise RuntimeUserError(
                f"an initial state must be an .npz path, a dict of arrays or a State, not {type(initial).__name__}"
            )
        else:
            p = Path(initial)
            arrays = read_state_npz(p, self._specs, str(p), self.export_id, require_all=False)
        for k, v in arrays.items():
            if v.shape[0] != 1:
                raise RuntimeUserError(f"initial state {k} has batch {v.shape[0]}, expected 1")
        self._initial = arrays

    def state_from_numpy(self, arrays: dict) -> State:
        """Build a state from numpy arrays (checked against the manifest: names, shapes, dtypes).

        The arrays are copied: changing them afterwards does not change the state.
        """
        if not isinstance(arrays, dict):
            raise RuntimeUserError(f"a state must be a dict of arrays, not {type(arrays).__name__}")
        arrays = dict(arrays)
        saved_id = arrays.pop(EXPORT_ID_KEY, None)
        if saved_id is not None and str(saved_id) and self.export_id and str(saved_id) != self.export_id:
            raise RuntimeUserError(
                "this state belongs to another export than the model's; states only load into the model that made them"
            )
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
            if tuple(a.shape) != s.concrete_shape(batch) or batch < 1:
                raise RuntimeUserError(
                    f"state tensor {s.name} has shape {list(a.shape)}, "
                    f"expected {list(s.concrete_shape(max(batch, 1)))} (batch {batch})"
                )
            values[s.name] = self.backend.from_numpy(a)
        extra = set(arrays) - {s.name for s in self._specs}
        if extra:
            raise RuntimeUserError(f"state names {sorted(extra)[0][:60]!r}, which this model has no state tensor for")
        return State(values, self._specs, int(batch), self.backend, self.export_id)

    def load_state(self, path) -> State:
        """A state saved by ``State.save`` (checked: file, names, shapes, sizes, the export it came from)."""
        if not isinstance(path, (str, os.PathLike)):
            raise RuntimeUserError(f"a state file must be a path (str or Path), not {type(path).__name__}")
        path = Path(path)
        return self.state_from_numpy(read_state_npz(path, self._specs, str(path), self.export_id))

    def save_state(self, state: State, path) -> None:
        """``state.save(path)``, refusing a path that is one of this model's files (its graphs, their
        weights files, an engine's sidecar): a state never replaces the model it belongs to."""
        state.save(path, inputs=self._model_files())

    def _model_files(self) -> list:
        from .artifact import is_engine, sidecar_path

        graphs = [self.path] + [p for k in ("step", "sequence") for p in (self.artifact.companion_path(k),) if p]
        files = list(graphs)
        weights = self.manifest.options.get("weights_file")
        if isinstance(weights, str) and weights:
            files.append(self.path.with_name(weights))
        for g in graphs:
            files.append(g.with_name(g.name + ".data"))  # an older export's per-graph weights file
            if is_engine(g):
                files.append(sidecar_path(g))
        return files

    def _coerce_state(self, state, batch: int) -> State:
        if state is None:
            return self.new_state(batch)
        if isinstance(state, dict):
            state = self.state_from_numpy(state)
        if not isinstance(state, State):
            raise RuntimeUserError(
                f"state must be a State (from new_state) or a dict of arrays, not {type(state).__name__}"
            )
        if state.export_id and self.export_id and state.export_id != self.export_id:
            raise RuntimeUserError("this state belongs to another export than the model's")
        if state._backend is not self.backend:
            state = self.state_from_numpy(state.numpy())
        if state.batch_size != batch:
            raise RuntimeUserError(f"state is for a batch of {state.batch_size}, but {batch} token row(s) were given")
        return state

    def _tokens(self, tokens, ndim: int) -> np.ndarray:
        try:
            t = np.asarray(tokens)
        except ValueError:  # ragged lists
            raise RuntimeUserError(
                "tokens must be a rectangular array of integers (use prefill_many for prompts of different lengths)"
            ) from None
        if t.size == 0:  # (numpy reads [] as float64: it would be refused as "not integers")
            raise RuntimeUserError(f"no tokens given (shape {list(t.shape)}); at least one token id is needed")
        if t.dtype.kind not in "iu":
            raise RuntimeUserError(f"token ids must be integers, not {t.dtype}")
        if ndim == 1 and t.ndim == 0:
            t = t.reshape(1)
        if ndim == 2 and t.ndim == 1:
            t = t.reshape(1, -1)
        if t.ndim != ndim or t.size == 0:
            raise RuntimeUserError(
                f"tokens must have shape {'[batch]' if ndim == 1 else '[batch, T]'}, got {list(t.shape)}"
            )
        bad = (t < 0) | (t >= self.vocab_size)
        if bad.any():
            raise RuntimeUserError(f"token id {int(t[bad][0])} is outside [0, {self.vocab_size})")
        return np.ascontiguousarray(t, dtype=np.int64)

    def _state(self, values: dict, batch: int) -> State:
        return State(values, self._specs, batch, self.backend, self.export_id)

    # -- running --------------------------------------------------------------------------------
    def step(self, tokens, state=None):
        """One token per sequence: tokens [batch] -> (logits float32 [batch, vocab], new State).

        ``state`` is read, never written: keep it to branch from it again.
        """
        t = self._tokens(tokens, 1)
        st = self._coerce_state(state, t.shape[0])
        logits, values = self.backend.run("step", t, st._values, self._specs)
        return logits, self._state(values, st.batch_size)

    def prefill(self, tokens, state=None, chunk_size: int | None = None):
        """A prompt per sequence: tokens [batch, T] -> (logits of the last position [batch, vocab], State).

        Uses the sequence graph in chunks of ``chunk_size`` tokens (the result does not depend on the
        chunk size beyond float rounding); without a sequence graph it steps token by token.
        """
        t = self._tokens(tokens, 2)
        st = self._coerce_state(state, t.shape[0])
        values = st._values
        chunk = self.prefill_chunk if chunk_size is None else chunk_size
        if not isinstance(chunk, (int, np.integer)) or isinstance(chunk, bool) or chunk < 1:
            raise RuntimeUserError(f"chunk_size must be an integer >= 1, not {chunk!r}")
        chunk = int(chunk)
        logits = None
        if self.backend.has("sequence"):
            for s in range(0, t.shape[1], chunk):
                logits, values = self.backend.run("sequence", t[:, s : s + chunk], values, self._specs)
            if logits.ndim == 3:  # a graph exported with all_logits: keep the last position
                logits = logits[:, -1]
        else:
            for j in range(t.shape[1]):
                logits, values = self.backend.run("step", np.ascontiguousarray(t[:, j]), values, self._specs)
        return logits, self._state(values, st.batch_size)

    def prefill_many(self, prompts: list, state=None, chunk_size: int | None = None):
        """Prompts of different lengths as one batch -> (last logits [N, vocab], State); see batch.py."""
        from .batch import prefill_many

        return prefill_many(self, prompts, state, chunk_size)

    # -- scoring (log-probabilities of given tokens; runtime/scoring.py) --------------------------------
    def score(
        self, tokens, state=None, start: int = 1, logits=None, top_k: int = 0, chunk_size: int | None = None, stop=None
    ):
        """Log-probabilities of the tokens themselves: tokens [batch, T] -> ``scoring.Scores``.

        Position ``j >= start`` gets log_softmax (float64) of the logits after ``tokens[:, :j]`` at
        ``tokens[:, j]``, whether it is the argmax, and the ``top_k`` most likely tokens; ``tokens[:, :start]``
        are only prefilled. ``start=0`` scores the first token too, from ``logits`` (the logits that
        predict it, e.g. a previous call's ``Scores.logits``), so a long text can be scored piece by piece.
        Memory stays bounded (see scoring.py): all-logits sequence graph in chunks, else one step a token.
        ``Scores.state``/``.logits`` continue after the last token. ``top_k`` past the vocabulary means
        every token. ``stop``: a callable asked before each model run of the scored part; when it returns
        True the call raises ``scoring.ScoringStopped`` (a server abandoning a long prompt at shutdown).
        """
        from .scoring import score

        return score(self, tokens, state, start, logits, top_k, chunk_size, stop)

    def generate_tokens(
        self, prompt_tokens, max_new_tokens: int = 100, sampling: SamplingParams | None = None, state=None
    ) -> Iterator[int]:
        """Prefill the prompt, then sample and step; yields token ids as they are produced."""
        for out in self._one_row(prompt_tokens, max_new_tokens, sampling, state, None, text=False):
            if out.appended:
                yield out.token

    def _one_row(self, prompt_tokens, max_new_tokens, sampling, state, holder, text: bool):
        """One sequence as a batch of one on the generation core: yields each step's ``Out`` (before the
        model runs the token, so a consumer sees it at once); ``holder.state``: the state after the last
        token run (the prompt, then each generated token; not a stop token)."""
        sampler = Sampler(sampling or SamplingParams(), vocab_size=self.vocab_size)
        ids = nonempty_list(prompt_tokens, *PROMPT_ERRORS)
        if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
            raise RuntimeUserError(f"max_new_tokens must be an integer >= 0, not {max_new_tokens!r}")
        logits, st = self.prefill(np.asarray([ids]), state)
        if holder is not None:
            holder.state = st
        if not max_new_tokens:
            return
        row = Row(
            sampler,
            max_new_tokens=int(max_new_tokens),
            text=TextStream(self.tokenizer) if text else None,
            feed_last=True,
            keep_state=True,
        )
        batch = Batch(self, log_failures=False)  # (the error is raised to the caller)
        batch.add(row, st, logits)
        while batch.rows:
            (out,) = batch.sample()
            if out.error is not None:
                raise out.error
            yield out
            failed = batch.advance()
            if failed:
                raise failed[0].error
            if holder is not None:
                holder.state = batch.state if batch.rows else row.final

    def generate(
        self, prompt, max_new_tokens: int = 100, sampling: SamplingParams | None = None, state=None, **sampling_kwargs
    ) -> Generation:
        """Stream text: returns a ``Generation``, an iterator of decoded text pieces with its own ``stats``.

        ``prompt`` is text (or a list of token ids); sampling settings as ``SamplingParams`` or keywords
        (temperature, top_p, top_k, presence_penalty, frequency_penalty, penalty_decay, seed, ban, stop,
        logit_bias).
        Text is encoded by the model's tokenizer (see tokenizers.py for text that is not valid UTF-8).
        Each call has its own statistics (``gen.stats``), so concurrent calls never mix them.
        """
        if sampling is None:
            try:
                sampling = SamplingParams(**sampling_kwargs)
            except TypeError as e:
                raise RuntimeUserError(f"unknown sampling setting ({e})") from None
        elif sampling_kwargs:
            raise RuntimeUserError("give sampling settings either as SamplingParams or as keywords, not both")
        ids = self._prompt_ids(prompt)
        return Generation(self, ids, max_new_tokens, sampling, state)


class Generation:
    """One generate() call: iterate it for text pieces; ``stats`` and ``state`` belong to this call."""

    def __init__(self, session: Session, ids, max_new_tokens, sampling, state):
        Sampler(sampling, vocab_size=session.vocab_size)  # check the settings now, not at the first token
        self.session = session
        self.state = None  # the state after the last token (continue a conversation from it)
        ids = nonempty_list(ids, *PROMPT_ERRORS)
        # checked now, not at the first next(): a bad token id, or a model without a tokenizer to decode
        # with, is an error of the call (the CLI prints nothing before it)
        session._tokens([ids], 2)
        _ = session.tokenizer  # made (or refused) now
        self.stats = {"prompt_tokens": len(ids), "new_tokens": 0, "prefill_s": 0.0, "decode_s": 0.0}
        self._it = self._run(ids, max_new_tokens, sampling, state)

    def __iter__(self):
        return self

    def __next__(self) -> str:
        return next(self._it)

    def _run(self, ids, max_new_tokens, sampling, state):
        s, stats = self.session, self.stats
        t0 = time.perf_counter()
        first = True
        for out in s._one_row(ids, max_new_tokens, sampling, state, self, text=True):
            now = time.perf_counter()
            if first and out.appended:
                stats["prefill_s"], t0, first = now - t0, now, False
            stats["new_tokens"] += out.appended
            if out.text:
                yield out.text
            stats["decode_s"] = time.perf_counter() - t0
        if first:  # no token came (max_new_tokens 0, or a stop token first): the time was all prefill
            stats["prefill_s"] = time.perf_counter() - t0
