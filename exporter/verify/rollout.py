"""The rollout: the prompt continued greedily by the reference, the teacher-forced feeds (each call's
tokens and the reference's state before them) and the free run (the export fed back its own state)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from rwkv_runtime.errors import RuntimeUserError

from .target import Target, ValidationError


@dataclass
class Rollout:
    ids: list  # every token, prompt then greedy continuation
    n_prompt: int
    pieces: list  # the tokens of each call: [t] for the step graph, chunks for the sequence graph
    feeds: list = field(default_factory=list)  # teacher-forced feeds, one per piece


def _tokenizer(target: Target):
    from rwkv_runtime.tokenizers import make_tokenizer

    return make_tokenizer(target.manifest.tokenizer, target.tokenizer_json)


def prompt_ids(target: Target, prompt: str | None, tokens: str | None) -> list:
    if prompt is not None and tokens is not None:
        raise ValidationError("give --prompt or --tokens, not both")
    vocab = target.manifest.vocab_size
    if tokens is not None:
        try:
            ids = [int(t) for t in tokens.replace(",", " ").split()]
        except ValueError:
            raise ValidationError(f"--tokens must be token ids separated by commas, not {tokens!r}") from None
    elif prompt is not None:
        try:
            ids = list(_tokenizer(target).encode(prompt))
        except RuntimeUserError as e:
            raise ValidationError(f"--prompt: {e}; use --tokens") from None
    else:
        ids = [0]  # the end-of-text token RWKV models start documents with
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad or not ids:
        raise ValidationError(f"token ids must be in 0..{vocab - 1} (got {bad[:4] or 'none'})")
    return ids


def _start_state(ref, target: Target) -> dict:
    import torch

    st = ref.new_state(1)
    for k, v in target.initial.items():
        st[k] = torch.from_numpy(np.asarray(v, dtype=np.float32)[:1].copy())
    return st


def make_rollout(ref, target: Target, ids: list, steps: int, chunk: int) -> Rollout:
    """Continue ``ids`` greedily with the reference to ``steps`` tokens, then build the
    teacher-forced feeds: each holds the call's token(s) and the reference's state before them."""
    import torch

    man = target.manifest
    seq = man.graph == "sequence"
    n_prompt = len(ids)
    ids = list(ids)
    with torch.no_grad():
        st = _start_state(ref, target)
        for t in ids[:-1]:
            _, st = ref.step(torch.tensor([t]), st)
        while len(ids) < steps:
            logits, st = ref.step(torch.tensor([ids[-1]]), st)
            ids.append(int(logits[0].argmax()))
        pieces = [ids[i : i + chunk] for i in range(0, len(ids), chunk)] if seq else [[t] for t in ids]
        roll = Rollout(ids, n_prompt, pieces)
        st = _start_state(ref, target)
        for piece in pieces:
            tokens = np.array([piece] if seq else piece, dtype=np.int64)
            feed = OrderedDict([(man.tokens_input, tokens)])
            for s in man.state:
                feed[s.name] = st[s.name].numpy().astype(np.float32, copy=True)
            roll.feeds.append(feed)
            t = torch.from_numpy(tokens)
            _, st = ref.sequence(t, st) if seq else ref.step(t, st)
    return roll


def free_run(runner, target: Target, roll: Rollout) -> list:
    """The export fed back its own state: one output dict per call (copies)."""
    man = target.manifest
    state = OrderedDict((name, arr) for name, arr in roll.feeds[0].items() if name != man.tokens_input)
    outs = []
    with runner:
        for feed in roll.feeds:
            f = OrderedDict([(man.tokens_input, feed[man.tokens_input])])
            f.update(state)
            out = runner.infer(f)
            out = OrderedDict((k, np.array(v, copy=True)) for k, v in out.items())
            outs.append(out)
            state = OrderedDict((s.name, np.ascontiguousarray(out[s.output], dtype=np.float32)) for s in man.state)
    return outs
