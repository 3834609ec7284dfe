"""The prefix-state cache: states after prompt prefixes, reused for prompts that start with them.

Entries are keyed by a hash of (base, token prefix): ``base`` names the state the prefix started from
("" for the model's fresh state, else a digest of an imported conversation state), so a prefix after an
imported state never matches the same tokens from a fresh start. A lookup tries the cached lengths from
the longest down (few distinct lengths are cached: chunk boundaries and prompt ends), so it costs a
handful of hashes, not a trie walk. Bounded by bytes, least recently used first out.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


def prefix_key(base: str, tokens) -> bytes:
    h = hashlib.blake2b(base.encode(), digest_size=16)
    h.update(np.asarray(tokens, dtype=np.int64).tobytes())
    return h.digest()


@dataclass
class CacheEntry:
    arrays: dict  # state tensors, batch 1 (numpy, owned by the cache)
    logits: np.ndarray  # logits after the last token of the prefix [vocab]
    length: int
    nbytes: int


class PrefixCache:
    """LRU of states after token prefixes, bounded by ``max_bytes`` (0 disables it)."""

    def __init__(self, max_bytes: int, min_tokens: int = 1):
        self.max_bytes = int(max_bytes)
        self.min_tokens = max(1, int(min_tokens))
        self._entries: OrderedDict[bytes, CacheEntry] = OrderedDict()
        self._lengths: dict[str, dict[int, int]] = {}  # base -> {length: number of entries}
        self._bases: dict[bytes, str] = {}
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()  # the engine thread writes; /metrics reads

    def __len__(self):
        return len(self._entries)

    def lookup(self, base: str, tokens: list) -> CacheEntry | None:
        """The entry for the longest cached prefix of ``tokens`` (all of it included), or None."""
        with self._lock:
            for n in sorted(self._lengths.get(base, {}), reverse=True):
                if n > len(tokens):
                    continue
                key = prefix_key(base, tokens[:n])
                e = self._entries.get(key)
                if e is not None:
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return e
            self.misses += 1
            return None

    def peek_length(self, base: str, tokens: list) -> int:
        """The length of the longest cached prefix (0: none), without counting a hit or a miss."""
        with self._lock:
            for n in sorted(self._lengths.get(base, {}), reverse=True):
                if n <= len(tokens) and prefix_key(base, tokens[:n]) in self._entries:
                    return n
        return 0

    def put(self, base: str, tokens: list, arrays: dict, logits: np.ndarray, force: bool = False) -> None:
        """Keep the state after ``tokens`` (``force``: even if shorter than ``min_tokens``)."""
        if self.max_bytes <= 0 or (len(tokens) < self.min_tokens and not force) or not tokens:
            return
        key = prefix_key(base, tokens)
        nbytes = sum(a.nbytes for a in arrays.values()) + logits.nbytes
        if nbytes > self.max_bytes:
            return
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return
            self._entries[key] = CacheEntry(
                {k: np.array(v, copy=True) for k, v in arrays.items()},
                np.array(logits, np.float32, copy=True),
                len(tokens),
                nbytes,
            )
            self._bases[key] = base
            lengths = self._lengths.setdefault(base, {})
            lengths[len(tokens)] = lengths.get(len(tokens), 0) + 1
            self.bytes += nbytes
            while self.bytes > self.max_bytes:
                self._evict_oldest()

    def _evict_oldest(self):
        key, e = self._entries.popitem(last=False)
        base = self._bases.pop(key)
        lengths = self._lengths[base]
        lengths[e.length] -= 1
        if not lengths[e.length]:
            del lengths[e.length]
        if not lengths:
            del self._lengths[base]
        self.bytes -= e.nbytes
