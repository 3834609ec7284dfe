"""The generation core: every front end runs its sequences through this one module.

``Session.generate``/``generate_tokens`` (a batch of one), ``BatchGenerator``, ``prefill_many``, the
server's engine (which only schedules admission, prefill and events around it) and the Triton Python
model all use it:

- ``Batch``: the rows being decoded, one state row each (rows join after their prompt and leave when
  they finish, between steps). ``sample()`` picks one token for every row and turns it into text;
  ``advance()`` runs ONE model step for the rows still running. A failure in one row (its constraint,
  sampler, tokenizer, stop matching, logprobs, or its part of the model step) ends that row alone with
  its error (logged with its traceback); the other rows carry on.
- ``Row``: one sequence: its ``Sampler`` (sampling.py), limits, stop token ids, optional ``TextStream``
  and the ``constraint`` hook.
- ``TextStream``: token ids -> text pieces (tokenizers.py's ``StreamDecoder``), stop strings
  (``StopMatcher``, bounded work per token) and OpenAI-style log-probabilities delivered with the text
  they complete.
- ``step_rows`` / ``prefill_rows``: the model step/prefill of independent sequences as one batch, with
  per-row failure (the batch is retried row by row when it fails as a whole).

Constrained decoding plugs in at ONE place, ``Row.constraint`` (see ``Constraint``): before every
token the core asks it for a mask of allowed tokens (applied by the Sampler before sampling, greedy
included), and after the token it tells it the token; a constraint that says it is complete ends the
row with finish reason ``"stop"``.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .errors import RuntimeUserError
from .sampling import Sampler, _log_softmax
from .state import State
from .tokenizers import StreamDecoder

log = logging.getLogger("rwkv_runtime.generation")

__all__ = [
    "Batch",
    "Row",
    "Out",
    "Constraint",
    "TextStream",
    "StopMatcher",
    "TokenLogprob",
    "token_logprob",
    "step_rows",
    "prefill_rows",
    "prefill_many",
]


# -- stop strings ------------------------------------------------------------------------------------
class StopMatcher:
    """Stop strings across text pieces: text is delivered except the tail that could still begin a stop
    string; the first piece that completes one ends the text where the earliest-starting stop string
    begins (the same result as ``str.find`` on all the text so far, after each piece).

    Bounded work: for every stop string it keeps the length of the longest suffix of the text that is a
    prefix of it (Knuth-Morris-Pratt; the failure table is built lazily, only as far as the text has
    matched), so each new character costs amortised O(1) per stop string and the held text is never
    re-searched: the total cost is linear in the text, whatever the stop strings' length.
    """

    def __init__(self, stops=()):
        self.stops = [s for s in dict.fromkeys(stops) if s]  # ("" could never be held back: ignored)
        self._j = [0] * len(self.stops)  # matched prefix length per stop string
        self._fail = [[] for _ in self.stops]  # KMP failure table per stop string, built on demand
        self._held: collections.deque = collections.deque()  # the held text, as pieces
        self._held_len = 0

    @property
    def held(self) -> str:
        return "".join(self._held)

    def _failure(self, i: int, q: int) -> int:
        """The longest proper prefix of stops[i][:q + 1] that is also a suffix of it."""
        x, f = self.stops[i], self._fail[i]
        while len(f) <= q:
            m = len(f)
            k = f[m - 1] if m else 0
            if m:
                while k and x[m] != x[k]:
                    k = f[k - 1]
                if x[m] == x[k]:
                    k += 1
            f.append(k)
        return f[q]

    def _scan(self, i: int, piece: str) -> int:
        """Advance stop string i over ``piece``; the index in ``piece`` where it first completes, or -1."""
        x, j = self.stops[i], self._j[i]
        n = len(x)
        k0 = 0
        if j == 0:  # C-speed skip to the first character that can start it
            k0 = piece.find(x[0])
            if k0 < 0:
                return -1
        elif j + len(piece) <= n and x.startswith(piece, j):  # the piece continues the match
            self._j[i] = j + len(piece)
            return len(piece) - 1 if j + len(piece) == n else -1
        for k in range(k0, len(piece)):
            c = piece[k]
            while j and c != x[j]:
                j = self._failure(i, j - 1)
            if c == x[j]:
                j += 1
                if j == n:
                    self._j[i] = j
                    return k
        self._j[i] = j
        return -1

    def push(self, piece: str) -> tuple[str, bool]:
        """(the text deliverable now, whether a stop string completed: the text ends before it)."""
        if not self.stops:
            return piece, False
        first = None  # where the earliest-starting stop string starts, counted from the held text's start
        for i, x in enumerate(self.stops):
            k = self._scan(i, piece)
            if k >= 0:
                start = self._held_len + k + 1 - len(x)
                first = start if first is None else min(first, start)
        if first is not None:
            text = self._take(first, piece)
            self._held.clear()
            self._held_len = 0
            return text, True
        hold = max(self._j)
        return self._take(self._held_len + len(piece) - hold, piece, keep=True), False

    def _take(self, n: int, piece: str, keep: bool = False) -> str:
        """The first ``n`` characters of held text + ``piece`` (O(n + pieces)); ``keep``: the rest stays held."""
        if piece:
            self._held.append(piece)
            self._held_len += len(piece)
        out = []
        while n > 0 and self._held:
            c = self._held[0]
            if len(c) <= n:
                out.append(self._held.popleft())
                n -= len(c)
                self._held_len -= len(c)
            else:
                out.append(c[:n])
                self._held[0] = c[n:]
                self._held_len -= n
                n = 0
        if not keep:
            self._held.clear()
            self._held_len = 0
        return "".join(out)

    def release(self) -> str:
        """At the end of the text (no more pieces): the held text, which can no longer begin a stop string."""
        text = self.held
        self._held.clear()
        self._held_len = 0
        self._j = [0] * len(self.stops)
        return text


# -- log-probabilities --------------------------------------------------------------------------------
class TokenLogprob:
    """One generated token: its log-probability, the ``k`` most likely tokens of its position, and
    (filled in once the token's text is decoded) the characters it produced, ``[start, end)`` in the
    generated text."""

    __slots__ = ("token", "logprob", "top", "start", "end")

    def __init__(self, token: int, logprob: float, top: tuple):
        self.token, self.logprob, self.top = token, logprob, top  # top: ((id, logprob), ...), most likely first
        self.start = self.end = None


def token_logprob(logits: np.ndarray, token: int, k: int) -> TokenLogprob:
    """log_softmax of the model's logits for the position (float64; before temperature, top-p/top-k,
    penalties and constraints, as vLLM reports them), for ``token`` and the ``k`` most likely (ties:
    lower id first)."""
    lp = _log_softmax(np.asarray(logits, dtype=np.float64))
    top = ()
    k = min(k, lp.size)
    if k:
        kth = np.partition(lp, lp.size - k)[lp.size - k]  # O(vocab): no full sort for 20 of 65536
        ids = np.flatnonzero(lp >= kth)  # (all the tokens tied with the k-th)
        ids = ids[np.lexsort((ids, -lp[ids]))][:k]
        top = tuple(zip(ids.tolist(), lp[ids].tolist()))
    return TokenLogprob(int(token), float(lp[token]), top)


# -- text -------------------------------------------------------------------------------------------
class TextStream:
    """One row's text: tokens -> pieces (``StreamDecoder``), stop strings (``StopMatcher``), and the
    ``TokenLogprob`` entries delivered with the text that completes them (on a stop string: every token
    that produced some delivered text; the rest are never reported)."""

    def __init__(self, tokenizer, stops=(), logprobs: bool = False):
        self.decoder = StreamDecoder(tokenizer)
        self.stops = StopMatcher(stops)
        self.lp_wait = collections.deque() if logprobs else None  # entries not yet delivered
        self.decoded = self.sent = 0  # characters decoded / delivered so far

    def push(self, token: int, entry: TokenLogprob | None = None) -> tuple[str, list | None, bool]:
        """(text deliverable now, the entries it completes (None: not asked for), stopped)."""
        if self.lp_wait is not None:
            self.lp_wait.append(entry)
        piece = self.decoder.push(token)
        if not self.decoder.pending:  # (else the piece is an incomplete character, held by the decoder)
            self._decoded(piece)
        text, stopped = self.stops.push(piece)
        return text, self._deliver(text, stopped), stopped

    def finish(self) -> tuple[str, list | None, bool]:
        """At the end of the row (not on a stop string): what was held back, an incomplete character or
        the start of a stop string; stopped is True if that completed a stop string after all."""
        piece = self.decoder.flush()
        self._decoded(piece)
        text, stopped = self.stops.push(piece)
        if not stopped:
            text += self.stops.release()
        return text, self._deliver(text, stopped), stopped

    def _decoded(self, piece: str):
        """The tokens waiting for their text (a multi-byte character's pieces) produced ``piece``."""
        if self.lp_wait is None:
            return
        for e in reversed(self.lp_wait):
            if e.end is not None:
                break
            e.start, e.end = self.decoded, self.decoded + len(piece)
        self.decoded += len(piece)

    def _deliver(self, text: str, stopped: bool):
        self.sent += len(text)  # (also read without logprobs: a returned state's tail starts here)
        if self.lp_wait is None:
            return None
        out = []
        w = self.lp_wait
        while w and w[0].end is not None and (w[0].start < self.sent if stopped else w[0].end <= self.sent):
            out.append(w.popleft())
        if stopped:
            w.clear()
        return out


# -- rows ---------------------------------------------------------------------------------------------
class Constraint(Protocol):
    """The per-row hook for constrained decoding (set ``Row.constraint``).

    ``allowed()`` is asked before every token of the row: a bool array [vocab] (True = allowed) applied
    to the logits before sampling (greedy included), or None for no restriction. ``advance(token)`` is
    told every token the row produced; it returns True when the constraint is complete, which ends the
    row (finish reason ``"stop"``). An exception from either ends that row alone with the error.
    """

    def allowed(self) -> np.ndarray | None: ...

    def advance(self, token: int) -> bool: ...


class Row:
    """One sequence in a ``Batch``.

    ``max_new_tokens``: None for no limit. ``stop_ids``: token ids that end the row (not part of its
    tokens; default the sampler's ``stop``). ``text``: a ``TextStream`` (None: tokens only).
    ``logprobs``: report each token's log-probability with this many alternatives (None: off; needs
    ``text``). ``deadline``: a ``time.perf_counter()`` after which the row ends with ``"timeout"``.
    ``feed_last``: the row's final token is run through the model before it leaves (its state then
    includes the whole reply, as ``Session.generate``'s); otherwise a finished row leaves at once with
    the state before its last token. ``keep_state``: keep the final state in ``final``.
    ``key``: anything the front end wants to find its own record by.
    """

    def __init__(
        self,
        sampler: Sampler,
        *,
        max_new_tokens: int | None = None,
        stop_ids=None,
        text: TextStream | None = None,
        logprobs: int | None = None,
        deadline: float | None = None,
        feed_last: bool = False,
        keep_state: bool = False,
        constraint: Constraint | None = None,
        key=None,
    ):
        self.sampler = sampler
        self.max_new_tokens = max_new_tokens
        self.stop_ids = frozenset(sampler.stop if stop_ids is None else stop_ids)
        self.text = text
        self.logprobs = logprobs
        self.deadline = deadline
        self.feed_last = feed_last
        self.keep_state = keep_state
        self.constraint = constraint
        self.key = key
        self.tokens: list = []  # the tokens produced (stop ids excluded)
        self.logits: np.ndarray | None = None  # the logits the next token is sampled from
        self.reason: str | None = None  # why it ended: stop, length, timeout, error
        self.error: BaseException | None = None
        self.final = None  # after it left, with keep_state: its state (State, or {name: array} batch 1)

    def final_arrays(self) -> dict:
        return self.final.numpy() if isinstance(self.final, State) else self.final

    def pick(self) -> int:
        """The next token: the constraint's mask, then the sampler (greedy without anything that changes
        the logits is their argmax: no softmax)."""
        mask = self.constraint.allowed() if self.constraint is not None else None
        if mask is None and self.sampler.plain_greedy:
            t = int(np.argmax(self.logits))
            # argmax picks a NaN or +inf if there is one: checking that one logit catches a damaged row
            if not np.isfinite(self.logits[t]):
                raise RuntimeUserError("sampling: the logits contain NaN or inf (a damaged model or state?)")
            return t
        return self.sampler(self.logits, mask)

    def accept(self, token: int, now: float) -> Out:
        """Take a sampled token: its text (stop strings, logprobs); sets ``reason`` (also on the Out) if
        the row ends here, and then delivers what was held back (``TextStream.finish``)."""
        out = Out(self, token)
        if token in self.stop_ids:
            self.reason = "stop"
            return self._end(out)
        self.tokens.append(token)
        out.appended = True
        stopped = False
        if self.text is not None:
            entry = token_logprob(self.logits, token, self.logprobs) if self.logprobs is not None else None
            out.text, out.logprobs, stopped = self.text.push(token, entry)
        if stopped:
            self.reason = out.reason = "stop"
            return out
        if self.constraint is not None and self.constraint.advance(token):
            self.reason = "stop"
        elif self.max_new_tokens is not None and len(self.tokens) >= self.max_new_tokens:
            self.reason = "length"
        elif self.deadline is not None and now > self.deadline:
            self.reason = "timeout"
        return self._end(out) if self.reason else out

    def _end(self, out: Out) -> Out:
        if self.text is not None:
            text, lps, stopped = self.text.finish()
            out.text += text
            if lps is not None:
                out.logprobs = (out.logprobs or []) + lps
            if stopped:  # the held-back text completed a stop string after all
                self.reason = "stop"
        out.reason = self.reason
        return out


@dataclass
class Out:
    """What one row produced in a step. ``token``: the token sampled (None on a failure); ``appended``:
    it is part of the row's tokens (not a stop id); ``text``/``logprobs``: what to deliver now;
    ``reason``: set when the row ended here; ``error``: the failure that ended it."""

    row: Row
    token: int | None = None
    appended: bool = False
    text: str = ""
    logprobs: list | None = None
    reason: str | None = None
    error: BaseException | None = None


def _failed(row: Row, e: BaseException, what: str, logged: bool = True) -> Out:
    if logged:
        log.exception("%s failed for one row (row %r); the other rows carry on", what, row.key, exc_info=e)
    row.reason, row.error = "error", e
    return Out(row, reason="error", error=e)


def prefill_many(session, prompts: list, state: State | None = None, chunk_size: int | None = None):
    """Prefill prompts of different lengths as one batch; returns (last logits [N, V], State).

    RWKV has no attention mask, so padding would corrupt the state: instead all rows advance together
    while they all have tokens, then the rows with longer prompts continue on their own (a batch
    shrinking to the rows still active), and their states are scattered back.
    """
    try:
        prompts = [list(p) for p in prompts]
    except TypeError:
        raise RuntimeUserError("prefill_many needs a list of prompts, each a list of token ids") from None
    n = len(prompts)
    if n == 0:
        raise RuntimeUserError("prefill_many needs at least one prompt")
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise RuntimeUserError("every prompt needs at least one token")
    if state is not None and not isinstance(state, (State, dict)):
        raise RuntimeUserError(
            f"state must be a State (from new_state) or a dict of arrays, not {type(state).__name__}"
        )
    if isinstance(state, State) and state.batch_size != n:
        raise RuntimeUserError(f"state is for a batch of {state.batch_size}, but {n} prompts were given")
    # checked like every other call's state (export id, batch size, ...), before numpy() drops the export id
    state = session._coerce_state(state, n)
    # numpy() copies: the rows are updated in this copy, never in the caller's state
    arrays = state.numpy()
    logits = np.zeros((n, session.vocab_size), np.float32)
    pos = 0
    for end in sorted(set(lengths)):
        rows = [i for i in range(n) if lengths[i] >= end]  # still active up to `end`
        toks = [prompts[i][pos:end] for i in rows]
        sub = session.state_from_numpy({k: v[rows] for k, v in arrays.items()})
        lg, sub = session.prefill(toks, sub, chunk_size)
        for k, v in sub.numpy().items():
            arrays[k][rows] = v
        logits[rows] = lg
        pos = end
    return logits, session.state_from_numpy(arrays)


# -- model steps with per-row failure ------------------------------------------------------------------
def _isolated(run, n: int, what: str):
    """``run(indices)`` for all n rows at once; if that raises, row by row: [result or exception] per row."""
    try:
        return run(list(range(n)))
    except Exception:  # noqa: BLE001 - find the row(s) it belongs to; the others must not fail with it
        if n == 1:
            raise
        log.exception("%s of %d rows failed as a batch; retrying row by row", what, n)
    out = []
    for i in range(n):
        try:
            out.append(run([i])[0])
        except Exception as e:  # noqa: BLE001
            out.append(e)
    return out


def step_rows(session, tokens, states: list) -> list:
    """One token for each of several independent sequences (each a batch-1 State) as one batched step:
    [(logits [vocab], State) or the exception of that row]. A batch that fails is retried row by row."""
    tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)

    def run(idx):
        joined = states[idx[0]] if len(idx) == 1 else State.concat([states[i] for i in idx])
        logits, new = session.step(tokens[idx], joined)
        if len(idx) == 1:
            return [(logits[0], new)]
        arrays = new.numpy()
        return [
            (logits[j], session.state_from_numpy({k: v[j : j + 1] for k, v in arrays.items()})) for j in range(len(idx))
        ]

    try:
        return _isolated(run, len(states), "a model step")
    except Exception as e:  # noqa: BLE001 - one row: its own error
        return [e]


def prefill_rows(session, chunks: list, states: list, chunk_size: int | None = None) -> list:
    """Token chunks (lists of ids, any lengths) for several sequences (batch-1 States, or None for a
    fresh one), prefilled together (``prefill_many``): [(logits [vocab], State) or that row's exception]."""
    states = [session.new_state(1) if s is None else s for s in states]

    def run(idx):
        st = states[idx[0]] if len(idx) == 1 else State.concat([states[i] for i in idx])
        if len(idx) == 1:
            logits, new = session.prefill(np.asarray([chunks[idx[0]]], dtype=np.int64), st, chunk_size)
            return [(logits[0], new)]
        logits, new = prefill_many(session, [chunks[i] for i in idx], st, chunk_size)
        arrays = new.numpy()
        return [
            (logits[j], session.state_from_numpy({k: v[j : j + 1] for k, v in arrays.items()})) for j in range(len(idx))
        ]

    try:
        return _isolated(run, len(states), "a prefill")
    except Exception as e:  # noqa: BLE001
        return [e]


def _start_constraint(row: Row, session) -> None:
    """A row whose SamplingParams carry a constraint gets its own matcher (compiled for the model's
    tokenizer, cached); the vocabulary's end-of-text token, allowed only once the output is complete,
    ends the row without being part of it."""
    from .constraints import CompiledConstraint, compile_constraint

    c = row.sampler.params.constraint
    if not isinstance(c, CompiledConstraint):
        c = compile_constraint(c, session.tokenizer, session.vocab_size)
    row.constraint = c.start()
    if c.vocab.eos is not None:
        row.stop_ids = row.stop_ids | {c.vocab.eos}


# -- the batch ----------------------------------------------------------------------------------------
class Batch:
    """Rows decoded together: one State whose batch rows are ``rows``, in order.

    >>> b = Batch(session)
    >>> b.add(Row(Sampler(params, session.vocab_size), max_new_tokens=20), state, logits)
    >>> while b.rows:
    ...     outs = b.sample()    # one token per row -> text; finished/failed rows leave
    ...     failed = b.advance()  # one model step for the rows still running
    """

    def __init__(self, session, log_failures: bool = True):
        self.session = session
        self.log_failures = log_failures  # (off where the caller raises the row's error itself)
        self.rows: list[Row] = []
        self.state: State | None = None
        self._next: np.ndarray | None = None  # the tokens sample() picked for the rows, in row order
        self._leaving: list = []  # rows that finished with feed_last: they leave after advance()

    def __len__(self):
        return len(self.rows)

    def add(self, rows, state: State, logits) -> None:
        """Rows join (their prompt already in ``state``, batch len(rows); ``logits`` [len(rows), vocab] or
        one row's [vocab]) between steps."""
        rows = [rows] if isinstance(rows, Row) else list(rows)
        logits = np.asarray(logits)
        if logits.ndim == 1:
            logits = logits[None]
        if state.batch_size != len(rows) or logits.shape[0] != len(rows):
            raise RuntimeUserError(
                f"{len(rows)} rows joining with a state of batch {state.batch_size} and {logits.shape[0]} logits rows"
            )
        if self._next is not None:
            raise RuntimeError("rows join between steps: call advance() after sample() first")
        for r, lg in zip(rows, logits):
            r.logits = lg
            if r.constraint is None and getattr(r.sampler.params, "constraint", None) is not None:
                _start_constraint(r, self.session)  # SamplingParams.constraint: this row's own matcher
        self.state = state if self.state is None else State.concat([self.state, state])
        self.rows.extend(rows)

    def remove(self, row: Row) -> None:
        """A row leaves now (e.g. its client went away), between steps; nothing more is produced for it."""
        if self._next is not None:
            raise RuntimeError("rows leave between steps: call advance() after sample() first")
        i = self.rows.index(row)
        self._drop([i])

    def _drop(self, idx: list) -> None:
        """Rows idx leave; those with keep_state get their state (one copy of the batch for them all)."""
        if not idx:
            return
        st = self.state
        wanted = [i for i in idx if self.rows[i].keep_state]
        if wanted:
            if len(self.rows) == 1:
                self.rows[0].final = st
            else:
                arrays = st.numpy()
                for i in wanted:
                    self.rows[i].final = {k: v[i : i + 1] for k, v in arrays.items()}
        gone = set(idx)
        keep = [i for i in range(len(self.rows)) if i not in gone]
        self.rows = [self.rows[i] for i in keep]
        self.state = None if not keep else st.select(keep) if len(keep) < st.batch_size else st

    def sample(self, now: float | None = None) -> list[Out]:
        """One token for every row (each its own constraint and sampler), turned into text. Rows that
        end leave the batch (with feed_last, after ``advance``); a row that fails ends alone."""
        if self._next is not None:
            raise RuntimeError("sample() twice without advance()")
        now = time.perf_counter() if now is None else now
        outs, toks, leave = [], [], []
        if sum(r.constraint is not None for r in self.rows) > 1:  # all rows' masks at once (engine threads)
            from .constraints import prepare_masks

            prepare_masks([r.constraint for r in self.rows if hasattr(r.constraint, "_bits")])
        for i, row in enumerate(self.rows):
            try:
                out = row.accept(row.pick(), now)
            except Exception as e:  # noqa: BLE001 - this row alone ends; the batch carries on
                outs.append(_failed(row, e, "sampling or decoding", self.log_failures))
                toks.append(0)
                leave.append(i)
                continue
            outs.append(out)
            toks.append(out.token)
            if row.reason is not None:
                if row.feed_last and out.appended:
                    self._leaving.append(row)
                else:
                    leave.append(i)
        toks = np.asarray(toks, dtype=np.int64)
        if leave:
            gone = set(leave)
            toks = toks[[i for i in range(len(self.rows)) if i not in gone]]
            self._drop(leave)
        self._next = toks
        return outs

    def advance(self) -> list[Out]:
        """ONE model step for the rows still in the batch (with the tokens ``sample`` picked); the rows
        that finished with feed_last then leave. A step that fails is retried row by row: the rows whose
        own step fails end with their error (returned as ``Out``s); the others carry on."""
        toks, self._next = self._next, None
        if toks is None:
            raise RuntimeError("advance() without sample()")
        if not self.rows:
            return []
        failed = []
        try:
            logits, new = self.session.step(toks, self.state)
        except Exception as e:  # noqa: BLE001
            if len(self.rows) == 1:
                failed.append(_failed(self.rows[0], e, "a model step", self.log_failures))
                self._leaving.clear()
                self._drop([0])
                return failed
            log.exception("a model step of %d rows failed as a batch; retrying row by row", len(self.rows))
            arrays = self.state.numpy()  # (one copy of the batch, then a batch-1 state per row)
            rows = [
                self.session.state_from_numpy({k: v[i : i + 1] for k, v in arrays.items()})
                for i in range(len(self.rows))
            ]
            results = [step_rows(self.session, toks[i : i + 1], [rows[i]])[0] for i in range(len(rows))]
            bad = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
            for i in bad:
                failed.append(_failed(self.rows[i], results[i], "a model step", self.log_failures))
            good = [i for i in range(len(self.rows)) if i not in set(bad)]
            self.rows = [self.rows[i] for i in good]
            self._leaving = [r for r in self._leaving if r in self.rows]
            if not good:
                self.state = None
                return failed
            logits = np.stack([results[i][0] for i in good])
            new = results[good[0]][1] if len(good) == 1 else State.concat([results[i][1] for i in good])
        for r, lg in zip(self.rows, logits):
            r.logits = lg
        self.state = new
        if self._leaving:
            idx = [self.rows.index(r) for r in self._leaving]
            self._leaving = []
            self._drop(idx)
        return failed

    def step(self, now: float | None = None) -> list[Out]:
        """``sample`` then ``advance``: every row's Out, then those of rows whose model step failed."""
        outs = self.sample(now)
        return outs + self.advance()
