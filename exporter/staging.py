"""All-or-nothing replacement of a set of files (the graphs and the weights file of one export).

Files are written into a temporary folder beside the outputs (same filesystem, so moves are renames);
``commit`` then moves each into place, first moving any old file it replaces into the folder's
``old/``. If anything fails before the commit ends, every move is undone, so the folder holds
exactly the old set or exactly the new set. While committing, SIGINT and SIGTERM are deferred until
the commit ends, so an interrupt cannot land between two renames.

Only SIGKILL (or a power cut) can stop a commit halfway. For that the folder holds a journal while
committing; the next export to the same output finds the folder (``recover``), sees the journal and
rolls the set back to the old files, then removes the folder. A temporary folder without a journal
was never committed and is simply removed. A folder still locked by a live export is left alone.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; stale folders are then left for the user
    fcntl = None

PREFIX = ".rwkv-export-"
JOURNAL = "journal.json"
LOCK = ".lock"
_HELD = (signal.SIGINT, signal.SIGTERM)


class Terminated(BaseException):
    """SIGTERM arrived (a BaseException, like KeyboardInterrupt, so cleanup runs). ``committed``: it
    came during the commit, which was completed first."""

    def __init__(self, committed: bool = False):
        super().__init__()
        self.committed = committed


def _prefix(out: Path) -> str:
    return f"{PREFIX}{out.name}-"


def _locked_by_other(d: Path) -> bool:
    lock = d / LOCK
    if fcntl is None:
        return True
    if not lock.exists():  # just created by a live export, or killed before locking
        return time.time() - d.stat().st_mtime < 60
    with open(lock, "rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def _rollback_journal(d: Path) -> None:
    moves = json.loads((d / JOURNAL).read_text())["moves"]
    for i, staged, target in reversed(moves):
        target = Path(target)
        backup = d / "old" / str(i)
        if staged is not None and not (d / staged).exists() and os.path.lexists(target):
            os.replace(target, d / staged)  # the new file had been placed: take it back
        if backup.exists():
            os.replace(backup, target)


def recover(out: Path) -> None:
    """Undo or remove what an earlier, killed export to ``out`` left beside it."""
    for d in out.parent.glob(_prefix(out) + "*"):
        if not d.is_dir() or _locked_by_other(d):
            continue
        if (d / JOURNAL).exists():
            _rollback_journal(d)
        shutil.rmtree(d, ignore_errors=True)


class Staging:
    """``with Staging(out) as st:`` write into ``st.dir``, then ``st.commit([(name, target), ...])``."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.dir: Path | None = None
        self._lock = None
        self._old_term = None
        self._keep = False
        self._open: list = []  # files written into the folder, closed before it is removed

    def closing(self, f):
        """Close ``f`` (anything with ``close()``) when the staging ends, however it ends."""
        self._open.append(f)
        return f

    def __enter__(self) -> "Staging":
        recover(self.out)
        self.dir = Path(tempfile.mkdtemp(dir=self.out.parent, prefix=_prefix(self.out)))
        try:
            self._lock = open(self.dir / LOCK, "wb")
            if fcntl is not None:
                fcntl.flock(self._lock, fcntl.LOCK_EX)
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
            f.close()
        if self._old_term is not None:
            signal.signal(signal.SIGTERM, self._old_term)
        if self._lock is not None:
            self._lock.close()
        if not self._keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    def path(self, name: str) -> Path:
        return self.dir / name

    def commit(self, moves: list) -> None:
        """``moves``: (staged file name or None, target path); None removes the old target. The
        targets are replaced in the order given (put the file that names the others last)."""
        if threading.current_thread() is not threading.main_thread():
            return self._commit(moves)
        # Defer SIGINT/SIGTERM until the set is complete (or rolled back). Python runs signal handlers
        # in the main thread whichever thread the kernel picked, so swapping the handlers is enough
        # (a signal mask would not be: torch's and onnxruntime's threads would still take it).
        pending = []
        old = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in _HELD}
        try:
            self._commit(moves)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        if pending:  # the set is complete: now honour the signal
            raise KeyboardInterrupt() if pending[0] == signal.SIGINT else Terminated(committed=True)

    def _commit(self, moves: list) -> None:
        entries = [[i, staged, str(target)] for i, (staged, target) in enumerate(moves)]
        journal = self.dir / JOURNAL
        with open(journal, "w") as f:
            json.dump({"moves": entries}, f)
            f.flush()
            os.fsync(f.fileno())
        (self.dir / "old").mkdir()
        done = []  # (src, dst) of every rename made, to undo in reverse
        try:
            for i, staged, target in entries:
                if os.path.lexists(target):
                    os.replace(target, self.dir / "old" / str(i))
                    done.append((target, self.dir / "old" / str(i)))
                if staged is not None:
                    os.replace(self.dir / staged, target)
                    done.append((self.dir / staged, target))
        except BaseException:
            for src, dst in reversed(done):
                try:
                    os.replace(dst, src)
                except OSError:
                    self._keep = True  # folder and journal stay: the next export finishes the rollback
            if not self._keep:
                journal.unlink(missing_ok=True)
            raise
        journal.unlink()  # committed: what is left in the folder is only the old files
