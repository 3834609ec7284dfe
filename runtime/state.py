"""``State``: the recurrent state of a batch, held as backend values (OrtValues, device tensors).

A state is never aliased: ``numpy()`` and ``state[name]`` return copies, and no runtime call writes
into a state a caller holds (backends write every step's outputs into buffers no live State refers to).
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np

from .errors import RuntimeUserError, nonempty_list

STATE_DTYPES = {"float32": np.float32, "float16": np.float16}
EXPORT_ID_KEY = "__rwkv_export_id__"  # the export a saved state belongs to (an .npz member)
MAX_STATE_BATCH = 1 << 16  # a saved state claiming more rows than this is refused (a damaged header)


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
            raise RuntimeUserError(
                f"no state tensor {name!r} (this model has {len(self.specs)}, e.g. {self.specs[0].name})"
            )
        return np.array(self._backend.to_numpy(self._values[name]), copy=True)

    def keys(self):
        return [s.name for s in self.specs]

    def copy(self) -> State:
        """An independent copy."""
        return State(
            {k: self._backend.from_numpy(v) for k, v in self.numpy().items()},
            self.specs,
            self.batch_size,
            self._backend,
            self.export_id,
        )

    def save(self, path, inputs=()) -> None:
        """Write the state to an ``.npz`` (plain arrays and the export id; loading it never runs code).

        All or nothing (``rwkv_runtime.safe_write``): staged in a private folder beside ``path``, then
        renamed over it; on any failure (disk full, permission, an exception, Ctrl-C) ``path`` keeps its
        old content and nothing is left behind. ``inputs``: files that must never be replaced (the
        model's own files: ``Session.save_state`` passes them), compared as the same file (links too).
        """
        from .safe_write import OutputIsInput, write_file

        if not isinstance(path, (str, os.PathLike)):
            raise RuntimeUserError(f"State.save needs a file path (str or Path), not {type(path).__name__}")
        path = Path(path)
        try:
            if path.is_dir():
                raise RuntimeUserError(f"{path}: is a directory")
            if not (path.parent if str(path.parent) else Path(".")).is_dir():
                raise RuntimeUserError(f"{path}: cannot write the state (the folder {path.parent} does not exist)")
        except (OSError, ValueError) as e:  # a NUL in the name, a name too long
            if isinstance(e, RuntimeUserError):
                raise
            raise RuntimeUserError(
                f"{str(path)[:200]}: cannot write the state ({getattr(e, 'strerror', None) or e})"
            ) from None
        arrays = self.numpy()
        arrays[EXPORT_ID_KEY] = np.array(self.export_id)

        def write(p):
            with open(p, "wb") as f:
                np.savez(f, **arrays)

        try:
            write_file(path, write, inputs=inputs)
        except OutputIsInput as e:
            raise RuntimeUserError(
                f"{path}: is one of the model's files ({e.input.name}); a state would replace it: choose another path"
            ) from None
        except (OSError, ValueError) as e:  # ValueError: a NUL in the name
            raise RuntimeUserError(
                f"{path}: cannot write the state ({getattr(e, 'strerror', None) or e}); "
                "an existing file was left unchanged"
            ) from None

    def select(self, rows) -> State:
        """The states of some sequences of the batch (gather along the batch axis)."""
        try:
            arr = np.asarray(rows)
        except ValueError:  # ragged
            arr = np.asarray([None], dtype=object)
        if arr.size and arr.dtype.kind not in "iu":  # never truncate 0.5 to row 0, nor parse '1'
            raise RuntimeUserError(f"State.select needs integer row indices, not {str(rows)[:40]}")
        rows = arr.astype(np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.batch_size):
            raise RuntimeUserError(f"batch rows {rows.tolist()} out of range for a batch of {self.batch_size}")
        if not rows.size:
            raise RuntimeUserError("State.select needs at least one row")
        arrays = {k: np.ascontiguousarray(v[rows]) for k, v in self.numpy().items()}
        return State(
            {k: self._backend.from_numpy(v) for k, v in arrays.items()},
            self.specs,
            len(rows),
            self._backend,
            self.export_id,
        )

    @staticmethod
    def concat(states: list) -> State:
        """Join the states of several batches into one batch (sequences joining a running batch)."""
        states = nonempty_list(states, "State.concat needs a list of States", "State.concat needs at least one state")
        bad = next((s for s in states if not isinstance(s, State)), None)
        if bad is not None:
            raise RuntimeUserError(f"State.concat joins States, not {type(bad).__name__}")
        first = states[0]
        if any(s.export_id != first.export_id or s.keys() != first.keys() for s in states):
            raise RuntimeUserError("State.concat: the states belong to different models")
        arrays = [s.numpy() for s in states]
        joined = {k: np.concatenate([a[k] for a in arrays], 0) for k in arrays[0]}
        return State(
            {k: first._backend.from_numpy(v) for k, v in joined.items()},
            first.specs,
            sum(s.batch_size for s in states),
            first._backend,
            first.export_id,
        )

    def __repr__(self):
        return f"State(batch_size={self.batch_size}, tensors={len(self.specs)})"


# ---------------------------------------------------------------------------------------------
# Reading saved states: every check before any data is read
# ---------------------------------------------------------------------------------------------
def check_state_arrays(arrays: dict, specs: list, where: str, batch: int | None) -> dict:
    """Names, dtypes (float32 accepted for float16 specs, converted), shapes; returns contiguous arrays."""
    by_name = {s.name: s for s in specs}
    for k in arrays:
        if k not in by_name:
            raise RuntimeUserError(f"{where}: names {str(k)[:60]!r}, which this model has no state tensor for")
    out = {}
    for k, a in arrays.items():
        s = by_name[k]
        a = np.asarray(a)
        if a.dtype not in (np.dtype(np.float32), np.dtype(s.dtype)):
            raise RuntimeUserError(f"{where}: state tensor {k} has dtype {a.dtype}, expected {s.dtype}")
        if (
            a.ndim != len(s.shape)
            or a.ndim == 0
            or tuple(a.shape) != s.concrete_shape(a.shape[0])
            or (batch is not None and a.shape[0] != batch)
        ):
            raise RuntimeUserError(f"{where}: state tensor {k} has shape {list(a.shape)}, expected {s.shape}")
        if np.isnan(a).any():
            raise RuntimeUserError(f"{where}: state tensor {k} holds NaN")
        out[k] = np.ascontiguousarray(a, dtype=STATE_DTYPES[s.dtype])
    return out


def _read_data(f, shape, dtype, fortran: bool, where: str) -> np.ndarray:
    """The data after an .npy header: exactly prod(shape) items, else the file is truncated."""
    n = int(np.prod(shape)) * dtype.itemsize
    raw = f.read(n)
    if len(raw) != n:
        raise RuntimeUserError(f"{where}: truncated state file")
    return np.frombuffer(raw, dtype).reshape(shape, order="F" if fortran else "C").copy()


def read_state_npz(
    source, specs: list, where: str, export_id: str = "", batch: int | None = None, require_all: bool = True
) -> dict:
    """A saved state (.npz path or bytes) -> {name: array}, checked before any data is read.

    Each member's .npy header (dtype, shape) is checked against the manifest and its stored size before
    the data is loaded; pickled objects are never loaded. A state saved by another export (a different
    non-empty export id) is refused; states without an id (older saves) are accepted.
    """
    try:
        zf = zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source)
    except FileNotFoundError:
        raise RuntimeUserError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise RuntimeUserError(f"{where}: is a directory, not a state file") from None
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise RuntimeUserError(f"{where}: not a saved state (.npz) ({str(e)[:80]})") from None
    by_name = {s.name: s for s in specs}
    arrays, saved_id = {}, ""
    with zf:
        try:
            for info in zf.infolist():
                name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                if name != EXPORT_ID_KEY and name not in by_name:
                    raise RuntimeUserError(f"{where}: names {name[:60]!r}, which this model has no state tensor for")
                with zf.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f, max_header_size=10000)
                    elif version == (2, 0):
                        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f, max_header_size=10000)
                    else:
                        raise RuntimeUserError(f"{where}: member {name[:60]} has .npy version {version}")
                    header_len = f.tell() if f.seekable() else None
                    if dtype.hasobject:
                        raise RuntimeUserError(f"{where}: member {name[:60]} holds Python objects (refused)")
                    if name == EXPORT_ID_KEY:
                        if dtype.kind != "U" or shape != () or dtype.itemsize > 4 * 256:
                            raise RuntimeUserError(f"{where}: malformed export id")
                        saved_id = str(_read_data(f, (), dtype, False, where))
                        continue
                    s = by_name[name]
                    if len(shape) != len(s.shape) or not shape or not 1 <= shape[0] <= MAX_STATE_BATCH:
                        raise RuntimeUserError(
                            f"{where}: state tensor {name} has shape {list(shape)}, expected {s.shape}"
                        )
                    if tuple(shape) != s.concrete_shape(shape[0]):
                        raise RuntimeUserError(
                            f"{where}: state tensor {name} has shape {list(shape)}, expected {s.shape}"
                        )
                    if header_len is not None and info.file_size != header_len + int(np.prod(shape)) * dtype.itemsize:
                        raise RuntimeUserError(f"{where}: state tensor {name} is truncated or oversized")
                    arrays[name] = _read_data(f, shape, dtype, fortran, where)
        except RuntimeUserError:
            raise
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError, TypeError, SyntaxError) as e:
            raise RuntimeUserError(
                f"{where}: not a saved state (.npz) ({str(e).splitlines()[0][:80] if str(e) else type(e).__name__})"
            ) from None
    if saved_id and export_id and saved_id != export_id:
        raise RuntimeUserError(
            f"{where}: this state was saved from another export (id {saved_id[:16]}), not from "
            f"this model (id {export_id[:16]}); states only load into the model that made them"
        )
    if require_all:
        missing = [s.name for s in specs if s.name not in arrays]
        if missing:
            raise RuntimeUserError(f"{where}: state is missing {len(missing)} tensor(s), e.g. {missing[0]}")
    arrays = check_state_arrays(arrays, specs, where, None)
    rows = {a.shape[0] for a in arrays.values()}
    if len(rows) > 1 or (batch is not None and rows and rows != {batch}):
        raise RuntimeUserError(f"{where}: state tensors disagree on the batch size ({sorted(rows)})")
    return arrays


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
