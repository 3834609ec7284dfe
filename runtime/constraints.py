"""Constrained decoding: only tokens that keep the output inside a JSON Schema, a regular expression, a
context-free grammar or a list of choices can be sampled.

The engine is llguidance (PyPI ``llguidance``, the ``[structured]`` extra): a Rust matcher with no
dependencies (no torch), compiling a schema in about a millisecond and computing a token mask in tens of
microseconds on a 65536-token vocabulary (docs/structured-output.md has the measurements and why it
was chosen over xgrammar and outlines-core).

    spec = constraints.json_schema({"type": "object", ...})      # or json_object(), regex(), grammar(), choice()
    out = session.generate(prompt, constraint=spec)              # a SamplingParams field

Pieces:

* ``ConstraintSpec``: what the output must match (kind + value); plain data, no engine needed to build one.
* ``vocabulary(tokenizer, vocab_size)``: every token's bytes for the engine, from the tokenizers the
  runtime ships (bytes, World, Hugging Face tokenizer.json); made once per tokenizer.
* ``compile_constraint(spec, tokenizer, vocab_size)`` -> ``CompiledConstraint`` (cached): the spec checked
  and compiled against the vocabulary; a spec the engine cannot compile is a ``RuntimeUserError``.
* ``CompiledConstraint.start()`` -> ``ConstraintState``: one row's matcher: ``allowed()`` (bool mask over
  the model's vocabulary), ``apply(logits)``, ``advance(token)``, ``finished``.
* ``prepare_masks(states)``: the masks of a whole batch computed in parallel (engine threads).

End of a constrained output: the row is ``finished`` when the constraint can take no further token (a JSON
object closed, a choice complete), or when it is complete and the model picks the end-of-text token (then
``eos_consumed``: that token is not part of the text). A vocabulary without an end-of-text token (the
byte tokenizer) cannot end an open-ended constraint such as ``[0-9]+`` early: it runs to the token limit.
"""

from __future__ import annotations

import collections
import json
import os
import threading
from dataclasses import dataclass

import numpy as np

from .errors import RuntimeUserError

KINDS = ("json_object", "json_schema", "regex", "grammar", "choice")

# A spec is compiled before its request is queued, and compiling grows faster than linearly with its
# size (a 50 000-way choice took 4.4 s on one core, a 5 000-property schema 0.5 s): bounded by the length
# of its canonical text (``ConstraintSpec.key``), far above any real schema, tool list or regex.
MAX_SPEC_CHARS = 128 * 1024
INSTALL_HINT = "constrained decoding needs llguidance: pip install 'rwkv-runtime[structured]'"

# compact JSON (no free whitespace): bounded output, and no "\n\n" that a chat stop string would cut;
# a schema's own "x-guidance" options still override this
JSON_OPTIONS = {"whitespace_flexible": False}


class ConstraintError(RuntimeUserError):
    """The constraint itself failed (it cannot start, matches nothing, or hit one of the engine's limits
    while generating): the fault of whoever wrote the spec, never of the model or the server."""


def _engine():
    try:
        import llguidance
        import llguidance.numpy  # noqa: F401 - the parallel mask helpers
    except ImportError:
        raise RuntimeUserError(INSTALL_HINT) from None
    return llguidance


@dataclass(frozen=True)
class ConstraintSpec:
    """What a constrained output must match.

    kind: ``json_object`` (any JSON object; value None), ``json_schema`` (value: the schema, a dict),
    ``regex`` (value: a pattern matched against the whole output), ``grammar`` (value: a Lark or GBNF
    grammar, llguidance's syntax), ``choice`` (value: a tuple of strings, the output is exactly one).
    """

    kind: str
    value: object = None

    def __post_init__(self):
        if self.kind == "choice" and isinstance(self.value, list):
            object.__setattr__(self, "value", tuple(self.value))
        check_spec(self)

    def key(self) -> str:
        """A canonical text of the spec (the compile cache's key)."""
        return self.kind + ":" + json.dumps(self.value, sort_keys=True, default=list)


def json_object() -> ConstraintSpec:
    return ConstraintSpec("json_object")


def json_schema(schema) -> ConstraintSpec:
    return ConstraintSpec("json_schema", schema)


def regex(pattern: str) -> ConstraintSpec:
    return ConstraintSpec("regex", pattern)


def grammar(text: str) -> ConstraintSpec:
    return ConstraintSpec("grammar", text)


def choice(options) -> ConstraintSpec:
    return ConstraintSpec("choice", tuple(options) if isinstance(options, (list, tuple)) else options)


def from_dict(d) -> ConstraintSpec:
    """``{"json_schema": {...}}``, ``{"regex": "..."}``, ``{"grammar": "..."}``, ``{"choice": [...]}`` or
    ``{"json_object": true}``: exactly one key (the form the CLI and the server's extras use)."""
    if not isinstance(d, dict) or len(d) != 1:
        raise RuntimeUserError(f"a constraint is one of {{{', '.join(KINDS)}}}: a dict with exactly one key")
    ((kind, value),) = d.items()
    return ConstraintSpec(kind, None if kind == "json_object" else value)


def check_spec(spec) -> ConstraintSpec:
    """The spec's shape (no engine needed): one clear RuntimeUserError."""
    if not isinstance(spec, ConstraintSpec):
        raise RuntimeUserError(
            f"constraint must be a ConstraintSpec (rwkv_runtime.constraints.json_schema(...) "
            f"and co.), not {type(spec).__name__}"
        )
    k, v = spec.kind, spec.value
    if k not in KINDS:
        raise RuntimeUserError(f"constraint kind {str(k)[:40]!r} is not one of {', '.join(KINDS)}")
    if k == "json_schema" and not isinstance(v, dict):
        raise RuntimeUserError(f"constraint: a JSON schema must be an object (dict), not {type(v).__name__}")
    if k in ("regex", "grammar") and (not isinstance(v, str) or not v):
        raise RuntimeUserError(f"constraint: a {k} must be a non-empty string")
    if k == "choice" and (not isinstance(v, tuple) or not v or not all(isinstance(x, str) and x for x in v)):
        raise RuntimeUserError("constraint: choice must be a non-empty list of non-empty strings")
    try:
        size = len(spec.key())
    except (TypeError, ValueError, RecursionError) as e:  # (a nesting deeper than Python's stack, too)
        raise RuntimeUserError(f"constraint: the JSON schema is not JSON ({str(e)[:120]})") from None
    if size > MAX_SPEC_CHARS:
        raise RuntimeUserError(
            f"constraint: the {k.replace('_', ' ')} is {size} characters long as JSON; at most {MAX_SPEC_CHARS}"
        )
    return spec


# -- vocabularies -------------------------------------------------------------------------------------------
class Vocabulary:
    """A tokenizer's tokens as the engine sees them, for a model with ``vocab_size`` logits.

    ``eos``: the end-of-text token id in the model's vocabulary, or None (the byte tokenizer has none:
    the engine gets a virtual one past the model's vocabulary, which is never sampled).
    """

    def __init__(self, lltok, vocab_size: int, eos: int | None):
        self.lltok, self.vocab_size, self.eos = lltok, int(vocab_size), eos
        self.n_words = (lltok.vocab_size + 31) // 32  # int32 words in one engine bitmask


class _Words:
    """The TokenizerWrapper duck type llguidance reads: token bytes, EOS, special ids, an encoder."""

    def __init__(self, tokens, eos, special, encode):
        self.tokens, self.eos_token_id, self.bos_token_id = tokens, eos, None
        self.special_token_ids, self._encode = special, encode

    def __call__(self, text):
        if not isinstance(text, str):  # (llguidance then hands us str and tokenizes odd bytes itself)
            raise TypeError("text only")
        return list(self._encode(text))


_VOCAB_LOCK = threading.Lock()


def vocabulary(tokenizer, vocab_size: int) -> Vocabulary:
    """The engine's vocabulary for ``tokenizer`` (ByteTokenizer, WorldTokenizer, HFTokenizer), cached on it."""
    llg = _engine()
    with _VOCAB_LOCK:
        cache = tokenizer.__dict__.setdefault("_constraint_vocab", {})
        if vocab_size in cache:
            return cache[vocab_size]
        kind = getattr(tokenizer, "kind", None)
        if kind == "hf-json":
            # llguidance reads tokenizer.json itself (byte-level BPE, Metaspace, added tokens alike)
            tok = tokenizer._tok
            eos = next(
                (
                    tok.token_to_id(t)
                    for t in ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")
                    if tok.token_to_id(t) is not None
                ),
                None,
            )
            try:
                lltok = llg.LLTokenizer(tok.to_str(), n_vocab=int(vocab_size), eos_token=eos)
            except Exception as e:  # noqa: BLE001 - the engine raises its own types
                raise RuntimeUserError(
                    f"constrained decoding cannot read this model's tokenizer.json ({str(e).splitlines()[0][:160]})"
                ) from None
            if eos is not None and eos >= vocab_size:
                eos = None
        elif kind in ("bytes", "world"):
            tokens, special = [], []
            for i in range(int(vocab_size)):
                b = tokenizer.token_bytes(i) if (kind == "bytes" or i != 0) else None
                tokens.append(b or b"")
                if not b:  # no text (World's id 0 is end-of-text; ids past the tokenizer): never allowed
                    special.append(i)
            if kind == "world" and vocab_size > 0:
                eos = 0
                special.remove(0)
            else:
                eos = None
                tokens.append(b"")  # a virtual end-of-text token past the model's vocabulary
            words = _Words(tokens, eos if eos is not None else len(tokens) - 1, special, tokenizer.encode)
            lltok = llg.LLTokenizer(llg.TokenizerWrapper(words))
        else:
            raise RuntimeUserError(
                f"constrained decoding does not know the tokenizer kind {str(kind)[:40]!r} (bytes, world, hf-json)"
            )
        cache[vocab_size] = v = Vocabulary(lltok, vocab_size, eos)
        return v


# -- compiling --------------------------------------------------------------------------------------------
class CompiledConstraint:
    """A spec compiled for one vocabulary; ``start()`` gives each generated sequence its own matcher."""

    def __init__(self, spec: ConstraintSpec, vocab: Vocabulary, prototype):
        self.spec, self.vocab, self._proto = spec, vocab, prototype

    @property
    def vocab_size(self) -> int:
        return self.vocab.vocab_size

    def start(self) -> ConstraintState:
        return ConstraintState(self, self._proto.deep_copy())


def grammar_text(spec: ConstraintSpec) -> str:
    """The engine's grammar for a spec (not yet checked against a vocabulary)."""
    llg = _engine()
    M = llg.LLMatcher
    try:
        if spec.kind == "json_object":
            return M.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
        if spec.kind == "json_schema":
            return M.grammar_from_json_schema(spec.value, defaults=JSON_OPTIONS)
        if spec.kind == "regex":
            return M.grammar_from_regex(spec.value)
        if spec.kind == "choice":
            return M.grammar_from_lark("start: " + " | ".join(json.dumps(x) for x in spec.value))
        return llg.grammar_from("grammar", spec.value)  # Lark, or GBNF converted to Lark
    except (ValueError, TypeError) as e:
        raise RuntimeUserError(
            f"constraint: the {spec.kind.replace('_', ' ')} cannot be compiled ({_first_line(e)})"
        ) from None


def _first_line(e) -> str:
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    text = "; ".join(lines[:3]) if lines else type(e).__name__
    return text[:300]


_CACHE: collections.OrderedDict = collections.OrderedDict()
_CACHE_SIZE = 64
_CACHE_LOCK = threading.Lock()


def compile_constraint(spec: ConstraintSpec, tokenizer, vocab_size: int) -> CompiledConstraint:
    """Check and compile ``spec`` for the model's tokenizer (cached: the same schema compiles once)."""
    check_spec(spec)
    vocab = vocabulary(tokenizer, vocab_size)
    key = (id(vocab), spec.key())
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None and hit.vocab is vocab:
            _CACHE.move_to_end(key)
            return hit
    llg = _engine()
    g = grammar_text(spec)
    is_error, msgs = llg.LLMatcher.validate_grammar_with_warnings(g, vocab.lltok)
    if is_error:
        raise RuntimeUserError(
            f"constraint: the {spec.kind.replace('_', ' ')} cannot be compiled "
            f"({_first_line(msgs[0] if msgs else 'invalid')})"
        )
    proto = llg.LLMatcher(vocab.lltok, g, log_level=0)
    if proto.is_error():
        raise RuntimeUserError(
            f"constraint: the {spec.kind.replace('_', ' ')} cannot be compiled ({_first_line(proto.get_error())})"
        )
    compiled = CompiledConstraint(spec, vocab, proto)
    _check_first_token(compiled)
    with _CACHE_LOCK:
        _CACHE[key] = compiled
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return compiled


def _check_first_token(compiled: CompiledConstraint) -> None:
    """The first mask, computed once here (not by each row, after its prompt ran): a spec that cannot
    start (a schema ``{"$ref": "#"}``, a grammar ``start: start``, a regex no text matches) or that
    admits only the empty text (nothing to generate without an end-of-text token) is refused at compile
    time, as a spec error, instead of failing each row that uses it."""
    first = compiled.start()
    what = compiled.spec.kind.replace("_", " ")
    try:
        allowed = first.allowed()
    except ConstraintError as e:
        raise RuntimeUserError(f"constraint: the {what} cannot be compiled ({str(e)[len('constraint: ') :]})") from None
    if not allowed.any():
        raise RuntimeUserError(
            f"constraint: the {what} "
            + (
                "matches only the empty text: there is nothing to generate"
                if first.accepting
                else "matches no text this model's tokens can write"
            )
        )


# -- one row's matcher -------------------------------------------------------------------------------------
class ConstraintState:
    """One sequence's position in its constraint: mask the logits, then advance by the sampled token."""

    def __init__(self, compiled: CompiledConstraint, matcher):
        self.compiled, self.vocab, self._m = compiled, compiled.vocab, matcher
        self._bits: np.ndarray | None = None  # this step's engine bitmask (int32 words), until advance()
        self.finished = False
        self.eos_consumed = False
        self.tokens = 0

    def _set_bits(self, bits: np.ndarray):
        self._bits = bits
        if self._m.is_error():
            raise ConstraintError(f"constraint: {_first_line(self._m.get_error())}")

    def _bitmask(self) -> np.ndarray:
        if self._bits is None:
            bits = np.empty(self.vocab.n_words, np.int32)
            self._m.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
            self._set_bits(bits)
        return self._bits

    def allowed(self) -> np.ndarray:
        """bool [vocab_size]: the tokens the constraint accepts next."""
        bits = np.unpackbits(self._bitmask().view(np.uint8), bitorder="little")
        return bits[: self.vocab.vocab_size].astype(bool)

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """The logits with every token the constraint refuses set to -inf (a new float64 array when
        ``logits`` is not already float64; float64 input is changed in place and returned)."""
        x = np.asarray(logits, dtype=np.float64)
        if self.finished:
            raise RuntimeUserError("constraint: the constrained output is already complete; stop this sequence")
        ok = self.allowed()
        if x.shape[-1] != ok.size:
            raise RuntimeUserError(
                f"constraint: {x.shape[-1]} logits for a constraint compiled for a vocabulary of {ok.size}"
            )
        np.putmask(x, ~ok, -np.inf)
        return x

    def advance(self, token: int) -> bool:
        """Take the sampled token (one the mask allowed); True (and ``finished``) when the output is
        complete (the generation core's ``Constraint`` hook: the row then ends with finish reason stop)."""
        token = int(token)
        if self.finished:
            raise RuntimeUserError("constraint: the constrained output is already complete")
        if not self._m.consume_token(token):
            raise ConstraintError(
                f"constraint: token {token} does not continue the constrained output "
                f"({_first_line(self._m.get_error()) or 'not allowed'})"
            )
        self._bits = None
        self.tokens += 1
        if self.vocab.eos is not None and token == self.vocab.eos:
            self.finished = self.eos_consumed = True
        elif self._m.is_stopped():
            self.finished = True
        elif self._m.is_accepting() and not self.allowed().any():
            self.finished = True  # complete, and only the (virtual) end-of-text token could follow
        return self.finished

    @property
    def accepting(self) -> bool:
        """The output so far is complete (it may still go on, e.g. more digits of ``[0-9]+``)."""
        return self.finished or self._m.is_accepting()


_EXECUTOR = None


# The engine's thread pool pays off only with cores to spare: on a small machine its threads fight
# onnxruntime's (which spin for a while after each run): 4 rows took 16 ms a step on 2 cores, against
# about 0.1 ms one row after another. Below this many CPUs (or rows) the masks are computed in turn.
PARALLEL_MIN_CPUS = 8
PARALLEL_MIN_ROWS = 8


def prepare_masks(states) -> None:
    """Compute the next masks of many rows at once (the engine's threads, on a machine with
    ``PARALLEL_MIN_CPUS`` or more), so each row's ``allowed()`` is a lookup; rows already computed,
    finished or None are skipped."""
    global _EXECUTOR
    todo = [s for s in states if s is not None and s._bits is None and not s.finished]
    if len(todo) < PARALLEL_MIN_ROWS or (os.cpu_count() or 1) < PARALLEL_MIN_CPUS:
        return  # (each row computes its own mask when asked)
    llg = _engine()
    if _EXECUTOR is None:
        _EXECUTOR = llg.LLExecutor()
    by_words: dict = {}
    for s in todo:
        by_words.setdefault(s.vocab.n_words, []).append(s)
    for n_words, group in by_words.items():
        bits = np.empty((len(group), n_words), np.int32)
        _EXECUTOR.unsafe_compute_mask_ptr(
            [(s._m, i) for i, s in enumerate(group)], bits.ctypes.data, n_words * 4, len(group)
        )
        for i, s in enumerate(group):
            s._set_bits(bits[i])
