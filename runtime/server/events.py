"""What passes between the HTTP side and the scheduler: requests in, events out.

The scheduler thread produces events (``Delta``, ``Finished``, ``Failed``) into a per-thread outbox and
hands each iteration's events to the event loop in one ``call_soon_threadsafe`` call; the HTTP side reads
them from an asyncio queue as ``(index, event)``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

from rwkv_runtime import SamplingParams


class ServeError(Exception):
    """An error for the client, in OpenAI's shape (status, message, type, param, code)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


@dataclass
class GenRequest:
    prompt: list  # token ids (after the imported state, if any)
    sampling: SamplingParams
    max_tokens: int
    stop: tuple = ()  # strings; the text ends before the first one
    stop_ids: frozenset = frozenset()  # token ids that end generation (not emitted)
    state: dict | None = None  # imported state arrays (batch 1)
    state_base: str = ""  # cache namespace of the imported state
    state_tokens: int = 0  # tokens the imported state had seen
    return_state: bool = False
    logprobs: int | None = None  # report each token's log-probability with this many alternatives (None: off)
    request_id: str = ""
    session_id: str | None = None  # a conversation id (x-session-id): finished states go to ``on_finish``


@dataclass
class Delta:
    text: str
    tokens: int = 1
    logprobs: list | None = None  # TokenLogprob of the tokens this text completes (requests that asked)


@dataclass
class Finished:
    reason: str  # "stop", "length", "timeout"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    state: str | None = None


@dataclass
class Failed:
    error: ServeError


class Handle:
    """The HTTP side's view of a submitted request."""

    def __init__(
        self, req: GenRequest, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue | None = None, index: int = 0
    ):
        self.req = req
        self.loop = loop
        self.queue: asyncio.Queue = queue if queue is not None else asyncio.Queue()  # gets (index, event)
        self.index = index
        self.cancelled = False
        self.arrival = time.perf_counter()

    def cancel(self):
        """The client is gone: the engine drops the sequence before its next step."""
        self.cancelled = True

    def _put(self, event):
        _OUTBOX.items.append((self, event))


class _Outbox(threading.local):
    """Events produced by one scheduler iteration, handed to the event loop(s) in one call per loop
    (one wake-up per step instead of one per token per stream)."""

    def __init__(self):
        self.items: list = []

    def flush(self):
        if not self.items:
            return
        by_loop: dict = {}
        for h, ev in self.items:
            by_loop.setdefault(h.loop, []).append((h, ev))
        self.items = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                for h, _ in items:
                    h.cancelled = True


def _deliver(items):
    for h, ev in items:
        h.queue.put_nowait((h.index, ev))


_OUTBOX = _Outbox()  # per thread: only the scheduler thread fills it
