"""Huge pages for the memory a session allocated while loading (Linux; a no-op elsewhere).

Why: a decode step reads every weight once, from onnxruntime's prepacked copies, which sit in 4 KiB
pages unless something asks for more; at ~100 MB of weights per token the TLB misses are a tenth of a
step. Asking the kernel to back those regions with transparent huge pages (``MADV_COLLAPSE``, Linux
6.1+: synchronous, on memory already written) made a decode step 13% faster for the 0.1B RWKV-7 int4
and 10% for int8, with the same peak RSS (docs/benchmarks.md, "Huge pages"). It costs a copy of the
regions once, at load (~0.3 s for 116 MB).

Only the anonymous regions that appeared while the session loaded and that are (nearly) all resident
are collapsed: the process's other memory is never touched, and a region is not filled in (which
would grow the RSS). Every failure (no THP, an older kernel, a sandbox that refuses madvise) leaves
the memory as it was: this only ever changes speed.
"""

from __future__ import annotations

import sys

MADV_COLLAPSE = 25  # <linux/mman.h>, Linux 6.1
HUGE_PAGE = 2 << 20


def anonymous_regions() -> dict:
    """{(start, end): resident anonymous bytes} of this process's private writable anonymous mappings."""
    out, cur = {}, None
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(None, 5)
                if "-" in head[0] and len(head) >= 5 and head[0][0] not in "ABCDEFGHIJKLMNOPQRSTUVWXYZ":
                    path = head[5].strip() if len(head) > 5 else ""
                    anon = head[1].startswith("rw") and head[1].endswith("p") and path in ("", "[heap]")
                    lo, hi = (int(x, 16) for x in head[0].split("-"))
                    cur = (lo, hi) if anon else None
                    if cur:
                        out[cur] = 0
                elif cur is not None and head[0] == "Anonymous:":
                    out[cur] = int(head[1]) * 1024
    except (OSError, ValueError, IndexError):
        return {}
    return out


def collapse_new(before: dict, min_resident: float = 0.9) -> int:
    """Collapse into huge pages each anonymous region that is not in ``before`` (an earlier
    ``anonymous_regions()``) and is at least ``min_resident`` resident. Returns the bytes collapsed."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):
        return 0
    done = 0
    for (lo, hi), resident in anonymous_regions().items():
        if (lo, hi) in before or resident < min_resident * (hi - lo):
            continue
        a, b = -(-lo // HUGE_PAGE) * HUGE_PAGE, hi // HUGE_PAGE * HUGE_PAGE  # the whole huge pages inside
        if b - a >= HUGE_PAGE and madvise(a, b - a, MADV_COLLAPSE) == 0:
            done += b - a
    return done
