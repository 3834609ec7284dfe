"""One way to write files: staged beside the target, committed all or nothing, never over an input.

Every writer of the project (export, build-engine, mobile, triton, web, ``validate --save-*``,
``State.save`` / ``Session.save_state``, ``convert-state``) goes through this module. It imports only
the standard library (the runtime package never needs torch or onnx).

API::

    from rwkv_runtime.safe_write import SafeWrite, write_file

    with SafeWrite(out, inputs=[checkpoint, tokenizer]) as sw:   # out: the main output path
        write_model(sw.path("m.onnx"))                           # files (or folders) staged in sw.dir
        write_weights(sw.path("m.onnx.data"))
        sw.commit([("m.onnx.data", out.with_name("m.onnx.data")),   # (staged name, target path) ...
                   (None, out.with_name("m.seq.onnx.data")),        # None: remove the old target
                   ("m.onnx", out)])                                # in this order; the main file last

    write_file(path, lambda p: np.savez(p, **arrays), inputs=[model])  # one file, the same guarantees

* **Staging.** ``sw.dir`` is a fresh private folder (mode 0700) ``.rwkv-export-<out name>-XXXXXXXX``
  in the target's folder, so every commit move is a rename on one file system.
* **Commit** (``commit``): each old target is renamed into ``sw.dir/old/<i>``, then each staged file
  renamed onto its target, in the order given. On any exception every rename is undone in reverse, so
  the folder holds exactly the old set or exactly the new set. SIGINT/SIGTERM are deferred during the
  commit (main thread) and honoured after it; during staging SIGTERM raises ``Terminated`` so the
  staging folder is removed. Staged files are fsync'ed before the commit and the folder after it.
* **Targets** are plain names in the folder of ``out`` (no other folder is ever written); a target that
  is an input (``inputs=``: same path, same file through a symlink or a hard link — ``os.path.samefile``
  and ``os.path.realpath`` —, or a folder holding an input) is refused with ``OutputIsInput`` before
  anything moves; so is a target that is a non-empty directory (only an empty folder is replaced).
* **SIGKILL / power cut** mid-commit leaves the staging folder with ``journal.json``. The next
  ``SafeWrite`` for the same ``out`` (or ``recover(out)``) rolls the set back to the old files and
  removes the folder. Recovery acts only on a journal it can prove it wrote: the folder's name is this
  output's prefix plus mkdtemp's 8 characters, folder and journal are plain (no symlink), owned by the
  current user, not writable by others; the journal names the inode of its own staging folder and of
  the output folder, and every entry is a plain target name (in ``allowed``, when given) whose backup
  lies inside the staging folder, and each file moved back must carry the inode the journal recorded.
  Anything else is left alone with a warning (logger ``rwkv_runtime.safe_write``). A staging folder
  without a journal (never committed) is removed; one still locked by a live writer is left alone.

Errors: ``OutputIsInput`` / ``UnsafeOutput`` are ``RuntimeUserError`` (one line for the CLI); ``OSError``
from the file system passes through (the caller names its own paths); ``Terminated`` on SIGTERM.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import stat
import tempfile
import threading
import time
from pathlib import Path

from .errors import RuntimeUserError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; stale folders are then left for the user
    fcntl = None

PREFIX = ".rwkv-export-"
JOURNAL = "journal.json"
LOCK = ".lock"
JOURNAL_VERSION = 1
_HELD = (signal.SIGINT, signal.SIGTERM)
_SUFFIX = re.compile(r"[a-z0-9_]{8}")  # tempfile.mkdtemp's random part
log = logging.getLogger("rwkv_runtime.safe_write")

__all__ = [
    "SafeWrite",
    "write_file",
    "recover",
    "check_not_inputs",
    "staging_folders",
    "Terminated",
    "OutputIsInput",
    "UnsafeOutput",
    "PREFIX",
    "JOURNAL",
]


class Terminated(BaseException):
    """SIGTERM arrived (a BaseException, like KeyboardInterrupt, so cleanup runs). ``committed``: it
    came during the commit, which was completed first."""

    def __init__(self, committed: bool = False):
        super().__init__()
        self.committed = committed


class UnsafeOutput(RuntimeUserError):
    """A target this module will not write (outside the output's folder, a non-empty directory ...)."""


class OutputIsInput(UnsafeOutput):
    """A target names a file (or a folder holding a file) the writer reads (``.output``, ``.input``)."""

    def __init__(self, msg: str, output=None, input=None):
        super().__init__(msg)
        self.output, self.input = output, input


def _prefix(out: Path) -> str:
    return f"{PREFIX}{out.name}-"


def _plain(name) -> bool:
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
        and (os.altsep is None or os.altsep not in name)
    )


def _same(a: Path, b: Path) -> bool:
    try:
        if os.path.samefile(a, b):
            return True
    except (OSError, ValueError):
        pass
    try:
        return os.path.realpath(a) == os.path.realpath(b) or os.path.abspath(a) == os.path.abspath(b)
    except (OSError, ValueError):
        return False


def _inside(inp: Path, folder: Path) -> bool:
    try:
        f = os.path.realpath(folder)
        return os.path.realpath(inp).startswith(f.rstrip(os.sep) + os.sep)
    except (OSError, ValueError):
        return False


def check_not_inputs(outputs, inputs) -> None:
    """Raise ``OutputIsInput`` if an output is one of ``inputs`` (by path, through a symlink, as a hard
    link of it) or a folder holding one."""
    inputs = [Path(i) for i in inputs if i is not None]
    for o in outputs:
        o = Path(o)
        for i in inputs:
            if _same(o, i) or (os.path.isdir(o) and _inside(i, o)):
                raise OutputIsInput(f"{o}: is an input ({i.name}); choose another output path", o, i)


def staging_folders(out) -> list:
    """The staging folders (live, abandoned or planted) that could belong to ``out``."""
    out = Path(out)
    pre = _prefix(out)
    try:
        names = os.listdir(out.parent if str(out.parent) else ".")
    except OSError:
        return []
    return [out.parent / n for n in names if n.startswith(pre) and _SUFFIX.fullmatch(n[len(pre) :])]


def _ours(st: os.stat_result) -> bool:
    """Owned by this user and not writable by anyone else."""
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return False
    return not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _locked_by_other(d: Path) -> bool:
    if fcntl is None:
        return True
    try:
        fd = os.open(d / LOCK, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:  # just created by a live writer, or killed before locking
        try:
            return time.time() - d.lstat().st_mtime < 60
        except OSError:  # the folder itself is gone: its writer (another thread or process) finished
            return True
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def _read_journal(d: Path, out: Path, allowed) -> list | None:
    """The journal's moves if it proves this module wrote it for ``out``; else None."""
    j = d / JOURNAL
    try:
        jst = j.lstat()
        if not stat.S_ISREG(jst.st_mode) or not _ours(jst) or jst.st_size > 1 << 20:
            return None
        with open(j, "rb") as f:
            doc = json.loads(f.read().decode("utf-8"))
        dst, pst = d.lstat(), os.stat(out.parent if str(out.parent) else ".")
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(doc, dict) or doc.get("version") != JOURNAL_VERSION or doc.get("output") != out.name:
        return None
    if doc.get("stage") != [dst.st_dev, dst.st_ino] or doc.get("folder") != [pst.st_dev, pst.st_ino]:
        return None  # copied, extracted or planted: not the folder this journal was written in
    moves = doc.get("moves")
    if not isinstance(moves, list) or len(moves) > 1024:
        return None
    seen = set()
    for i, m in enumerate(moves):
        if not isinstance(m, dict) or m.get("i") != i:
            return None
        staged, target = m.get("staged"), m.get("target")
        if not _plain(target) or target in seen or (allowed is not None and target not in allowed):
            return None
        if staged is not None and (not _plain(staged) or staged in (JOURNAL, LOCK, "old")):
            return None
        for k in ("new", "old"):
            if m.get(k) is not None and (isinstance(m[k], bool) or not isinstance(m[k], int)):
                return None
        seen.add(target)
    return moves


def _rollback(d: Path, out: Path, moves: list) -> None:
    folder = out.parent
    for m in reversed(moves):
        target = folder / m["target"]
        backup = d / "old" / str(m["i"])
        try:
            tst = target.lstat()
        except FileNotFoundError:
            tst = None
        if (
            m["staged"] is not None
            and tst is not None
            and m["new"] is not None
            and tst.st_ino == m["new"]
            and not os.path.lexists(d / m["staged"])
        ):
            os.replace(target, d / m["staged"])  # the new file had been placed: take it back
        try:
            bst = backup.lstat()
        except FileNotFoundError:
            continue
        if m["old"] is not None and bst.st_ino == m["old"]:
            os.replace(backup, target)


def recover(out, allowed=None) -> None:
    """Undo or remove what an earlier, killed write to ``out`` left beside it (see the module doc).

    ``allowed``: the target names a write to ``out`` may have (None: any plain name in its folder)."""
    out = Path(out)
    allowed = None if allowed is None else {Path(a).name for a in allowed}
    for d in staging_folders(out):
        try:
            dst = d.lstat()
        except OSError:
            continue
        if not stat.S_ISDIR(dst.st_mode) or not _ours(dst):
            log.warning("%s: not a staging folder of this user; left alone", d)
            continue
        if _locked_by_other(d):
            continue
        if os.path.lexists(d / JOURNAL):
            moves = _read_journal(d, out, allowed)
            if moves is None:
                log.warning(
                    "%s: a journal this program cannot prove it wrote for %s; left alone (remove the "
                    "folder once you have checked it)",
                    d,
                    out.name,
                )
                continue
            try:
                _rollback(d, out, moves)
            except OSError as e:
                log.warning(
                    "%s: could not finish rolling back %s (%s); left for the next try", d, out.name, e.strerror or e
                )
                continue
        elif not stat.S_ISREG(_lstat_mode(d / LOCK)):
            log.warning("%s: not a staging folder of this program (no lock file); left alone", d)
            continue
        shutil.rmtree(d, ignore_errors=True)


def _lstat_mode(p: Path) -> int:
    try:
        return p.lstat().st_mode
    except OSError:
        return 0


def _ino(p) -> int | None:
    try:
        return os.lstat(p).st_ino
    except FileNotFoundError:
        return None


def _fsync_path(p: Path) -> None:
    """Flush a staged file (or every file of a staged folder) and the folder entry to disk."""
    if p.is_dir() and not p.is_symlink():
        for root, _, files in os.walk(p):
            for f in files:
                _fsync_path(Path(root) / f)
        flags = os.O_RDONLY
    elif p.is_file() and not p.is_symlink():
        flags = os.O_RDONLY
    else:
        return
    try:
        fd = os.open(p, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems (and directories on some) do not support it
        pass
    finally:
        os.close(fd)


class SafeWrite:
    """``with SafeWrite(out, inputs=...) as sw:`` write into ``sw.dir``, then ``sw.commit(moves)``."""

    def __init__(self, out, inputs=(), allowed=None, fsync: bool = True):
        self.out = Path(out)
        self.inputs = [Path(i) for i in inputs if i is not None]
        self.allowed = allowed  # the target names this output's writes use (for recovery)
        self.fsync = fsync
        self.dir: Path | None = None
        self._lock = None
        self._old_term = None
        self._keep = False
        self._open: list = []

    def closing(self, f):
        """Close ``f`` (anything with ``close()``) when the staging ends, however it ends."""
        self._open.append(f)
        return f

    def __enter__(self) -> SafeWrite:
        check_not_inputs([self.out], self.inputs)
        recover(self.out, self.allowed)
        self.dir = Path(
            tempfile.mkdtemp(dir=self.out.parent if str(self.out.parent) else ".", prefix=_prefix(self.out))
        )
        try:
            # locked under another name, then renamed: another writer's recover() never finds the lock
            # file unlocked while this one is alive (it would take the folder for abandoned and remove it)
            self._lock = open(self.dir / (LOCK + "-new"), "wb")
            if fcntl is not None:
                fcntl.flock(self._lock, fcntl.LOCK_EX)
            os.rename(self.dir / (LOCK + "-new"), self.dir / LOCK)
        except BaseException:
            self.__exit__()
            raise
        if threading.current_thread() is threading.main_thread():

            def _raise(signum, frame):
                raise Terminated()

            self._old_term = signal.signal(signal.SIGTERM, _raise)
        return self

    def __exit__(self, *exc) -> None:
        for f in self._open:
            try:
                f.close()
            except Exception:  # noqa: BLE001 - closing after a failure must not hide it
                pass
        if self._old_term is not None:
            signal.signal(signal.SIGTERM, self._old_term)
            self._old_term = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        if self.dir is not None and not self._keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    def path(self, name: str) -> Path:
        if not _plain(name) or name in (JOURNAL, LOCK, LOCK + "-new", "old"):
            raise UnsafeOutput(f"{name!r}: not a plain file name for staging")
        return self.dir / name

    def _check_moves(self, moves: list) -> list:
        folder = os.path.realpath(self.out.parent if str(self.out.parent) else ".")
        entries, seen = [], set()
        for i, (staged, target) in enumerate(moves):
            target = Path(target)
            if not _plain(target.name) or os.path.realpath(target.parent if str(target.parent) else ".") != folder:
                raise UnsafeOutput(f"{target}: outside the output's folder {self.out.parent}")
            if target.name in seen:
                raise UnsafeOutput(f"{target}: named twice in one write")
            seen.add(target.name)
            if staged is not None and not os.path.lexists(self.path(staged)):
                raise FileNotFoundError(2, "staged file missing", str(self.dir / staged))
            if target.is_dir() and not target.is_symlink() and any(target.iterdir()):
                raise UnsafeOutput(f"{target}: is a directory that is not empty; remove it or choose another output")
            entries.append(
                {
                    "i": i,
                    "staged": staged,
                    "target": target.name,
                    "new": _ino(self.dir / staged) if staged is not None else None,
                    "old": _ino(target),
                }
            )
        check_not_inputs([Path(t) for _, t in moves], self.inputs)
        return entries

    def commit(self, moves: list) -> None:
        """``moves``: (staged name or None, target path); None removes the old target. The targets are
        replaced in the order given (put the file that names the others last)."""
        entries = self._check_moves(moves)
        if self.fsync:
            for e in entries:
                if e["staged"] is not None:
                    _fsync_path(self.dir / e["staged"])
        if threading.current_thread() is not threading.main_thread():
            return self._commit(entries)
        # Defer SIGINT/SIGTERM until the set is complete (or rolled back). Python runs signal handlers
        # in the main thread whichever thread the kernel picked, so swapping the handlers is enough.
        pending = []
        old = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in _HELD}
        try:
            self._commit(entries)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        if pending:  # the set is complete: now honour the signal
            raise KeyboardInterrupt() if pending[0] == signal.SIGINT else Terminated(committed=True)

    def _commit(self, entries: list) -> None:
        folder = self.out.parent
        dst, pst = self.dir.lstat(), os.stat(folder if str(folder) else ".")
        doc = {
            "version": JOURNAL_VERSION,
            "output": self.out.name,
            "stage": [dst.st_dev, dst.st_ino],
            "folder": [pst.st_dev, pst.st_ino],
            "moves": entries,
        }
        journal = self.dir / JOURNAL
        with open(journal, "w") as f:
            json.dump(doc, f)
            f.flush()
            os.fsync(f.fileno())
        (self.dir / "old").mkdir()
        done = []  # (src, dst) of every rename made, to undo in reverse
        try:
            for e in entries:
                target = folder / e["target"]
                if os.path.lexists(target):
                    try:
                        os.replace(target, self.dir / "old" / str(e["i"]))
                        done.append((target, self.dir / "old" / str(e["i"])))
                    except FileNotFoundError:  # another writer of the same output moved it away since:
                        pass  # nothing of ours to keep (the last writer wins, with a complete file)
                if e["staged"] is not None:
                    os.replace(self.dir / e["staged"], target)
                    done.append((self.dir / e["staged"], target))
        except BaseException:
            for src, dst_ in reversed(done):
                try:
                    os.replace(dst_, src)
                except OSError:
                    self._keep = True  # folder and journal stay: the next write finishes the rollback
            if not self._keep:
                journal.unlink(missing_ok=True)
            raise
        journal.unlink()  # committed: what is left in the folder is only the old files
        if self.fsync:
            _fsync_path_dir(folder)


def _fsync_path_dir(folder: Path) -> None:
    try:
        fd = os.open(folder if str(folder) else ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_file(target, write, inputs=(), mode: int | None = None) -> Path:
    """Write one file all or nothing: ``write(path)`` fills a staged path, which then replaces ``target``.

    ``inputs``: files the caller read (never replaced). ``mode``: permission bits (default: the umask's)."""
    target = Path(target)
    if target.is_dir() and not target.is_symlink():
        raise UnsafeOutput(f"{target}: is a directory")
    with SafeWrite(target, inputs=inputs, allowed=[target.name]) as sw:
        staged = sw.path("new")
        write(staged)
        if mode is not None:
            os.chmod(staged, mode)
        sw.commit([("new", target)])
    return target
