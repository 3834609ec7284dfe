"""rwkv_runtime.safe_write, the one write primitive: all-or-nothing commits under failures at every
rename and under signals, recovery after SIGKILL, inputs never replaced, and recovery that ignores
journals it did not write (issue #24: a planted journal made the next export delete and create files
anywhere its paths pointed)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rwkv_runtime import safe_write as sw
from rwkv_runtime.safe_write import OutputIsInput, SafeWrite, Terminated, UnsafeOutput, recover, write_file


def _set(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def _write_set(d: Path, tag: bytes, names=("m.bin", "m.bin.data", "m.seq.bin")):
    out = d / names[0]
    with SafeWrite(out, allowed=names) as w:
        for n in names:
            w.path(n).write_bytes(tag + n.encode())
        w.commit([(n, d / n) for n in reversed(names)])
    return out


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    _write_set(d, b"old:")
    return d


def _staging(d: Path) -> list:
    return [p for p in d.iterdir() if p.name.startswith(sw.PREFIX)]


# -- planted journals ---------------------------------------------------------------------------------
def _plant(d: Path, doc, name="m.bin", suffix="abcd1234") -> Path:
    st = d / f"{sw.PREFIX}{name}-{suffix}"
    (st / "old").mkdir(parents=True)
    (st / sw.JOURNAL).write_text(json.dumps(doc))
    (st / sw.LOCK).write_bytes(b"")
    return st


def test_planted_journal_with_outside_paths_is_ignored(folder, tmp_path, caplog):
    """The issue's case: the journal names files outside the folder; the old code moved a planted
    'backup' over them and moved them into the staging folder (then deleted it)."""
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    created = tmp_path / "created.txt"
    st = _plant(folder, {"moves": [[0, "evil", str(victim)], [1, None, str(created)]]})
    (st / "old" / "1").write_bytes(b"planted")
    before = _set(folder)
    with caplog.at_level(logging.WARNING, logger="rwkv_runtime.safe_write"):
        _write_set(folder, b"new:")  # a write to the same output runs recovery first
    assert victim.read_bytes() == b"precious" and not created.exists()
    assert st.is_dir() and (st / "old" / "1").read_bytes() == b"planted", "a planted folder is left alone"
    assert "cannot prove" in caplog.text
    assert _set(folder) != before and all(v.startswith(b"new:") for v in _set(folder).values())


@pytest.mark.parametrize("target", ["../victim.txt", "/etc/passwd", "sub/m.bin", "..", ""])
def test_journal_entries_outside_the_output_set_are_ignored(folder, tmp_path, target):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    st = _plant(folder, {})
    dst, pst = st.lstat(), folder.stat()
    doc = {
        "version": 1,
        "output": "m.bin",
        "stage": [dst.st_dev, dst.st_ino],
        "folder": [pst.st_dev, pst.st_ino],
        "moves": [{"i": 0, "staged": None, "target": target, "new": None, "old": victim.stat().st_ino}],
    }
    (st / sw.JOURNAL).write_text(json.dumps(doc))
    os.link(victim, st / "old" / "0")
    before = _set(folder)
    recover(folder / "m.bin", allowed=["m.bin", "m.bin.data", "m.seq.bin"])
    assert victim.read_bytes() == b"precious" and _set(folder) == before and st.is_dir()


def test_a_well_formed_journal_copied_into_a_planted_folder_is_ignored(folder):
    """A journal that would pass every name check, but was not written in this folder (an archive
    extracted beside the output): its folder's inode is not the one it names."""
    st = _plant(folder, {})
    pst = folder.stat()
    doc = {
        "version": 1,
        "output": "m.bin",
        "stage": [1, 2],
        "folder": [pst.st_dev, pst.st_ino],
        "moves": [{"i": 0, "staged": "x", "target": "m.bin", "new": (folder / "m.bin").stat().st_ino, "old": None}],
    }
    (st / sw.JOURNAL).write_text(json.dumps(doc))
    before = _set(folder)
    recover(folder / "m.bin")
    assert _set(folder) == before and st.is_dir()


def test_backup_with_another_inode_is_not_restored(folder):
    st = _plant(folder, {})
    dst, pst = st.lstat(), folder.stat()
    (st / "old" / "0").write_bytes(b"planted")
    doc = {
        "version": 1,
        "output": "m.bin",
        "stage": [dst.st_dev, dst.st_ino],
        "folder": [pst.st_dev, pst.st_ino],
        "moves": [{"i": 0, "staged": None, "target": "m.bin", "new": None, "old": 12345}],
    }
    (st / sw.JOURNAL).write_text(json.dumps(doc))
    before = _set(folder)
    recover(folder / "m.bin")
    assert _set(folder) == before


@pytest.mark.parametrize("kind", ["symlink", "other-writable", "no-lock", "garbage", "symlinked-journal"])
def test_suspicious_staging_folders_are_left_alone(folder, tmp_path, kind):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_bytes(b"keep")
    name = folder / f"{sw.PREFIX}m.bin-zzzz9999"
    if kind == "symlink":
        os.symlink(elsewhere, name)
    else:
        name.mkdir()
        (name / "keep").write_bytes(b"keep")
        if kind != "no-lock":
            (name / sw.LOCK).write_bytes(b"")
        if kind == "other-writable":
            name.chmod(0o777)
        if kind == "garbage":
            (name / sw.JOURNAL).write_bytes(b"\xff{not json")
        if kind == "symlinked-journal":
            (elsewhere / "j").write_text("{}")
            os.symlink(elsewhere / "j", name / sw.JOURNAL)
    recover(folder / "m.bin")
    assert os.path.lexists(name) and (elsewhere / "keep").read_bytes() == b"keep"
    assert (name / "keep").read_bytes() == b"keep"


def test_abandoned_uncommitted_staging_folder_is_removed(folder):
    with SafeWrite(folder / "m.bin") as w:
        w._keep = True  # as a SIGKILL during staging leaves it
        w.path("m.bin").write_bytes(b"half")
    assert len(_staging(folder)) == 1
    recover(folder / "m.bin")
    assert not _staging(folder)


def test_a_folder_of_another_output_is_not_touched(folder):
    """.rwkv-export-m.bin-foo-XXXXXXXX belongs to output 'm.bin-foo', not 'm.bin'."""
    other = folder / f"{sw.PREFIX}m.bin-foo-abcd1234"
    other.mkdir()
    (other / sw.LOCK).write_bytes(b"")
    recover(folder / "m.bin")
    assert other.is_dir()


# -- SIGKILL mid-commit: the journal this module wrote is honoured ----------------------------------------
_KILL = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from rwkv_runtime.safe_write import SafeWrite
    d = Path(sys.argv[1]); stop = int(sys.argv[2])
    names = ("m.bin", "m.bin.data", "m.seq.bin")
    real, n = os.replace, [0]
    def replace(a, b):
        n[0] += 1
        if n[0] > stop:
            os.kill(os.getpid(), 9)
        return real(a, b)
    with SafeWrite(d / "m.bin", allowed=names) as w:
        for x in names:
            w.path(x).write_bytes(b"new:" + x.encode())
        os.replace = replace
        w.commit([(x, d / x) for x in reversed(names)])
""")


@pytest.mark.parametrize("stop", range(6))
def test_sigkill_at_every_rename_is_rolled_back(folder, stop):
    old = _set(folder)
    p = subprocess.run([sys.executable, "-c", _KILL, str(folder), str(stop)], capture_output=True)
    assert p.returncode == -signal.SIGKILL, p.stderr
    left = _staging(folder)
    assert len(left) == 1 and (left[0] / sw.JOURNAL).exists()
    recover(folder / "m.bin", allowed=("m.bin", "m.bin.data", "m.seq.bin"))
    assert not _staging(folder) and _set(folder) == old


# -- failures and signals in-process ------------------------------------------------------------------
@pytest.mark.parametrize("fail_at", range(7))
def test_exception_at_every_rename_leaves_the_old_set(folder, monkeypatch, fail_at):
    old = _set(folder)
    real, n = os.replace, [0]

    def replace(a, b):
        n[0] += 1
        if n[0] == fail_at + 1:
            raise OSError(28, "No space left on device")
        return real(a, b)

    monkeypatch.setattr(os, "replace", replace)
    try:
        _write_set(folder, b"new:")
    except OSError:
        assert _set(folder) == old
    else:
        assert all(v.startswith(b"new:") for v in _set(folder).values()) and fail_at >= 6
    assert not _staging(folder)


def test_sigterm_while_staging_removes_the_staging_folder(folder):
    old = _set(folder)
    with pytest.raises(Terminated):
        with SafeWrite(folder / "m.bin") as w:
            w.path("m.bin").write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGTERM)
    assert not _staging(folder) and _set(folder) == old


def test_signals_during_the_commit_are_deferred_until_it_ends(folder, monkeypatch):
    real = os.replace
    sent = []

    def replace(a, b):
        if not sent:
            sent.append(1)
            os.kill(os.getpid(), signal.SIGINT)
        return real(a, b)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        _write_set(folder, b"new:")
    assert all(v.startswith(b"new:") for v in _set(folder).values())


# -- inputs and the output folder ------------------------------------------------------------------
def test_an_input_is_never_replaced(tmp_path):
    src = tmp_path / "in.bin"
    src.write_bytes(b"input")
    os.link(src, tmp_path / "hard.bin")
    os.symlink(src, tmp_path / "soft.bin")
    sub = tmp_path / "sub"
    sub.mkdir()
    inner = sub / "in2.bin"
    inner.write_bytes(b"inner")
    for target in (src, tmp_path / "hard.bin", tmp_path / "soft.bin", tmp_path / "." / "in.bin"):
        with pytest.raises(OutputIsInput):
            write_file(target, lambda p: p.write_bytes(b"x"), inputs=[src])
    with pytest.raises(OutputIsInput):  # a companion of the set is the input
        with SafeWrite(tmp_path / "o.bin", inputs=[src]) as w:
            w.path("a").write_bytes(b"x")
            w.commit([("a", tmp_path / "o.bin"), (None, tmp_path / "hard.bin")])
    empty = tmp_path / "emptydir"
    empty.mkdir()
    with pytest.raises(UnsafeOutput):  # a folder holding an input, or any non-empty folder
        with SafeWrite(tmp_path / "x", inputs=[inner]) as w:
            w.path("a").mkdir()
            w.commit([("a", sub)])
    assert src.read_bytes() == b"input" and inner.read_bytes() == b"inner"
    assert (tmp_path / "soft.bin").is_symlink()
    assert not _staging(tmp_path)


def test_targets_outside_the_output_folder_are_refused(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(UnsafeOutput, match="outside"):
        with SafeWrite(tmp_path / "a" / "m.bin") as w:
            w.path("m.bin").write_bytes(b"x")
            w.commit([("m.bin", tmp_path / "m.bin")])
    with pytest.raises(UnsafeOutput):
        SafeWrite(tmp_path / "a" / "m.bin").__enter__().path("../x")
    assert not (tmp_path / "m.bin").exists()


def test_write_file_keeps_the_old_file_on_failure_and_follows_the_umask(tmp_path):
    t = tmp_path / "s.npz"
    t.write_bytes(b"old")

    def boom(p):
        p.write_bytes(b"partial")
        raise ValueError("boom")

    with pytest.raises(ValueError):
        write_file(t, boom)
    assert t.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["s.npz"]
    old = os.umask(0o027)
    try:
        write_file(t, lambda p: p.write_bytes(b"new"))
    finally:
        os.umask(old)
    assert t.read_bytes() == b"new" and t.stat().st_mode & 0o777 == 0o640
