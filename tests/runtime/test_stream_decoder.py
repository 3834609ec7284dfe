"""StreamDecoder: the pieces of a token stream joined equal one decode of all its tokens, invalid UTF-8
included (a valid character after invalid bytes was turned into U+FFFD when the held tokens reached the cap)."""

from __future__ import annotations

import numpy as np
import pytest

from rwkv_runtime.tokenizers import ByteTokenizer, StreamDecoder


def _stream(tok, ids):
    d = StreamDecoder(tok)
    pieces = [d.push(t) for t in ids]
    assert all(p == "" for p in pieces[:0])
    return "".join(pieces) + d.flush()


def test_a_valid_character_after_invalid_bytes_is_not_lost():
    tok = ByteTokenizer()
    # seven invalid bytes, then a two-byte character split across tokens, then two invalid bytes
    ids = [0xFF] * 7 + [0xDE, 0x93, 0xC3, 0xC4]
    assert _stream(tok, ids) == bytes(ids).decode("utf-8", "replace")
    assert "\u0793" in _stream(tok, ids)


@pytest.mark.parametrize("seed", range(20))
def test_random_bytes_stream_as_one_decode(seed):
    rng = np.random.default_rng(seed)
    # biased toward UTF-8 lead and continuation bytes, so characters split and break often
    ids = [int(b) for b in rng.choice(np.r_[np.arange(0x80, 0x100), np.arange(0x20, 0x7F)], size=300)]
    assert _stream(ByteTokenizer(), ids) == bytes(ids).decode("utf-8", "replace")


def test_a_piece_is_held_whole_while_a_character_is_incomplete():
    d = StreamDecoder(ByteTokenizer())
    assert d.push(ord("a")) == "a" and not d.pending
    assert d.push(0xE2) == "" and d.pending  # first byte of a three-byte character
    assert d.push(0x82) == "" and d.pending
    assert d.push(0xAC) == "\u20ac" and not d.pending


def test_world_vocabulary_streams_as_one_decode():
    from rwkv_runtime.tokenizers import WorldTokenizer

    try:
        tok = WorldTokenizer()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"World tokenizer unavailable: {e}")
    text = "naïve café — 日本語のテキスト 🎉 emoji and more: Ωμέγα"
    ids = tok.encode(text)
    assert _stream(tok, ids) == tok.decode(ids) == text
