"""Log-probabilities of given tokens (a prompt, a continuation): ``Session.score``.

Position ``j`` of a row is scored from the logits after ``tokens[:j]``: log_softmax of the raw logits
(float64), whether the token is the argmax, and optionally the ``top_k`` most likely tokens. The logits
of a whole prompt are never held at once: with a sequence graph exported with ``--all-logits`` the tokens
run in chunks whose ``[B, chunk, vocab]`` logits are reduced to these numbers before the next chunk (the
chunk is shrunk for large vocabularies so one block stays near ``_BLOCK_FLOATS`` floats); without it the
scored tokens are stepped one at a time (the unscored prefix is still prefilled with the sequence graph).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import RuntimeUserError

_BLOCK_FLOATS = 1 << 25  # logits held at once while scoring: 128 MiB of float32


@dataclass
class Scores:
    """``Session.score``'s result; arrays are ``[batch, T]`` (``top_*``: ``[batch, T, top_k]``).

    Positions before ``start`` are not scored: ``logprobs`` NaN, ``greedy`` False, ``top_ids`` -1.
    """

    logprobs: np.ndarray  # float64: log P(tokens[:, j] | tokens[:, :j], state)
    greedy: np.ndarray  # bool: tokens[:, j] is the argmax of its logits (the first maximum, as numpy/torch argmax)
    top_ids: np.ndarray  # int64: the top_k (at most vocab) most likely tokens, most likely first (ties: lower id first)
    top_logprobs: np.ndarray  # float64: their log-probabilities
    rank: np.ndarray  # int64: 1 + the number of tokens more likely than tokens[:, j] (vLLM's rank; 0 unscored)
    logits: np.ndarray  # float32 [batch, vocab]: the logits after the last token (predicting the next one)
    state: object  # State after the last token
    start: int

    def total(self) -> np.ndarray:
        """Sum of the scored log-probabilities per row (float64 [batch])."""
        return self.logprobs[:, self.start :].sum(1)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = x.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def top_k(lp: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest entries of each row of ``lp`` [R, V]: (ids, values), most likely first, ties by
    lower id (the order the server's generated-token logprobs use)."""
    R, V = lp.shape
    k = min(k, V)
    ids = np.empty((R, k), np.int64)
    for r in range(R):
        row = lp[r]
        kth = np.partition(row, V - k)[V - k]
        cand = np.flatnonzero(row >= kth)  # every token tied with the k-th, so the lower ids win ties
        ids[r] = cand[np.lexsort((cand, -row[cand]))][:k]
    return ids, np.take_along_axis(lp, ids, 1)


class _Recorder:
    def __init__(self, tokens: np.ndarray, k: int, start: int):
        B, T = tokens.shape
        self.tokens, self.k = tokens, k
        self.logprobs = np.full((B, T), np.nan)
        self.greedy = np.zeros((B, T), bool)
        self.top_ids = np.full((B, T, k), -1, np.int64)
        self.top_logprobs = np.full((B, T, k), np.nan)
        self.rank = np.zeros((B, T), np.int64)
        self.start = start

    def add(self, j0: int, logits: np.ndarray):
        """``logits`` [B, n, V] predict positions j0 .. j0 + n - 1 (those past the end are ignored)."""
        n = min(logits.shape[1], self.tokens.shape[1] - j0)
        if n <= 0:
            return
        B, V = logits.shape[0], logits.shape[2]
        lg = logits[:, :n].reshape(B * n, V)
        tgt = self.tokens[:, j0 : j0 + n].reshape(-1)
        lp = log_softmax(lg)
        rows = np.arange(B * n)
        mine = lp[rows, tgt]
        self.logprobs[:, j0 : j0 + n] = mine.reshape(B, n)
        self.rank[:, j0 : j0 + n] = ((lp > mine[:, None]).sum(-1) + 1).reshape(B, n)
        self.greedy[:, j0 : j0 + n] = (np.argmax(lg, -1) == tgt).reshape(B, n)
        if self.k:
            ids, vals = top_k(lp, self.k)
            self.top_ids[:, j0 : j0 + n] = ids.reshape(B, n, -1)
            self.top_logprobs[:, j0 : j0 + n] = vals.reshape(B, n, -1)


def has_all_logits(session) -> bool:
    """Whether the export's sequence graph returns the logits of every position (``--all-logits``)."""
    if not session.backend.has("sequence"):
        return False
    try:
        man = session.artifact.companion("sequence").manifest
    except Exception:  # noqa: BLE001 - an engine or an artifact without companions: step instead
        return False
    return bool((man.options or {}).get("all_logits"))


class ScoringStopped(Exception):
    """``score``'s ``stop`` callable returned True: the scoring was abandoned between two model runs."""


def score(
    session, tokens, state=None, start: int = 1, logits=None, top_k: int = 0, chunk_size: int | None = None, stop=None
) -> Scores:
    """See ``Session.score``. ``stop``: a callable asked before each model run; when it returns True the
    call raises ``ScoringStopped`` (a server shutting down abandons a long prompt within one run)."""
    t = session._tokens(tokens, 2)
    B, T = t.shape
    for name, v, lo in (("start", start, 0), ("top_k", top_k, 0)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
            raise RuntimeUserError(f"{name} must be an integer >= {lo}, not {v!r}")
    if start > T:
        raise RuntimeUserError(f"start ({start}) is past the end of the tokens ({T})")
    chunk = session.prefill_chunk if chunk_size is None else chunk_size
    if not isinstance(chunk, (int, np.integer)) or isinstance(chunk, bool) or chunk < 1:
        raise RuntimeUserError(f"chunk_size must be an integer >= 1, not {chunk!r}")
    V = session.vocab_size
    if start == 0:
        if logits is None:
            raise RuntimeUserError("start=0 needs the logits that predict the first token (logits=...)")
        try:
            logits = np.asarray(logits, dtype=np.float32)
        except (TypeError, ValueError):
            raise RuntimeUserError("logits must be an array of numbers [batch, vocab]") from None
        if logits.shape != (B, V):
            raise RuntimeUserError(f"logits must have shape [{B}, {V}], not {list(logits.shape)}")
        # (None reads as NaN): a non-finite logit makes the first position's log-probability NaN
        if not np.isfinite(logits).all():
            raise RuntimeUserError("logits hold NaN or infinity; pass the logits a model run returned")
    stopped = stop if stop is not None else (lambda: False)
    st = session._coerce_state(state, B)
    rec = _Recorder(t, min(int(top_k), V), int(start))  # more than the vocabulary: every token
    if start > 0:  # the unscored prefix: plain prefill (the last position's logits only)
        logits, st = session.prefill(t[:, :start], st, chunk)
    values = st._values
    rec.add(start, logits[:, None])
    pos = start
    if pos < T and has_all_logits(session):
        c = max(1, min(int(chunk), _BLOCK_FLOATS // (B * V)))
        while pos < T:
            if stopped():
                raise ScoringStopped()
            lg, values = session.backend.run(
                "sequence", np.ascontiguousarray(t[:, pos : pos + c]), values, session._specs
            )
            rec.add(pos + 1, lg)  # lg[:, i] follows token pos + i, so predicts pos + i + 1
            logits = lg[:, -1]
            pos += lg.shape[1]
    else:
        for j in range(pos, T):
            if stopped():
                raise ScoringStopped()
            logits, values = session.backend.run("step", np.ascontiguousarray(t[:, j]), values, session._specs)
            rec.add(j + 1, logits[:, None])
    return Scores(
        rec.logprobs,
        rec.greedy,
        rec.top_ids,
        rec.top_logprobs,
        rec.rank,
        np.asarray(logits, np.float32),
        session._state(values, st.batch_size),
        int(start),
    )
