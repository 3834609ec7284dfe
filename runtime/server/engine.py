"""The scheduler: one thread runs every active sequence of the server as one batch.

Each iteration of the loop (1) admits queued requests while batch slots are free, (2) prefills at most
one ``prefill_chunk`` of each waiting prompt, ``prefill_budget`` tokens in all (sequence graph; the
prefix cache first supplies the longest cached prefix), and (3) runs ONE decode step for every running
sequence with the step graph at batch size B. Sequences join the batch when their prompt is done and
leave when they finish or their client goes away, always between steps, so a long prompt delays the
running streams by at most one budget of prefill per token.

The sequences themselves (sampling, detokenizing, stop strings, logprobs, the decode step, per-row
failure) are the generation core's (rwkv_runtime/generation.py, shared with ``Session.generate``):
this module only schedules admission, prefill and events around it. A failure in one sequence
(sampler, tokenizer, its part of a model step or prefill) fails that request alone (logged with its
traceback); the others carry on.

The HTTP side never touches the model: it submits a ``GenRequest`` and reads events (``Delta``,
``Finished``, ``Failed``) from an asyncio queue (events.py).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import logging
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np

from rwkv_runtime import RuntimeUserError, Sampler, State
from rwkv_runtime.constraints import ConstraintError
from rwkv_runtime.generation import Batch, Out, Row, TextStream, prefill_rows

from . import statefile
from .cache import PrefixCache
from .events import _OUTBOX, Delta, Failed, Finished, GenRequest, Handle, ServeError  # noqa: F401 - re-exported
from .metrics import Metrics

log = logging.getLogger("rwkv_runtime.server")


@dataclass
class EngineConfig:
    max_batch: int = 32  # sequences decoded together (prefilling ones included)
    max_queue: int = 256  # requests waiting for a slot before new ones get 429
    prefill_chunk: int = 64  # prompt chunk length (chunk ends are where prefix states get cached)
    prefill_budget: int = 256  # prompt tokens prefilled per scheduler iteration (between decode steps)
    max_prompt_tokens: int = 8192  # longer prompts get 413
    max_tokens: int = 4096  # ceiling on a request's max_tokens
    request_timeout: float = 600.0  # seconds from arrival; then finish_reason "timeout"
    cache_bytes: int = 256 << 20  # prefix-state cache budget (0: off)
    cache_min_tokens: int = 16  # shorter prefixes are not worth an entry
    max_state_bytes: int = 64 << 20  # imported conversation states larger than this are refused


class _Seq:
    """A request's scheduling record: its prompt's progress (prefill), then its core ``Row``."""

    __slots__ = ("h", "req", "row", "done", "state", "logits", "cached", "t_last", "first")

    def __init__(self, h: Handle, tokenizer, timeout: float):
        self.h, self.req = h, h.req
        req = h.req
        self.row = Row(
            Sampler(req.sampling),
            max_new_tokens=req.max_tokens,
            stop_ids=req.stop_ids,
            text=TextStream(tokenizer, req.stop, req.logprobs is not None),
            logprobs=req.logprobs,
            deadline=h.arrival + timeout,
            keep_state=True,
            key=self,
        )
        self.done = 0  # prompt tokens already in the state
        self.cached = 0
        self.state = None  # while prefilling: the state after the first ``done`` tokens
        self.logits = None
        self.t_last = 0.0
        self.first = True


class Engine:
    def __init__(self, session, config: EngineConfig | None = None, metrics: Metrics | None = None):
        self.session = session
        self.config = config or EngineConfig()
        self.metrics = metrics or Metrics()
        self.binding = statefile.model_binding(session.manifest)
        self.cache = PrefixCache(self.config.cache_bytes, self.config.cache_min_tokens)
        self._inbox: collections.deque = collections.deque()
        self._waiting: collections.deque = collections.deque()
        self._prefilling: list = []
        self._core = Batch(session)  # the running sequences: rows of one batch (generation core)
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.draining = False
        # requests scoring prompts outside the scheduler (prompt_scoring, event-loop thread): a drain
        # gives them its grace too, and they abandon their scoring once it is over (``stopped``)
        self.scoring = 0
        self._ids = itertools.count()
        # on_finish(session_id, tokens, arrays, logits): called (scheduler thread) with the state after a
        # finished conversation turn, e.g. to keep it where another replica can find it
        self.on_finish = None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self):
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="rwkv-scheduler", daemon=True)
            self._thread.start()

    def begin_shutdown(self):
        """New requests get 503 from now on; running ones carry on."""
        self.draining = True

    def active(self) -> int:
        return len(self._inbox) + len(self._waiting) + len(self._prefilling) + len(self._core) + self.scoring

    @property
    def stopped(self) -> bool:
        """True once ``stop`` ended the drain: work still running is failed."""
        return self._stop

    def stop(self, grace: float = 10.0):
        """Drain: let in-flight requests finish for up to ``grace`` seconds, then cancel the rest."""
        self.draining = True
        end = time.monotonic() + grace
        while self.active() and time.monotonic() < end:
            time.sleep(0.02)
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    # -- submitting (event-loop thread) ----------------------------------------------------------
    def submit(self, req: GenRequest, queue: asyncio.Queue | None = None, index: int = 0) -> Handle:
        if self.draining:
            raise ServeError(503, "the server is shutting down", "service_unavailable")
        if self._thread is None:
            raise ServeError(503, "the engine is not running", "service_unavailable")
        if not req.prompt:
            raise ServeError(400, "the prompt is empty", param="prompt")
        if len(req.prompt) > self.config.max_prompt_tokens:
            raise ServeError(
                413,
                f"the prompt has {len(req.prompt)} tokens; this server accepts at most {self.config.max_prompt_tokens}",
                param="prompt",
                code="context_length_exceeded",
            )
        if len(self._inbox) + len(self._waiting) >= self.config.max_queue:
            raise ServeError(
                429,
                f"the server is busy ({self.config.max_queue} requests queued); retry later",
                "rate_limit_error",
                code="queue_full",
            )
        req.request_id = req.request_id or f"req-{next(self._ids)}"
        h = Handle(req, asyncio.get_running_loop(), queue, index)
        self.metrics.prompt_tokens.inc(len(req.prompt))
        self._inbox.append(h)
        self._wake.set()
        return h

    # -- the loop (scheduler thread) -------------------------------------------------------------
    def _loop(self):
        while not self._stop:
            try:
                self._admit()
                worked = False
                if self._prefilling:
                    waiting = bool(self._core.rows)  # (sequences that join in this prefill waited for nothing)
                    n = self._prefill_some()
                    if waiting:  # what the running streams waited for before their next token
                        self.metrics.prefill_stall.observe(n)
                    worked = True
                if self._core.rows:
                    self._decode_step()
                    worked = True
                self._gauges()
                _OUTBOX.flush()
                if not worked:
                    self._wake.wait(0.05)
                    self._wake.clear()
            except Exception as e:  # noqa: BLE001 - never let one bad batch kill the server
                log.exception("scheduler iteration failed")
                self._fail_all(ServeError(500, f"internal error: {type(e).__name__}: {e}", "server_error"))
                _OUTBOX.flush()
        self._fail_all(ServeError(503, "the server shut down before this request finished", "service_unavailable"))
        _OUTBOX.flush()

    def _gauges(self):
        m = self.metrics
        m.queued.set(len(self._inbox) + len(self._waiting))
        m.prefilling.set(len(self._prefilling))
        m.running.set(len(self._core))
        m.cache_bytes.set(self.cache.bytes)
        m.cache_entries.set(len(self.cache))

    def _fail_all(self, err: ServeError):
        running = [r.key for r in self._core.rows]
        handles = list(self._inbox) + [s.h for s in list(self._waiting) + self._prefilling + running]
        self._inbox.clear()
        self._waiting.clear()
        self._prefilling, self._core = [], Batch(self.session)
        for h in handles:
            h._put(Failed(err))

    def _admit(self):
        while self._inbox:
            h = self._inbox.popleft()
            try:
                self._waiting.append(_Seq(h, self.session.tokenizer, self.config.request_timeout))
            except RuntimeUserError as e:  # (serving checks the sampling parameters first)
                h._put(Failed(ServeError(400, str(e))))
            except Exception as e:  # noqa: BLE001 - fail this request, not the server
                log.exception("admitting a request failed")
                h._put(Failed(ServeError(500, f"internal error: {type(e).__name__}: {e}", "server_error")))
        now = time.perf_counter()
        for s in [s for s in self._waiting if s.h.cancelled or now - s.h.arrival > self.config.request_timeout]:
            self._waiting.remove(s)
            if not s.h.cancelled:
                s.h._put(Failed(ServeError(503, "timed out waiting for a batch slot", "timeout")))
            self.metrics.finished.labels("cancelled" if s.h.cancelled else "timeout").inc()
        self._prefilling = [s for s in self._prefilling if not self._dropped(s)]
        while self._waiting and len(self._prefilling) + len(self._core) < self.config.max_batch:
            s = self._waiting.popleft()
            try:
                self._start(s)
            except RuntimeUserError as e:
                s.h._put(Failed(ServeError(400, str(e))))
            except Exception as e:  # noqa: BLE001 - fail this request, not the server
                log.exception("starting a request failed")
                s.h._put(Failed(ServeError(500, f"internal error: {type(e).__name__}: {e}", "server_error")))

    def _dropped(self, s: _Seq) -> bool:
        if s.h.cancelled:
            self.metrics.finished.labels("cancelled").inc()
        return s.h.cancelled

    def _start(self, s: _Seq):
        req = s.req
        entry = self.cache.lookup(req.state_base, req.prompt)
        if entry is not None:
            s.state = self.session.state_from_numpy(entry.arrays)
            s.logits, s.done = entry.logits, entry.length
            s.cached = entry.length
            self.metrics.cache_hits.inc()
            self.metrics.cached_tokens.inc(entry.length)
        else:
            s.state = self.session.state_from_numpy(req.state) if req.state is not None else self.session.new_state(1)
            self.metrics.cache_misses.inc()
        if s.done < len(req.prompt):
            self._prefilling.append(s)
        else:
            self._join([s])

    def _prefill_some(self):
        """At most ``prefill_budget`` prompt tokens this iteration, in chunks that end on multiples of
        ``prefill_chunk`` (so cached boundaries are shared between prompts), all run as one batch
        (``prefill_many``: rows of different lengths advance together while they all have tokens). A
        prompt whose prefill fails fails alone."""
        c, budget = self.config.prefill_chunk, self.config.prefill_budget
        group = []
        for s in self._prefilling:
            if budget <= 0:
                break
            end = min(len(s.req.prompt), (s.done // c + 1) * c, s.done + budget)
            group.append((s, end - s.done))
            budget -= end - s.done
        if not group:
            return 0
        results = prefill_rows(
            self.session, [s.req.prompt[s.done : s.done + n] for s, n in group], [s.state for s, _ in group], c
        )
        joined, total = [], 0
        for (s, n), res in zip(group, results):
            if isinstance(res, BaseException):
                self._prefilling.remove(s)
                self.metrics.finished.labels("error").inc()
                s.h._put(Failed(self._error(s, res, "the prefill")))
                continue
            self.metrics.prefill_tokens.inc(n)
            total += n
            s.logits, s.state = res
            s.done += n
            if s.done % c == 0 or s.done == len(s.req.prompt):
                self.cache.put(s.req.state_base, s.req.prompt[: s.done], s.state.numpy(), s.logits)
            if s.done == len(s.req.prompt):
                self._prefilling.remove(s)
                joined.append(s)
        if joined:
            self._join(joined)
        return total

    def _join(self, seqs: list):
        try:
            st = seqs[0].state if len(seqs) == 1 else State.concat([s.state for s in seqs])
            self._core.add([s.row for s in seqs], st, np.stack([s.logits for s in seqs]))
        except Exception:  # noqa: BLE001 - e.g. one row's constraint cannot start: that request alone fails
            if len(seqs) == 1:
                s = seqs[0]
                log.exception("a request could not join the batch")
                self.metrics.finished.labels("error").inc()
                s.h._put(Failed(self._error(s, sys.exc_info()[1], "the prefill")))
            else:
                for s in seqs:
                    self._join([s])
            return
        for s in seqs:
            s.state = s.logits = None

    @staticmethod
    def _error(s: _Seq, e: BaseException, where: str) -> ServeError:
        """A sequence's own failure, for its client (logged with its traceback where it happened)."""
        if isinstance(e, ConstraintError):  # the client's schema/regex/grammar failed (e.g. an engine limit)
            return ServeError(400, str(e))
        if isinstance(e, RuntimeUserError):
            if s.req.state is not None:  # most likely from the state the client sent
                return ServeError(400, f"{e} (from the imported state)", param="state")
            if where == "the prefill":  # (the prompt's tokens are the client's)
                return ServeError(400, str(e))
            return ServeError(500, f"internal error: {e}", "server_error")
        return ServeError(500, f"internal error: {type(e).__name__}: {e}", "server_error")

    def _decode_step(self):
        core, m = self._core, self.metrics
        for row in [r for r in core.rows if r.key.h.cancelled]:  # the client went away: drop before the step
            core.remove(row)
            m.finished.labels("cancelled").inc()
        if not core.rows:
            return
        now = time.perf_counter()
        for out in core.sample(now):
            self._event(out, now)
        if core.rows:
            m.batch_size.observe(len(core.rows))
            m.steps.inc()
        for out in core.advance():  # (only the rows whose own model step failed)
            self._event(out, now)

    def _event(self, out: Out, now: float):
        """One row's step as events for its client: its text (with logprobs), its end."""
        s, m = out.row.key, self.metrics
        if out.error is not None:
            m.finished.labels("error").inc()
            s.h._put(Failed(self._error(s, out.error, "decoding")))
            return
        if s.first:
            m.ttft.observe(now - s.h.arrival)
            s.first = False
        else:
            m.itl.observe(now - s.t_last)
        s.t_last = now
        if out.appended:
            m.generated_tokens.inc()
        if out.text or out.logprobs:
            s.h._put(Delta(out.text, int(out.appended), out.logprobs or None))
        if out.reason is not None:
            self._finish(s, out, now)

    def _finish(self, s: _Seq, out: Out, now: float):
        """The row left the batch with the state before its last token (``row.final``)."""
        m, row, reason = self.metrics, s.row, out.reason
        m.finished.labels(reason).inc()
        fed = row.tokens[:-1] if out.appended else row.tokens
        arrays = row.final_arrays()
        if fed:  # a conversation's next turn usually starts with this prompt + reply
            self.cache.put(s.req.state_base, list(s.req.prompt) + fed, arrays, row.logits)
            if self.on_finish is not None and s.req.session_id and not s.req.state_base:
                try:
                    self.on_finish(s.req.session_id, list(s.req.prompt) + fed, arrays, row.logits)
                except Exception:  # noqa: BLE001 - a store that is down must not fail the request
                    log.exception("on_finish hook failed")
        blob = None
        if s.req.return_state:
            if out.appended:  # the last token is part of the reply: feed it
                _, st = self.session.step(
                    np.array([row.tokens[-1]], dtype=np.int64), self.session.state_from_numpy(arrays)
                )
                arrays = st.numpy()
            # what the state read beyond the delivered reply (a stop string and what followed it in the
            # same tokens): recorded, so the next turn's render does not feed it a second time
            tail = ""
            if row.text is not None and reason == "stop" and row.tokens:
                try:
                    tail = self.session.decode(row.tokens)[row.text.sent :]
                except Exception:  # noqa: BLE001 - a tokenizer without text: no tail
                    tail = ""
            blob = statefile.encode(
                arrays, self.binding, s.req.state_tokens + len(s.req.prompt) + len(row.tokens), tail
            )
        m.e2e.observe(now - s.h.arrival)
        s.h._put(Finished(reason, len(s.req.prompt), len(row.tokens), s.cached, blob))
        log.info(
            json.dumps(
                {
                    "event": "request_done",
                    "id": s.req.request_id,
                    "finish_reason": reason,
                    "prompt_tokens": len(s.req.prompt),
                    "cached_tokens": s.cached,
                    "completion_tokens": len(row.tokens),
                    "seconds": round(now - s.h.arrival, 4),
                }
            )
        )
