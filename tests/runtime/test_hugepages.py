"""runtime/hugepages.py: only the memory that appeared since a snapshot, and only when nearly all of it is
resident, is moved to huge pages; a Session's results do not depend on it."""

from __future__ import annotations

import ctypes
import mmap
import sys
from pathlib import Path

import numpy as np
import pytest

from rwkv_runtime import Session
from rwkv_runtime.hugepages import HUGE_PAGE, anonymous_regions, collapse_new


def _thp_mode() -> str | None:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    return text[text.index("[") + 1 : text.index("]")]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def _regions(*sizes: int) -> list:
    """Anonymous private read-write regions of these sizes, each between two read-only pages (so the
    kernel cannot merge it with its neighbours into one mapping); their addresses."""
    page = mmap.PAGESIZE
    base = _libc.mmap(None, sum(sizes) + page * (len(sizes) + 1), 3, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    assert base not in (None, ctypes.c_void_p(-1).value)
    out, at = [], base
    for n in sizes:
        _libc.mprotect(at, page, mmap.PROT_READ)
        out.append(at + page)
        at += page + n
    _libc.mprotect(at, page, mmap.PROT_READ)
    return out


def _huge_bytes_at(addr: int) -> int:
    """AnonHugePages of the mapping holding ``addr``."""
    cur, huge = False, 0
    for line in open("/proc/self/smaps"):
        head = line.split()
        if "-" in head[0] and not head[0].endswith(":"):
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            cur = lo <= addr < hi
        elif cur and head[0] == "AnonHugePages:":
            huge = int(head[1]) * 1024
    return huge


needs_thp = pytest.mark.skipif(
    not sys.platform.startswith("linux") or _thp_mode() not in ("always", "madvise"),
    reason="needs Linux with transparent huge pages (always or madvise)",
)


@needs_thp
def test_only_new_resident_regions_are_collapsed():
    (old,) = _regions(8 * HUGE_PAGE)
    ctypes.memset(old, 1, 8 * HUGE_PAGE)  # resident, but there before the snapshot
    before = anonymous_regions()
    new, sparse = _regions(8 * HUGE_PAGE, 64 * HUGE_PAGE)
    ctypes.memset(new, 1, 8 * HUGE_PAGE)  # written after it; sparse: never written, must not be filled in
    ctypes.memset(sparse, 2, 4096)
    done = collapse_new(before)
    if done == 0:
        pytest.skip("the kernel refused MADV_COLLAPSE (older than 6.1, or a sandbox)")
    assert _huge_bytes_at(new) >= 6 * HUGE_PAGE
    assert _huge_bytes_at(old) == 0 and _huge_bytes_at(sparse) == 0
    assert ctypes.string_at(new, 8 * HUGE_PAGE) == b"\x01" * (8 * HUGE_PAGE)  # contents untouched
    assert ctypes.string_at(sparse, 8192) == b"\x02" * 4096 + bytes(4096)


def test_no_collapse_outside_linux(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert collapse_new({}) == 0


def test_a_session_gives_the_same_results_with_and_without_huge_pages(rwkv4_exports):
    outs = []
    for huge in (True, False):
        s = Session(rwkv4_exports["plain"], huge_pages=huge)
        st, logits = None, []
        for t in (1, 2, 3, 4):
            lo, st = s.step(np.array([t]), st)
            logits.append(lo)
        outs.append((np.stack(logits), s.prefill(np.array([[5, 6, 7, 8, 9]]))[0]))
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)
