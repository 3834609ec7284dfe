"""The World tokenizer decodes from its vocabulary's bytes: identical to pyrwkv-tokenizer wherever that
decodes, and a token that ends inside a multi-byte character (which makes pyrwkv-tokenizer panic) streams."""

import numpy as np
import pytest

pytest.importorskip("pyrwkv_tokenizer")

from rwkv_runtime import RuntimeUserError  # noqa: E402
from rwkv_runtime.tokenizers import StreamDecoder, WorldTokenizer  # noqa: E402

TEXT = "héllo 你好, мир! 🙂 naïve — ok\n\tdef f(x): return x**2; ελληνικά; العربية; 日本語のテキスト\n" * 4


def test_round_trip_and_agreement_with_pyrwkv_tokenizer():
    from pyrwkv_tokenizer import RWKVTokenizer

    ours, theirs = WorldTokenizer(), RWKVTokenizer()
    ids = ours.encode(TEXT)
    assert ours.decode(ids) == theirs.decode(ids) == TEXT
    # every single token with a valid UTF-8 spelling decodes as pyrwkv-tokenizer decodes it
    valid = [i for i in range(1, 65530, 97) if ours.decode([i]) and "\ufffd" not in ours.decode([i])]
    assert len(valid) > 500
    assert [ours.decode([i]) for i in valid] == [theirs.decode([i]) for i in valid]


def test_split_multibyte_character_streams_without_error():
    tok = WorldTokenizer()
    # byte-level tokens (ids 1..256 are the bytes 0..255) split a 4-byte emoji across four tokens
    ids = [b + 1 for b in "a🙂b".encode()]
    assert tok.decode(ids[1:2]) == "\ufffd"  # a lone lead byte: replaced, no panic
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == "a🙂b"


def test_out_of_vocabulary_id_is_a_user_error():
    with pytest.raises(RuntimeUserError, match="outside the World vocabulary"):
        WorldTokenizer().decode(np.array([70000]))
