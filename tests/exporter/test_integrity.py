"""Issue #24 (integrity), the exporter's part: each case of the hostile-input audit, reproduced. Every
command fails with one `Error:` line, writes nothing, and loses no file the user had."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from rwkv_export.cli import main
from rwkv_export.errors import CheckpointError, ExportError
from rwkv_export.export import ExportOptions, export
from rwkv_runtime import safe_write

from ..conftest import ref_model
from ..helpers import random_rwkv4, random_state_tuning
from .conftest import snapshot


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error(res) -> str:
    lines = res.output.strip().splitlines()
    assert res.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), res.output
    assert "internal error" not in lines[0] and "Traceback" not in res.output
    return lines[0]


@pytest.fixture(scope="module")
def rwkv6(tmp_path_factory):
    d = tmp_path_factory.mktemp("st")
    ck = ref_model("golden-rwkv6")
    ts = random_state_tuning(ck, d / "tuned.pth", seed=0)
    return ck, ts, d


# -- planted journal, end to end -------------------------------------------------------------------
def test_export_ignores_a_planted_journal(tmp_path):
    """The issue's case: `.rwkv-export-*/journal.json` beside the output naming files elsewhere."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    planted = out_dir / f"{safe_write.PREFIX}m.onnx-abcd1234"
    (planted / "old").mkdir(parents=True)
    (planted / "old" / "1").write_bytes(b"planted")
    (planted / safe_write.LOCK).write_bytes(b"")
    created = tmp_path / "created.txt"
    (planted / safe_write.JOURNAL).write_text(json.dumps({"moves": [[0, "x", str(victim)], [1, None, str(created)]]}))
    export(ref_model("golden-rwkv7"), out_dir / "m.onnx", ExportOptions(graphs=("step",)))
    assert victim.read_bytes() == b"precious" and not created.exists()
    assert (planted / "old" / "1").read_bytes() == b"planted"
    assert (out_dir / "m.onnx").is_file()


# -- a checkpoint truncated while the export reads it (SIGBUS) --------------------------------------
_TRUNCATE = textwrap.dedent("""
    import os, sys
    CK = sys.argv[1]
    import rwkv_export.export as ex
    real = ex.GraphBuilder
    class GB(real):  # another program truncates the checkpoint while the graphs are being built
        def __init__(self, *a, **k):
            os.truncate(CK, 4096)
            super().__init__(*a, **k)
    ex.GraphBuilder = GB
    from rwkv_export.cli import main
    sys.argv = ["rwkv-export", "export", CK, "-o", sys.argv[2], "-q"]
    main()
""")


@pytest.mark.slow
def test_checkpoint_truncated_mid_export_is_one_error_line(tmp_path):
    ck = tmp_path / "ck.pth"
    shutil.copy(ref_model("golden-rwkv7"), ck)
    out = tmp_path / "m.onnx"
    export(ck, out)  # the old set, which must survive
    old = snapshot(tmp_path)
    old.pop("ck.pth")
    r = subprocess.run(
        [sys.executable, "-c", _TRUNCATE, str(ck), str(out)], capture_output=True, text=True, timeout=300
    )
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("Error: "), (r.returncode, r.stderr)
    assert "SIGBUS" in lines[0] and "truncated" in lines[0] and "left unchanged" in lines[0]
    now = snapshot(tmp_path)
    now.pop("ck.pth")
    assert now == old, "staging folder left behind or old set changed"


# -- .pth records -------------------------------------------------------------------------------------
def _rewrite_zip(src: Path, dst: Path, edit) -> None:
    """Copy a torch zip checkpoint record by record (64-byte aligned, as torch writes), ``edit(name, bytes)``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for n in zin.namelist():
            b = edit(n, zin.read(n))
            zi = zipfile.ZipInfo(n, date_time=(1980, 1, 1, 0, 0, 0))
            pad = (-(zout.fp.tell() + 30 + len(n.encode()) + 4)) % 64
            zi.extra = b"\xff\xff" + pad.to_bytes(2, "little") + b"\0" * pad
            zout.writestr(zi, b)


def test_a_record_shorter_than_its_tensor_is_refused(tmp_path):
    """torch's mapped loader read the missing bytes from the next record (exit 0, wrong weights)."""
    first = []

    def halve(n, b):
        if "/data/" in n and not first:
            first.append(n)
            return b[: len(b) // 2]
        return b

    _rewrite_zip(ref_model("golden-rwkv6"), tmp_path / "short.pth", halve)
    with pytest.raises(CheckpointError, match=r"holds \d+ bytes, its tensor needs"):
        export(tmp_path / "short.pth", tmp_path / "m.onnx")
    assert sorted(os.listdir(tmp_path)) == ["short.pth"]


def test_a_record_with_a_bad_crc_is_refused(tmp_path):
    src = tmp_path / "ok.pth"
    _rewrite_zip(ref_model("golden-rwkv6"), src, lambda n, b: b)
    with zipfile.ZipFile(src) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename)
    raw = bytearray(src.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode())
    start += int.from_bytes(raw[info.header_offset + 28 : info.header_offset + 30], "little")
    raw[start + 5] ^= 0x40  # one flipped bit inside a tensor: the stored CRC-32 no longer matches
    (tmp_path / "flip.pth").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        export(tmp_path / "flip.pth", tmp_path / "m.onnx")


# -- state tuning -------------------------------------------------------------------------------------
def _tuning(ts: dict, d: Path, how: str) -> Path:
    k0 = next(iter(ts))
    t = dict(ts)
    if how == "nan":
        t[k0] = ts[k0].clone()
        t[k0].view(-1)[3] = float("nan")
    elif how == "inf":
        t[k0] = ts[k0].clone()
        t[k0].view(-1)[0] = float("-inf")
    elif how == "complex":
        t = {k: v.to(torch.complex64) for k, v in ts.items()}
    elif how == "int-key":
        t[3] = ts[k0]
    p = d / f"{how}.pth"
    torch.save(t, p)
    return p


@pytest.mark.parametrize(
    "how, expect",
    [("nan", "NaN or infinite"), ("inf", "NaN or infinite"), ("complex", "is complex64"), ("int-key", "not a string")],
)
def test_bad_state_tuning_is_refused(rwkv6, tmp_path, how, expect):
    ck, ts, d = rwkv6
    bad = _tuning(ts, tmp_path, how)
    msg = one_error(invoke("export", ck, "-o", tmp_path / "m.onnx", "-q", "--state-tuning", bad))
    assert expect in msg
    msg = one_error(invoke("convert-state", ck, bad, "-o", tmp_path / "s.npz"))
    assert expect in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == [bad.name]


def test_convert_state_writes_all_or_nothing_and_never_over_an_input(rwkv6, tmp_path, monkeypatch):
    ck, ts, d = rwkv6
    tuning = tmp_path / "t.pth"
    torch.save(ts, tuning)
    out = tmp_path / "s.npz"
    out.write_bytes(b"old state")
    real = os.replace

    def full(a, b):
        if Path(b) == out and safe_write.PREFIX in str(a) and not str(a).endswith("/old/0"):
            raise OSError(errno.ENOSPC, "No space left on device")  # the new file onto the target
        return real(a, b)

    monkeypatch.setattr(os, "replace", full)
    msg = one_error(invoke("convert-state", ck, tuning, "-o", out))
    assert "left unchanged" in msg and out.read_bytes() == b"old state"
    monkeypatch.setattr(os, "replace", real)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz", "t.pth"]
    os.link(tuning, tmp_path / "hard.npz")
    before = tuning.read_bytes()
    assert "is an input" in one_error(invoke("convert-state", ck, tuning, "-o", tmp_path / "hard.npz"))
    assert tuning.read_bytes() == before
    assert invoke("convert-state", ck, tuning, "-o", out).exit_code == 0
    import numpy as np

    with np.load(out) as z:
        assert all(np.isfinite(z[k]).all() for k in z.files)


# -- options ------------------------------------------------------------------------------------------
def test_tokenizer_bytes_needs_a_256_token_vocabulary(tmp_path):
    ck = random_rwkv4(tmp_path / "v301.pth", n_embd=32, n_layer=1, ffn=64, vocab=301)
    with pytest.raises(ExportError, match="--tokenizer bytes needs a 256-token vocabulary; this model has 301"):
        export(ck, tmp_path / "m.onnx", ExportOptions(tokenizer="bytes"))
    assert not (tmp_path / "m.onnx").exists()


def test_graphs_named_twice(tmp_path):
    msg = one_error(
        invoke("export", ref_model("golden-rwkv7"), "-o", tmp_path / "m.onnx", "-q", "--graphs", "step,step")
    )
    assert "--graphs names step more than once" in msg and str(tmp_path) not in msg
    assert list(tmp_path.iterdir()) == []


# -- mobile ---------------------------------------------------------------------------------------------
def test_mobile_with_an_external_data_path_outside_the_folder(tmp_path):
    import onnx

    d = tmp_path / "m"
    d.mkdir()
    export(ref_model("golden-rwkv7"), d / "m.onnx", ExportOptions(external_data=True, graphs=("step",)))
    m = onnx.load(str(d / "m.onnx"), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = str(d / "m.onnx.data")  # an absolute path: outside what the command was given
    onnx.save(m, str(d / "abs.onnx"))
    res = invoke("mobile", d / "abs.onnx", "-o", tmp_path / "mob")
    assert "outside" in one_error(res) or "not a file in the model's folder" in one_error(res)
    assert not (tmp_path / "mob").exists() and not list(tmp_path.glob(".rwkv-export-*"))


def test_mobile_failure_at_the_commit_leaves_nothing(tmp_path, monkeypatch):
    d = tmp_path / "m"
    d.mkdir()
    export(ref_model("golden-rwkv7"), d / "m.onnx", ExportOptions(graphs=("step",)))
    real = os.replace
    target = tmp_path / "mob"

    def full(a, b):
        if Path(b) == target:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(a, b)

    monkeypatch.setattr(os, "replace", full)
    msg = one_error(invoke("mobile", d / "m.onnx", "-o", target))
    assert "was not written" in msg and "rwkv-export-" not in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


# -- validate ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_validate_steps_on_a_sequence_only_export_checks_that_many_steps(tmp_path):
    """`--steps 4` on a sequence-only export checked one call (4 tokens < --chunk 8) and printed PASS."""
    ck = ref_model("golden-rwkv7")
    out = export(ck, tmp_path / "m.onnx", ExportOptions(graphs=("sequence",)))[0]
    res = invoke("validate", out, "--reference", ck, "--steps", "4")
    assert res.exit_code == 0, res.output
    verdict = next(ln for ln in res.output.splitlines() if ln.startswith(("PASS", "FAIL")))  # summary first
    assert verdict.startswith("PASS: 4 teacher-forced and 4 free-running steps"), res.output
    assert "calls of the sequence graph, 8 tokens each" in verdict
