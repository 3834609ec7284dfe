"""Sampling with ChatRWKV's semantics (BlinkDL's PIPELINE): top-p cut on the probabilities, then
top-k, then temperature applied to the probabilities; presence/frequency penalties on the logits with
a decaying occurrence count; temperature 0 means greedy."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


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


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def sample_probs(probs: np.ndarray, temperature: float, top_p: float, top_k: int, rng: np.random.Generator) -> int:
    if temperature <= 0:
        return int(np.argmax(probs))
    probs = probs.astype(np.float64, copy=True)
    order = np.argsort(probs)[::-1]
    cum = np.cumsum(probs[order])
    cutoff = probs[order[int(np.argmax(cum >= top_p))]]
    probs[probs < cutoff] = 0.0
    if 0 < top_k < len(probs):
        probs[order[top_k:]] = 0.0
    if temperature != 1.0:
        probs = probs ** (1.0 / temperature)
    probs /= probs.sum()
    return int(rng.choice(len(probs), p=probs))


@dataclass
class Sampler:
    """One sequence's sampler: its parameters, random generator and occurrence counts."""

    params: SamplingParams = field(default_factory=SamplingParams)

    def __post_init__(self):
        self.rng = np.random.default_rng(self.params.seed)
        self.occurrence: dict[int, float] = {}

    def __call__(self, logits: np.ndarray) -> int:
        p = self.params
        logits = np.asarray(logits, dtype=np.float32).copy()
        for t in p.ban:
            logits[t] = -np.inf
        for t, n in self.occurrence.items():
            logits[t] -= p.presence_penalty + n * p.frequency_penalty
        token = sample_probs(softmax(logits), p.temperature, p.top_p, p.top_k, self.rng)
        for t in self.occurrence:
            self.occurrence[t] *= p.penalty_decay
        self.occurrence[token] = self.occurrence.get(token, 0.0) + 1.0
        return token
