"""``State``: the recurrent state of a batch, held as backend values (OrtValues, device tensors).

A state is never aliased: ``numpy()`` and ``state[name]`` return copies, and no runtime call writes
into a state a caller holds (backends write every step's outputs into buffers no live State refers to).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from .artifact import EXPORT_ID_KEY
from .errors import RuntimeUserError


class State:
    """One tensor per manifest state entry, plus the export it belongs to.

    Indexing (``state["state.0.wkv_pp"]``) returns a numpy copy. A state belongs to one backend; use
    ``numpy()`` / ``Session.state_from_numpy`` to move it between sessions or to disk.
    """

    def __init__(self, values: dict, specs: list, batch_size: int, backend, export_id: str = ""):
        self._values = values
        self.specs = specs
        self.batch_size = batch_size
        self._backend = backend
        self.export_id = export_id

    def numpy(self) -> dict:
        """{name: array}: fresh copies (writing into them never changes this state)."""
        return {s.name: np.array(self._backend.to_numpy(self._values[s.name]), copy=True) for s in self.specs}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._values:
            raise RuntimeUserError(f"no state tensor {name!r} (this model has {len(self.specs)}, e.g. {self.specs[0].name})")
        return np.array(self._backend.to_numpy(self._values[name]), copy=True)

    def keys(self):
        return [s.name for s in self.specs]

    def copy(self) -> "State":
        """An independent copy."""
        return State({k: self._backend.from_numpy(v) for k, v in self.numpy().items()}, self.specs,
                     self.batch_size, self._backend, self.export_id)

    def save(self, path) -> None:
        """Write the state to an ``.npz`` (plain arrays and the export id; loading it never runs code).

        Atomic: written to a temporary file in the same folder, then renamed over ``path``; on any
        failure (disk full, permission, an exception, Ctrl-C) the temporary file is removed and ``path``
        keeps its old content.
        """
        path = Path(path)
        if path.is_dir():
            raise RuntimeUserError(f"{path}: is a directory")
        arrays = self.numpy()
        arrays[EXPORT_ID_KEY] = np.array(self.export_id)
        try:
            fd, tmp = tempfile.mkstemp(prefix=".state-", suffix=".npz.tmp", dir=path.parent if str(path.parent) else ".")
        except OSError as e:
            raise RuntimeUserError(f"{path}: cannot write there ({e.strerror or e})") from None
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
        except BaseException as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if isinstance(e, OSError):
                raise RuntimeUserError(f"{path}: cannot write the state ({e.strerror or e})") from None
            raise

    def select(self, rows) -> "State":
        """The states of some sequences of the batch (gather along the batch axis)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.batch_size):
            raise RuntimeUserError(f"batch rows {rows.tolist()} out of range for a batch of {self.batch_size}")
        if not rows.size:
            raise RuntimeUserError("State.select needs at least one row")
        arrays = {k: np.ascontiguousarray(v[rows]) for k, v in self.numpy().items()}
        return State({k: self._backend.from_numpy(v) for k, v in arrays.items()}, self.specs, len(rows),
                     self._backend, self.export_id)

    @staticmethod
    def concat(states: list) -> "State":
        """Join the states of several batches into one batch (sequences joining a running batch)."""
        if not states:
            raise RuntimeUserError("State.concat needs at least one state")
        first = states[0]
        if any(s.export_id != first.export_id or s.keys() != first.keys() for s in states):
            raise RuntimeUserError("State.concat: the states belong to different models")
        arrays = [s.numpy() for s in states]
        joined = {k: np.concatenate([a[k] for a in arrays], 0) for k in arrays[0]}
        return State({k: first._backend.from_numpy(v) for k, v in joined.items()}, first.specs,
                     sum(s.batch_size for s in states), first._backend, first.export_id)

    def __repr__(self):
        return f"State(batch_size={self.batch_size}, tensors={len(self.specs)})"


def _umask() -> int:
    """The process umask, read without changing it (os.umask would race with other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022
