"""Several independent sequences in one batch: each with its own state row and sampling settings;
sequences join (prefilled, then their state rows appended) and leave (rows dropped) between steps.
A thin front end over the generation core (generation.py), which ``Session.generate`` and the server
share.

    gen = BatchGenerator(session)
    a = gen.add("Hello", SamplingParams(temperature=0))
    b = gen.add("Once upon a time", SamplingParams(seed=1))
    for _ in range(20):
        for seq_id, token in gen.step().items(): ...
    gen.remove(a)

A sequence whose step fails (its sampler, or its part of the model step) leaves the batch alone: its
error is in ``gen.failed[seq_id]`` (and logged), ``step()`` carries on with the others, and
``remove(seq_id)`` still returns the tokens it generated.
"""

from __future__ import annotations

import itertools

import numpy as np

from .errors import PROMPT_ERRORS, RuntimeUserError, nonempty_list
from .generation import Batch, Row, prefill_many
from .sampling import Sampler, SamplingParams
from .state import State

__all__ = ["BatchGenerator", "prefill_many"]


class BatchGenerator:
    """Continuous batching for an app with several conversations (or a server)."""

    def __init__(self, session):
        self.session = session
        self._core = Batch(session)
        self.seqs: dict = {}  # seq id -> its Row (its tokens in .tokens)
        self.failed: dict = {}  # seq id -> the exception that ended it
        self._ids = itertools.count()

    @property
    def state(self) -> State | None:
        """The running batch's state (rows in ``order``); None when no sequence runs."""
        return self._core.state

    @property
    def order(self) -> list:
        """The running sequences' ids, in state-row order."""
        return [r.key for r in self._core.rows]

    def add(self, prompt, sampling: SamplingParams | None = None, state: State | None = None) -> int:
        """Prefill a new sequence and append its state row to the running batch; returns its id."""
        sampler = Sampler(sampling or SamplingParams(), vocab_size=self.session.vocab_size)  # checked first
        ids = nonempty_list(self.session._prompt_ids(prompt), *PROMPT_ERRORS)
        logits, st = self.session.prefill(np.asarray([ids]), state)
        seq_id = next(self._ids)
        row = Row(sampler, stop_ids=(), key=seq_id)  # (stop ids are the caller's to act on, as before)
        self._core.add(row, st, logits)
        self.seqs[seq_id] = row
        return seq_id

    def remove(self, seq_id: int) -> list:
        """Drop a sequence from the batch (or forget a failed one); returns the tokens it generated."""
        if not isinstance(seq_id, (int, np.integer)) or seq_id not in self.seqs:
            raise RuntimeUserError(f"no sequence {seq_id} in this batch")
        row = self.seqs.pop(seq_id)
        self.failed.pop(seq_id, None)
        if row in self._core.rows:
            self._core.remove(row)
        return row.tokens

    def step(self) -> dict:
        """Sample one token for every sequence (each with its own sampler), then advance them all:
        {seq id: token} for the sequences that produced one (a failed one is in ``failed`` instead)."""
        out = {}
        if not self._core.rows:
            return out
        for o in self._core.step():
            if o.error is not None:
                self.failed[o.row.key] = o.error
            else:
                out[o.row.key] = o.token
        return out
