"""Tokenizers named by the manifest: byte-level, the RWKV "World" trie vocabulary (pyrwkv-tokenizer,
which ships the vocabulary), and Hugging Face ``tokenizer.json`` files (e.g. the 20B tokenizer of the
Pile models) embedded in the model."""

from __future__ import annotations

import functools

from .errors import RuntimeUserError


def _refuse_surrogates(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RuntimeUserError(
            f"the prompt is not valid Unicode text (a lone surrogate at character {e.start}); "
            "this tokenizer encodes only valid text"
        ) from None
    return text


class ByteTokenizer:
    """Token id = byte value (the tiny byte-level models).

    Text that is not valid UTF-8 is encoded losslessly where Python can represent it: bytes that came
    in through ``surrogateescape`` (a non-UTF-8 command-line argument becomes U+DC80..U+DCFF) go back to
    the original bytes. Any other lone surrogate (U+D800..U+DFFF from an API caller) has no byte form
    and is refused with a ``RuntimeUserError``.
    """

    kind = "bytes"
    bytes_decode = True  # decode(ids) is the tokens' bytes as UTF-8 (StreamDecoder streams it incrementally)

    def encode(self, text: str) -> list[int]:
        try:
            return list(text.encode("utf-8", errors="surrogateescape"))
        except UnicodeEncodeError as e:
            raise RuntimeUserError(
                f"the prompt holds a lone surrogate at character {e.start} that is not an "
                "escaped byte; give valid text or token ids"
            ) from None

    def decode(self, ids) -> str:
        try:
            data = bytes(int(i) for i in ids)
        except ValueError:  # bytes(): "bytes must be in range(0, 256)"
            raise RuntimeUserError("token ids outside the byte vocabulary (0..255)") from None
        return data.decode("utf-8", errors="replace")

    def token_bytes(self, tid: int) -> bytes | None:
        """One token's own bytes (a piece of a multi-byte character decodes to U+FFFD; these do not)."""
        return bytes([tid]) if 0 <= tid < 256 else None


class WorldTokenizer:
    """The RWKV World vocabulary (65536 tokens), used by RWKV-4-World and all RWKV-5/6/7 models."""

    kind = "world"
    bytes_decode = True  # as the byte tokenizer: decode is the vocabulary's bytes as UTF-8

    def __init__(self):
        try:
            from pyrwkv_tokenizer import RWKVTokenizer
        except ImportError:  # pragma: no cover - it is a dependency
            raise RuntimeUserError("the World tokenizer needs `pip install pyrwkv-tokenizer`") from None
        self._tok = RWKVTokenizer()
        self._bytes = None  # id -> bytes, read from the vocabulary file on first decode

    def encode(self, text: str) -> list[int]:
        """Valid Unicode text only (a lone surrogate is a RuntimeUserError)."""
        return list(self._tok.encode(_refuse_surrogates(text)))

    def decode(self, ids) -> str:
        # Decoded from the vocabulary's bytes rather than pyrwkv-tokenizer's decode, which panics (a
        # BaseException) on a token that ends inside a multi-byte character; streaming needs those pieces.
        table = self._byte_table()
        try:
            data = b"".join(table[int(i)] for i in ids)
        except (IndexError, KeyError):
            raise RuntimeUserError(f"token ids outside the World vocabulary (0..{len(table) - 1})") from None
        return data.decode("utf-8", errors="replace")

    def token_bytes(self, tid: int) -> bytes | None:
        return self._byte_table().get(tid)

    def _byte_table(self) -> dict:
        if self._bytes is None:
            import ast

            table = {0: b""}  # id 0 is the end-of-text token: no text
            with open(self._tok.vocab_filepath, encoding="utf-8") as f:
                for line in f:  # "<id> <python str or bytes literal> <byte length>"
                    idx, rest = line.split(" ", 1)
                    lit = ast.literal_eval(rest[: rest.rindex(" ")])  # literals only: never runs code
                    table[int(idx)] = lit if isinstance(lit, bytes) else lit.encode("utf-8")
            self._bytes = table
        return self._bytes


class HFTokenizer:
    """A Hugging Face ``tokenizers`` JSON (e.g. 20B_tokenizer.json of the RWKV-4 Pile models)."""

    kind = "hf-json"

    def __init__(self, json_text: str):
        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_str(json_text)
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises its own Exception type
            raise RuntimeUserError(f"the model's embedded tokenizer.json cannot be loaded ({str(e)[:100]})") from None

    def encode(self, text: str) -> list[int]:
        """Valid Unicode text only (a lone surrogate is a RuntimeUserError)."""
        return self._tok.encode(_refuse_surrogates(text)).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])

    def token_bytes(self, tid: int) -> bytes | None:
        """A byte-level BPE token's bytes (GPT-2's alphabet mapped back); None for other vocabularies."""
        from tokenizers import decoders

        if not isinstance(self._tok.decoder, decoders.ByteLevel):
            return None
        piece, unbyte = self._tok.id_to_token(tid) or "", _byte_level_alphabet()
        return bytes(unbyte[c] for c in piece) if piece and all(c in unbyte for c in piece) else None


@functools.lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict:
    """GPT-2's byte-level alphabet, reversed: a byte-level BPE token's characters -> its bytes."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return {**{chr(b): b for b in keep}, **{chr(256 + i): b for i, b in enumerate(moved)}}


def make_tokenizer(spec: dict, embedded_json: str | None = None):
    """The tokenizer a manifest's ``tokenizer`` block names (kinds: bytes, world, hf-json)."""
    kind = (spec or {}).get("kind", "none") if isinstance(spec, dict) else "none"
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "world":
        return WorldTokenizer()
    if kind == "hf-json":
        if not embedded_json:
            raise RuntimeUserError("the model names a tokenizer.json but does not embed it; re-export with --tokenizer")
        return HFTokenizer(embedded_json)
    if kind != "none":  # a newer exporter, or a damaged manifest
        raise RuntimeUserError(
            f"the model's tokenizer kind {str(kind)[:40]!r} is not one this runtime knows "
            "(bytes, world, hf-json); upgrade rwkv-runtime or re-export with --tokenizer"
        )
    raise RuntimeUserError(
        "the model has no tokenizer (it was exported with --tokenizer none): give token ids "
        "to generate_tokens/step/prefill, or re-export with --tokenizer"
    )


class StreamDecoder:
    """Turns a stream of token ids into text pieces, holding back incomplete UTF-8 sequences, so that the
    pieces joined equal ``tokenizer.decode`` of all the tokens at once.

    A tokenizer whose text is its tokens' bytes decoded as UTF-8 (``bytes_decode = True``: the byte and
    World vocabularies) goes through Python's incremental UTF-8 decoder, which is exactly that: invalid
    bytes become U+FFFD as they would in one decode, a character split across tokens waits for its last
    byte. Other tokenizers (Hugging Face ``tokenizer.json``) are decoded from the held tokens while the
    text so far ends in U+FFFD (a character not complete yet), at most 8 tokens."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self._utf8 = None
        if getattr(tokenizer, "bytes_decode", False):
            import codecs

            self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held: list[int] = []
        self._text = ""  # decoded text held back with an incomplete character (a piece is all or nothing)

    @property
    def pending(self) -> bool:
        """True while part of a character is held back (the next tokens complete it)."""
        if self._utf8 is not None:
            return bool(self._utf8.getstate()[0])
        return bool(self._held)

    def push(self, token: int) -> str:
        if self._utf8 is not None:
            data = self.tok.token_bytes(int(token))
            if data is None:  # outside the vocabulary: the tokenizer's own one-line error
                self.tok.decode([int(token)])
                data = b""
            text = self._text + self._utf8.decode(data)
            if self._utf8.getstate()[0]:  # a character not complete yet: hold the piece whole
                self._text = text
                return ""
            self._text = ""
            return text
        self._held.append(int(token))
        text = self.tok.decode(self._held)
        if text.endswith("\ufffd") and len(self._held) < 8:  # wait for the rest of a multi-byte character
            return ""
        self._held = []
        return text

    def flush(self) -> str:
        if self._utf8 is not None:
            text, self._text = self._text + self._utf8.decode(b"", final=True), ""
            return text
        text = self.tok.decode(self._held) if self._held else ""
        self._held = []
        return text
