"""Per-token log-probabilities (OpenAI's ``logprobs``): computed in the scheduler thread, for the
sequences that ask only, from the raw logits; turned into token strings and bytes on the HTTP side."""
from __future__ import annotations

import numpy as np

from rwkv_runtime.sampling import _log_softmax


class TokenLogprob:
    """One generated token: its log-probability, the ``k`` most likely tokens of its position, and
    (filled in by the engine once the token's text is decoded) the characters it produced,
    ``[start, end)`` in the generated text."""

    __slots__ = ("token", "logprob", "top", "start", "end")

    def __init__(self, token: int, logprob: float, top: tuple):
        self.token, self.logprob, self.top = token, logprob, top  # top: ((id, logprob), ...), most likely first
        self.start = self.end = None


def token_logprob(logits: np.ndarray, token: int, k: int) -> TokenLogprob:
    """log_softmax of the model's logits for the position (float64; before temperature, top-p/top-k and
    penalties, as vLLM reports them), for ``token`` and the ``k`` most likely (ties: lower id first)."""
    lp = _log_softmax(np.asarray(logits, dtype=np.float64))
    top = ()
    k = min(k, lp.size)
    if k:
        kth = np.partition(lp, lp.size - k)[lp.size - k]  # O(vocab): no full sort for 20 of 65536
        ids = np.flatnonzero(lp >= kth)  # (all the tokens tied with the k-th)
        ids = ids[np.lexsort((ids, -lp[ids]))][:k]
        top = tuple(zip(ids.tolist(), lp[ids].tolist()))
    return TokenLogprob(int(token), float(lp[token]), top)


class TokenTexts:
    """Token id -> (text, bytes) as reported: the text is the tokenizer's decoding of that token alone
    (U+FFFD for a piece of a multi-byte character); the bytes are the token's own bytes where the
    tokenizer knows them (``token_bytes``), else the UTF-8 of the text."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self._known: dict = {}  # at most the vocabulary

    def __call__(self, tid: int) -> tuple:
        got = self._known.get(tid)
        if got is None:
            text = self.tok.decode([tid])
            raw = self.tok.token_bytes(tid) if "\ufffd" in text else None
            got = self._known[tid] = (text, raw if raw is not None else text.encode("utf-8"))
        return got
