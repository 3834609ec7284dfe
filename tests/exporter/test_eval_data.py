"""rwkv-export eval's LAMBADA reader against hostile data files: bytes that are not UTF-8 and a lone
surrogate escape are one Error line naming the file (was: an 'internal error', and a line about "the
prompt" naming neither file nor line)."""

from __future__ import annotations

import pytest

from rwkv_export.verify import eval as ev
from rwkv_runtime import RuntimeUserError


def test_a_data_file_that_is_not_utf8_is_one_error_naming_it(tmp_path):
    p = tmp_path / "bin.jsonl"
    p.write_bytes(b'{"text": "a b"}\n\xff\xfe\n')
    with pytest.raises(RuntimeUserError, match="bin.jsonl: not UTF-8"):
        ev.read_lambada(p)


def test_a_lone_surrogate_is_refused_with_its_line(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text('{"text": "a b"}\n{"text": "lone \\ud800 x"}\n')
    with pytest.raises(RuntimeUserError, match=r"s.jsonl, line 2: the text holds a lone surrogate \('\\ud800'\)"):
        ev.read_lambada(p)
    assert ev.read_lambada(p, limit=1) == [("a", " b")]
