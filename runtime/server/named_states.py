"""Named initial states (``serve --state NAME=FILE``): a client picks one with ``model: "MODEL:NAME"``.

A named state is the whole batch-1 state a request starts from, exactly what
``Session(model, initial_state=FILE).new_state(1)`` gives (computed through that same code). Its
prefix-cache base is ``state:NAME:<digest of the arrays>``, so a prefix read from one named state
never matches the same tokens read from another state or from the model's own start.

Files: an ``.npz`` (``Session.save_state`` / ``State.save``, bound to this export; or
``rwkv-export convert-state``'s, unbound). A state-tuning ``.pth``/``.safetensors`` needs torch to read:
``rwkv-export serve`` converts it before starting (``converted``); the torch-free
``python -m rwkv_runtime.server`` refuses it with the command that converts it.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rwkv_runtime import RuntimeUserError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


@dataclass(frozen=True)
class NamedState:
    name: str
    arrays: dict  # {state tensor name: array [1, ...]}
    base: str  # the prefix cache's base for prompts read from it


def parse(specs) -> list:
    """``("NAME=FILE", ...)`` -> [(NAME, Path)], names checked and unique."""
    out, seen = [], set()
    for spec in specs or ():
        name, eq, file = str(spec).partition("=")
        if not eq or not file:
            raise RuntimeUserError(f"--state {spec!r}: expected NAME=FILE")
        if not NAME.match(name):
            raise RuntimeUserError(
                f"--state {spec!r}: NAME must be letters, digits, '.', '_' or '-' "
                "(at most 64, starting with a letter or digit)"
            )
        if name in seen:
            raise RuntimeUserError(f"--state {name}: given twice")
        seen.add(name)
        out.append((name, Path(file)))
    return out


def digest(arrays: dict) -> str:
    h = hashlib.blake2b(digest_size=16)
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(k.encode() + b"\0" + str(a.dtype).encode() + repr(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def load(session, specs, converted: dict | None = None) -> dict:
    """{NAME: NamedState} for ``--state`` values; ``converted``: {NAME: {state name: array}} read by the
    caller (state-tuning files, which need torch)."""
    out = {}
    for name, path in parse(specs):
        src = (converted or {}).get(name)
        if src is None:
            if path.suffix.lower() in TORCH_SUFFIXES:
                raise RuntimeUserError(
                    f"--state {name}={path}: a state-tuning file needs torch to read; serve with `rwkv-export serve` "
                    f"(it converts it), or convert it first: rwkv-export convert-state CHECKPOINT {path} -o STATE.npz"
                )
            if not path.is_file():
                raise RuntimeUserError(f"--state {name}={path}: no such file")
            src = path
        arrays = _start_state(session, src, f"--state {name}={path}")
        out[name] = NamedState(name, arrays, f"state:{name}:{digest(arrays)}")
    return out


def _start_state(session, src, what: str) -> dict:
    """What ``Session(..., initial_state=src).new_state(1)`` holds, through that same code; the session's
    own initial state is left as it was."""
    saved = session._initial
    try:
        session.set_initial_state(src)
        return session.new_state(1).numpy()
    except RuntimeUserError as e:
        raise RuntimeUserError(f"{what}: {e}") from None
    finally:
        session._initial = saved
