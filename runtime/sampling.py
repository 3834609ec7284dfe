"""Sampling with ChatRWKV's semantics (BlinkDL's PIPELINE): top-p cut on the probabilities, then
top-k, then temperature applied to the probabilities; presence/frequency penalties on the logits with
a decaying occurrence count; temperature 0 means greedy. ``logit_bias`` (OpenAI's) is added to the
logits first, as are the penalties, so greedy decoding sees it too.

Computed in log space (float64): the temperature divides log-probabilities, so any temperature > 0
works (0.001 included) without overflow or "probabilities contain NaN". Parameters are checked when a
``Sampler`` is made, logits on every call: NaN/inf, out-of-range values, negative seeds and token ids
outside the vocabulary are a ``RuntimeUserError``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .errors import RuntimeUserError


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 0.85
    top_k: int = 0  # 0: off
    presence_penalty: float = 0.0  # ChatRWKV's alpha_presence
    frequency_penalty: float = 0.0  # ChatRWKV's alpha_frequency
    penalty_decay: float = 0.996  # ChatRWKV's alpha_decay: occurrence counts fade
    seed: int | None = None
    ban: tuple = ()  # token ids never sampled
    stop: tuple = ()  # token ids that end generation
    logit_bias: dict | None = None  # token id -> a finite value added to its logit before sampling
    # constrained decoding (constraints.py): a ConstraintSpec (json_schema(...), regex(...), ...) or a
    # CompiledConstraint; the output then matches it, and the sequence stops when it is complete
    constraint: object = None


def _number(name: str, v, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(float(v)):
        raise RuntimeUserError(f"sampling: {name} must be a finite number, not {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise RuntimeUserError(f"sampling: {name} must be in [{lo}, {hi if hi is not None else 'inf'}], not {v!r}")
    return float(v)


def _ids(name: str, ids, vocab_size: int | None) -> frozenset:
    if isinstance(ids, (int, np.integer)) and not isinstance(ids, bool):
        ids = (ids,)
    try:
        ids = list(ids)
    except TypeError:
        raise RuntimeUserError(f"sampling: {name} must be a list of token ids") from None
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
            raise RuntimeUserError(f"sampling: {name} holds {t!r}, not a token id")
        if t < 0 or (vocab_size is not None and t >= vocab_size):
            raise RuntimeUserError(f"sampling: {name} id {t} is outside the vocabulary [0, {vocab_size})")
    return frozenset(int(t) for t in ids)


def _bias(bias, vocab_size: int | None) -> dict:
    if bias is None:
        return {}
    if not isinstance(bias, dict):
        raise RuntimeUserError(f"sampling: logit_bias must be a dict {{token id: value}}, not {type(bias).__name__}")
    _ids("logit_bias", bias.keys(), vocab_size)  # (ints only: a JSON key "42" is the server's to convert)
    return {int(t): _number(f"logit_bias[{t}]", v) for t, v in bias.items()}


def check_params(p: SamplingParams, vocab_size: int | None = None) -> SamplingParams:
    """Validate every field (one clear error); returns ``p``."""
    if not isinstance(p, SamplingParams):
        raise RuntimeUserError(f"sampling must be SamplingParams, not {type(p).__name__}")
    _number("temperature", p.temperature, 0.0)
    _number("top_p", p.top_p, 0.0, 1.0)
    if isinstance(p.top_k, bool) or not isinstance(p.top_k, (int, np.integer)) or p.top_k < 0:
        raise RuntimeUserError(f"sampling: top_k must be an integer >= 0, not {p.top_k!r}")
    _number("presence_penalty", p.presence_penalty)
    _number("frequency_penalty", p.frequency_penalty)
    _number("penalty_decay", p.penalty_decay, 0.0, 1.0)
    if p.seed is not None and (isinstance(p.seed, bool) or not isinstance(p.seed, (int, np.integer)) or p.seed < 0):
        raise RuntimeUserError(f"sampling: seed must be an integer >= 0 (or None), not {p.seed!r}")
    _ids("ban", p.ban, vocab_size)
    _ids("stop", p.stop, vocab_size)
    _bias(p.logit_bias, vocab_size)
    if p.constraint is not None:
        from .constraints import CompiledConstraint, check_spec

        if isinstance(p.constraint, CompiledConstraint):
            if vocab_size is not None and p.constraint.vocab_size != vocab_size:
                raise RuntimeUserError(
                    f"sampling: the constraint was compiled for a vocabulary of "
                    f"{p.constraint.vocab_size}, not {vocab_size}"
                )
        else:
            check_spec(p.constraint)
    return p


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x)
    with np.errstate(over="ignore"):  # -1e308 - 1e308 -> -inf: probability 0, as it should be
        return x - (m + np.log(np.sum(np.exp(x - m))))


def sample_logprobs(logp: np.ndarray, temperature: float, top_p: float, top_k: int, rng: np.random.Generator) -> int:
    """One token from log-probabilities (-inf = impossible), ChatRWKV's order: top-p, top-k, temperature.
    top_p 1 keeps every possible token (the cut at cum >= min(top_p, cum[-1]) would drop only the
    tokens the float sum absorbs, whose probability is below 1e-16; not worth a sort per draw)."""
    if temperature <= 0:
        return int(np.argmax(logp))
    top_k = top_k if 0 < top_k < len(logp) else 0
    if top_p >= 1.0:  # no nucleus cut: every possible token (and no sort unless top_k asks for one)
        keep = logp > -np.inf
        if top_k:
            keep[np.argsort(-logp, kind="stable")[top_k:]] = False
    else:
        # the nucleus needs only the head of the descending order: sorting the whole vocabulary (6 ms
        # of an 8 ms draw over 65,536 tokens) is the fallback, taken when the head is not enough
        probs = np.exp(logp)
        order = _nucleus_head(logp, probs, top_p)
        cum = None if order is None else np.cumsum(probs[order])
        if cum is None or cum[-1] < top_p:  # no head, or one whose sorted sum falls short: the full sort
            order = np.argsort(-logp, kind="stable")
            cum = np.cumsum(probs[order])
        keep = logp >= logp[order[int(np.argmax(cum >= min(top_p, cum[-1])))]]
        if top_k and top_k < len(order):  # a head shorter than top_k holds every kept token
            keep[order[top_k:]] = False
    best = np.max(logp[keep])
    with np.errstate(over="ignore"):  # (logp - best) / T -> -inf for a tiny T: probability 0, as it should be
        scaled = np.where(keep, (logp - best) / temperature, -np.inf)  # probs ** (1/T), in log space
    q = np.exp(scaled)  # the best kept token has scaled = 0, so q.sum() >= 1
    q /= q.sum()
    return int(rng.choice(len(q), p=q))


def _nucleus_head(logp: np.ndarray, probs: np.ndarray, top_p: float) -> np.ndarray | None:
    """The first entries of ``argsort(-logp, kind="stable")``, enough of them that their cumulative
    sum reaches top_p (the caller checks it on the sum it computes anyway), or None. Exactly the full order's head: the tokens with logp >= a bound come
    before all others, and a stable sort of them (in index order) breaks ties as the full one does;
    the cumulative sum of a head equals the head of the full cumulative sum (a sequential sum). The
    cut is then top_p itself, not cum[-1]: top_p is below the total by more than either sum's
    rounding (n * eps each), so the sampled token is the one the full sort gives, bit for bit."""
    n = len(logp)
    total = float(probs.sum())
    margin = 2.0 * n * np.finfo(np.float64).eps * total
    if not top_p <= total - margin:
        return None
    top = float(np.max(logp))
    for drop in (8.0, 16.0, 32.0):  # tokens within e^-drop of the most likely one
        head = np.flatnonzero(logp >= top - drop)
        if len(head) > n // 4:
            return None  # a flat distribution: the full sort costs little more
        if float(probs[head].sum()) >= top_p + margin:
            return head[np.argsort(-logp[head], kind="stable")]
    return None


def sample_probs(probs: np.ndarray, temperature: float, top_p: float, top_k: int, rng: np.random.Generator) -> int:
    """One token from probabilities (kept for callers that have probabilities)."""
    with np.errstate(divide="ignore"):
        logp = np.log(np.asarray(probs, dtype=np.float64))
    return sample_logprobs(logp - np.log(np.exp(logp).sum()), temperature, top_p, top_k, rng)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@dataclass
class Sampler:
    """One sequence's sampler: its parameters, random generator and occurrence counts."""

    params: SamplingParams = field(default_factory=SamplingParams)
    vocab_size: int | None = None

    def __post_init__(self):
        check_params(self.params, self.vocab_size)
        self.ban = _ids("ban", self.params.ban, self.vocab_size)
        self.stop = _ids("stop", self.params.stop, self.vocab_size)
        bias = _bias(self.params.logit_bias, self.vocab_size)
        self.bias_ids = np.fromiter(bias.keys(), np.int64, len(bias))
        self.bias_values = np.fromiter(bias.values(), np.float64, len(bias))
        self._bias_bound = max(bias, default=-1)  # checked against rows only without vocab_size
        self.rng = np.random.default_rng(self.params.seed)
        self.occurrence: dict[int, float] = {}

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that changes the logits: the token is the argmax of the raw logits."""
        p = self.params
        return (
            p.temperature == 0
            and not p.presence_penalty
            and not p.frequency_penalty
            and not self.ban
            and not self.bias_ids.size
        )

    def __call__(self, logits: np.ndarray, mask: np.ndarray | None = None) -> int:
        """The next token from one row of logits. ``mask`` (bool [vocab], True = allowed; None: all) is
        the per-row constraint hook (e.g. a grammar): disallowed tokens get probability 0, greedy included."""
        p = self.params
        try:
            x = np.asarray(logits)
        except ValueError:  # ragged
            x = np.asarray([], dtype=object)
        if x.dtype.kind not in "biuf":  # strings, objects, complex numbers: not logits (never silently cast)
            raise RuntimeUserError(f"sampling: logits must be real numbers, not {x.dtype}")
        x = x.astype(np.float64)
        if x.ndim != 1 or x.size == 0:
            raise RuntimeUserError(f"sampling: logits must be one row [vocab], got shape {list(x.shape)}")
        if self.vocab_size is not None and x.size != self.vocab_size:
            raise RuntimeUserError(f"sampling: {x.size} logits for a vocabulary of {self.vocab_size}")
        # a row shorter than earlier ones (only possible without vocab_size; max() is O(distinct tokens seen))
        if self.vocab_size is None and self.occurrence and max(self.occurrence) >= x.size:
            raise RuntimeUserError(f"sampling: {x.size} logits, fewer than this sampler's earlier rows")
        if not np.isfinite(x).all():
            raise RuntimeUserError("sampling: the logits contain NaN or inf (a damaged model or state?)")
        x = x.copy()
        for t in self.ban:
            if t >= x.size:
                raise RuntimeUserError(f"sampling: ban id {t} is outside the vocabulary [0, {x.size})")
            x[t] = -np.inf
        if len(self.ban) >= x.size:
            raise RuntimeUserError("sampling: every token is banned")
        if mask is not None:
            mask = np.asarray(mask)
            if mask.dtype != np.bool_ or mask.shape != x.shape:
                raise RuntimeUserError(
                    f"sampling: a token mask must be bool [{x.size}], not {mask.dtype} {list(mask.shape)}"
                )
            x[~mask] = -np.inf
            if not np.isfinite(x).any():
                raise RuntimeUserError("sampling: the token mask and ban allow no token")
        if self.bias_ids.size:
            if self._bias_bound >= x.size:
                raise RuntimeUserError(
                    f"sampling: logit_bias id {self._bias_bound} is outside the vocabulary [0, {x.size})"
                )
            x[self.bias_ids] += self.bias_values  # (a banned token stays -inf)
        for t, n in self.occurrence.items():
            x[t] -= p.presence_penalty + n * p.frequency_penalty
        if not np.isfinite(np.max(x)) or np.isnan(x).any():
            raise RuntimeUserError("sampling: the penalties or logit_bias overflowed the logits (use smaller values)")
        token = sample_logprobs(_log_softmax(x), p.temperature, p.top_p, p.top_k, self.rng)
        for t in self.occurrence:
            self.occurrence[t] *= p.penalty_decay
        self.occurrence[token] = self.occurrence.get(token, 0.0) + 1.0
        return token
