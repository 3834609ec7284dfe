"""Several independent sequences in one batch: each with its own state row and sampling settings;
sequences join (prefilled, then their state rows appended) and leave (rows dropped) between steps.

    gen = BatchGenerator(session)
    a = gen.add("Hello", SamplingParams(temperature=0))
    b = gen.add("Once upon a time", SamplingParams(seed=1))
    for _ in range(20):
        for seq_id, token in gen.step().items(): ...
    gen.remove(a)
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from .errors import RuntimeUserError
from .sampling import Sampler, SamplingParams
from .state import State


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
        raise RuntimeUserError(f"state must be a State (from new_state) or a dict of arrays, not {type(state).__name__}")
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


@dataclass
class _Seq:
    sampler: Sampler
    logits: np.ndarray
    tokens: list


class BatchGenerator:
    """Continuous batching for an app with several conversations (or a server)."""

    def __init__(self, session):
        self.session = session
        self.state: State | None = None
        self.order: list = []  # seq ids, in state-row order
        self.seqs: dict = {}
        self._ids = itertools.count()

    def add(self, prompt, sampling: SamplingParams | None = None, state: State | None = None) -> int:
        """Prefill a new sequence and append its state row to the running batch; returns its id."""
        sampler = Sampler(sampling or SamplingParams(), vocab_size=self.session.vocab_size)  # checked first
        try:
            ids = list(self.session._prompt_ids(prompt))
        except TypeError:
            raise RuntimeUserError("the prompt must be text or a list of token ids") from None
        if not ids:
            raise RuntimeUserError("the prompt is empty")
        logits, st = self.session.prefill(np.asarray([ids]), state)
        seq_id = next(self._ids)
        self.seqs[seq_id] = _Seq(sampler, logits[0], [])
        self.state = st if self.state is None else State.concat([self.state, st])
        self.order.append(seq_id)
        return seq_id

    def remove(self, seq_id: int) -> list:
        """Drop a sequence from the batch; returns the tokens it generated."""
        if not isinstance(seq_id, (int, np.integer)) or seq_id not in self.seqs:
            raise RuntimeUserError(f"no sequence {seq_id} in this batch")
        row = self.order.index(seq_id)
        keep = [i for i in range(len(self.order)) if i != row]
        self.state = self.state.select(keep) if keep else None
        self.order.pop(row)
        return self.seqs.pop(seq_id).tokens

    def step(self) -> dict:
        """Sample one token for every sequence (each with its own sampler), then advance them all."""
        if not self.order:
            return {}
        toks = np.array([self.seqs[s].sampler(self.seqs[s].logits) for s in self.order], dtype=np.int64)
        logits, self.state = self.session.step(toks, self.state)
        out = {}
        for row, s in enumerate(self.order):
            self.seqs[s].logits = logits[row]
            self.seqs[s].tokens.append(int(toks[row]))
            out[s] = int(toks[row])
        return out
