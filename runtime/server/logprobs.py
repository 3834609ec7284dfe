"""Per-token log-probabilities (OpenAI's ``logprobs``): computed in the scheduler thread by the
generation core (rwkv_runtime/generation.py: ``TokenLogprob``, ``token_logprob``, aligned with the
delivered text by its ``TextStream``) for the sequences that ask only; turned into token strings and
bytes on the HTTP side here."""

from __future__ import annotations

from rwkv_runtime.generation import TokenLogprob, token_logprob  # noqa: F401 - their old home


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
