"""``rwkv-export eval``: task scores of an export, optionally beside its PyTorch reference.

LAMBADA is scored as BlinkDL's RWKV-LM scripts score it (RWKV-v7/rwkv_v7_demo.py, Albatross ``eval``):
each document's text is split at its last space into a context and a target, the target being " " + the
last word; the context is encoded with a token prepended (``pad``, 0 = ``<|endoftext|>`` in the Pile
and World vocabularies), the target encoded on its own; the document's score is the sum of the target
tokens' log-probabilities (log-softmax of the logits after everything before it), and it counts as
correct when every target token is the argmax of its logits. Perplexity is exp(-sum of the document
scores / documents) -- per document, not per token, as BlinkDL computes it -- and accuracy the share
of correct documents.

``perplexity`` scores every token of a text file (after the prepended token): exp(-mean log-probability
per token).

Both run batched: documents sorted by context length, ``batch`` at a time, the contexts prefilled
together (rows of different lengths advance together, then the longer ones alone: no padding, so no
row's state is touched by another's tokens), then the target tokens stepped for the rows that still
have one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rwkv_runtime.errors import RuntimeUserError

from ..errors import ExportError


@dataclass
class TaskResult:
    task: str
    perplexity: float
    accuracy: float | None  # LAMBADA only
    items: int  # documents (lambada) or scored tokens (perplexity)
    logprobs: np.ndarray  # per document (lambada) or per token (perplexity), float64
    correct: np.ndarray | None  # per document (lambada)


# -- data -------------------------------------------------------------------------------------------
def read_lambada(path, limit: int | None = None) -> list[tuple[str, str]]:
    """(context, " " + last word) for each line ``{"text": ...}`` of a LAMBADA-format .jsonl file."""
    path = Path(path)
    out = []
    try:
        f = open(path, encoding="utf-8")
    except IsADirectoryError:
        raise ExportError(f"{path}: is a folder, not a .jsonl file") from None
    with f:
        lines = enumerate(f, 1)
        while True:
            try:
                n, line = next(lines)
            except StopIteration:
                break
            except UnicodeDecodeError as e:  # (decoded a block at a time: no line number to give)
                raise ExportError(f"{path}: not UTF-8 text ({e.reason})") from None
            if limit is not None and len(out) >= limit:
                break
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except ValueError as e:
                raise ExportError(f"{path}, line {n}: not JSON ({e})") from None
            text = doc.get("text") if isinstance(doc, dict) else None
            if not isinstance(text, str):
                raise ExportError(f'{path}, line {n}: expected an object with a "text" string')
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:  # a JSON escape "\ud800" alone is no character
                raise ExportError(
                    f"{path}, line {n}: the text holds a lone surrogate ({text[e.start]!a}), not a character"
                ) from None
            if " " not in text.strip(" ") or text.endswith(" "):
                raise ExportError(f"{path}, line {n}: the text has no last word after a space to predict")
            ctx, last = text.rsplit(" ", 1)
            out.append((ctx, " " + last))
    if not out:
        raise ExportError(f"{path}: no documents")
    return out


def _read_text(path) -> str:
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except IsADirectoryError:
        raise ExportError(f"{path}: is a folder, not a text file") from None
    except UnicodeDecodeError as e:
        raise ExportError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


# -- the two models behind one small interface ----------------------------------------------------------
class ExportRunner:
    """An export, through ``rwkv_runtime.Session``."""

    def __init__(self, session):
        self.s = session
        self.vocab_size = session.vocab_size

    def prefill(self, prompts: list):
        return self.s.prefill_many(prompts)

    def step(self, tokens: np.ndarray, state):
        return self.s.step(tokens, state)

    @staticmethod
    def select(state, rows: list):
        return state.select(rows)

    def token_logprobs(self, tokens: list, piece: int = 4096) -> np.ndarray:
        """log P(tokens[j] | tokens[:j]) for j >= 1, the text scored ``piece`` tokens at a time."""
        out, logits, state = [], None, None
        for s in range(0, len(tokens), piece):
            part = np.asarray([tokens[s : s + piece]])
            sc = self.s.score(part, state, start=1 if s == 0 else 0, logits=logits)
            out.append(sc.logprobs[0, sc.start :])
            logits, state = sc.logits, sc.state
        return np.concatenate(out)


class ReferenceRunner:
    """The checkpoint's PyTorch reference (the per-version ``Model`` of rwkv_export.arch), float32."""

    def __init__(self, checkpoint, chunk: int = 64):
        from ..export import reference_model

        self.m = reference_model(checkpoint)
        self.vocab_size = self.m.cfg["vocab_size"] if hasattr(self.m, "cfg") else None
        self.chunk = chunk

    def _seq(self, tokens: np.ndarray, state):
        """All logits [B, T, V] (numpy float32) and the state after the last token, in time chunks."""
        import torch

        outs = []
        with torch.no_grad():
            for s in range(0, tokens.shape[1], self.chunk):
                lg, state = self.m.sequence(
                    torch.from_numpy(np.ascontiguousarray(tokens[:, s : s + self.chunk])), state
                )
                outs.append(lg.float().numpy())
        return np.concatenate(outs, 1), state

    def prefill(self, prompts: list):
        import torch

        n = len(prompts)
        lengths = [len(p) for p in prompts]
        state = self.m.new_state(n)
        logits = None
        pos = 0
        for end in sorted(set(lengths)):  # as prefill_many: no padding, shrinking to the longer rows
            rows = [i for i in range(n) if lengths[i] >= end]
            sub = {k: v[rows] for k, v in state.items()}
            lg, sub = self._seq(np.array([prompts[i][pos:end] for i in rows], np.int64), sub)
            if logits is None:
                logits = np.zeros((n, lg.shape[-1]), np.float32)
            idx = torch.tensor(rows)
            for k, v in sub.items():
                state[k] = state[k].clone()
                state[k][idx] = v
            logits[rows] = lg[:, -1]
            pos = end
        return logits, state

    def step(self, tokens: np.ndarray, state):
        import torch

        with torch.no_grad():
            lg, state = self.m.step(torch.from_numpy(np.asarray(tokens, np.int64)), state)
        return lg.float().numpy(), state

    @staticmethod
    def select(state, rows: list):
        return {k: v[rows] for k, v in state.items()}

    def token_logprobs(self, tokens: list, piece: int = 4096) -> np.ndarray:
        from rwkv_runtime.scoring import log_softmax

        out, prev, state = [], None, self.m.new_state(1)
        for s in range(0, len(tokens), piece):
            part = np.asarray([tokens[s : s + piece]], np.int64)
            lg, state = self._seq(part, state)
            lg = lg[0]
            if prev is not None:
                lg = np.concatenate([prev[None], lg])
                tgt = part[0]
            else:
                tgt = part[0, 1:]
            lp = log_softmax(lg[: len(tgt)])
            out.append(lp[np.arange(len(tgt)), tgt])
            prev = lg[-1]
        return np.concatenate(out)


# -- scoring --------------------------------------------------------------------------------------------
def score_targets(runner, items: list, batch: int = 16, progress=None) -> tuple[np.ndarray, np.ndarray]:
    """``items``: (context ids, target ids) pairs, each context non-empty. Per item: the sum of the
    target tokens' log-probabilities (float64) and whether every target token was the argmax."""
    from rwkv_runtime.scoring import log_softmax

    n = len(items)
    total = np.zeros(n)
    correct = np.ones(n, bool)
    order = sorted(range(n), key=lambda i: len(items[i][0]))  # similar lengths prefill together
    for b in range(0, n, batch):
        ids = order[b : b + batch]
        logits, state = runner.prefill([items[i][0] for i in ids])
        rows = list(range(len(ids)))  # positions in `ids` of the rows still in `logits`/`state`
        j = 0
        while rows:
            tgt = np.array([items[ids[r]][1][j] for r in rows], np.int64)
            lp = log_softmax(logits)
            total[[ids[r] for r in rows]] += lp[np.arange(len(rows)), tgt]
            wrong = np.argmax(logits, -1) != tgt
            correct[[ids[r] for r, w in zip(rows, wrong) if w]] = False
            keep = [k for k, r in enumerate(rows) if len(items[ids[r]][1]) > j + 1]
            if not keep:
                break
            if len(keep) != len(rows):
                state = runner.select(state, keep)
            logits, state = runner.step(tgt[keep], state)
            rows = [rows[k] for k in keep]
            j += 1
        if progress is not None:
            progress(len(ids))
    return total, correct


def encode_lambada(encode, docs: list, pad: int | None) -> list:
    items = []
    for ctx, tgt in docs:
        src = ([pad] if pad is not None else []) + list(encode(ctx))
        dst = list(encode(tgt))
        if not src:
            raise ExportError("a document's context is empty and no token is prepended (--pad-token none)")
        items.append((src, dst))
    return items


def lambada(runner, items: list, batch: int = 16, progress=None) -> TaskResult:
    total, correct = score_targets(runner, items, batch, progress)
    return TaskResult("lambada", math.exp(-total.sum() / len(items)), float(correct.mean()), len(items), total, correct)


def perplexity(runner, tokens: list) -> TaskResult:
    if len(tokens) < 2:
        raise ExportError("the text has no token to score")
    lp = runner.token_logprobs(tokens)
    return TaskResult("perplexity", math.exp(-lp.mean()), None, len(lp), lp, None)


def check_tokens(items_or_tokens, vocab: int, what: str):
    if what == "lambada":
        flat = (t for item in items_or_tokens for part in item for t in part)
    else:
        flat = iter(items_or_tokens)
    bad = next((t for t in flat if not 0 <= t < vocab), None)
    if bad is not None:
        raise RuntimeUserError(
            f"token id {bad} is outside the model's vocabulary [0, {vocab}) (wrong --pad-token, "
            "or an export whose tokenizer does not fit the model)"
        )
