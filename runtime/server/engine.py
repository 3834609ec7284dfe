"""The scheduler: one thread runs every active sequence of the server as one batch.

Each iteration of the loop (1) admits queued requests while batch slots are free, (2) prefills at most
one ``prefill_chunk`` of each waiting prompt, ``prefill_budget`` tokens in all (sequence graph; the
prefix cache first supplies the longest cached prefix), and (3) runs ONE decode step for every running
sequence with the step graph at batch size B. Sequences join the batch when their prompt is done and
leave when they finish or their client goes away, always between steps, so a long prompt delays the
running streams by at most one budget of prefill per token.

The HTTP side never touches the model: it submits a ``GenRequest`` and reads events (``Delta``,
``Finished``, ``Failed``) from an asyncio queue (events.py).
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import json
import logging
import threading
import time
from dataclasses import dataclass

import numpy as np

from rwkv_runtime import RuntimeUserError, Sampler, State

from . import statefile
from .cache import PrefixCache
from .events import _OUTBOX, Delta, Failed, Finished, GenRequest, Handle, ServeError  # noqa: F401 - re-exported
from .logprobs import token_logprob
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
    __slots__ = ("h", "req", "done", "state", "logits", "sampler", "generated", "pending", "held",
                 "cached", "t_last", "first", "greedy", "lp_wait", "decoded", "sent")

    def __init__(self, h: Handle):
        self.h, self.req = h, h.req
        self.sampler = Sampler(h.req.sampling)
        p = h.req.sampling
        self.greedy = (p.temperature == 0 and not p.presence_penalty and not p.frequency_penalty and not p.ban
                       and not p.logit_bias)
        self.generated: list = []
        self.pending: list = []  # tokens whose text is an incomplete UTF-8 sequence so far
        self.held = ""  # text that may be the start of a stop string
        # logprobs: the TokenLogprobs not yet reported (None: not asked for); characters of the generated
        # text decoded so far and delivered so far (their difference is ``held``)
        self.lp_wait = None if h.req.logprobs is None else []
        self.decoded = self.sent = 0
        self.done = 0  # prompt tokens already in the state
        self.cached = 0
        self.state = None
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
        self._running: list = []  # in state-row order
        self._batch: State | None = None
        self._rows: dict | None = None
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.draining = False
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
        return len(self._inbox) + len(self._waiting) + len(self._prefilling) + len(self._running)

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
            raise ServeError(413, f"the prompt has {len(req.prompt)} tokens; this server accepts at most "
                             f"{self.config.max_prompt_tokens}", param="prompt", code="context_length_exceeded")
        if len(self._inbox) + len(self._waiting) >= self.config.max_queue:
            raise ServeError(429, f"the server is busy ({self.config.max_queue} requests queued); retry later",
                             "rate_limit_error", code="queue_full")
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
                    waiting = bool(self._running)  # (sequences that join in this prefill waited for nothing)
                    n = self._prefill_some()
                    if waiting:  # what the running streams waited for before their next token
                        self.metrics.prefill_stall.observe(n)
                    worked = True
                if self._running:
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
        m.running.set(len(self._running))
        m.cache_bytes.set(self.cache.bytes)
        m.cache_entries.set(len(self.cache))

    def _fail_all(self, err: ServeError):
        handles = list(self._inbox) + [s.h for s in list(self._waiting) + self._prefilling + self._running]
        self._inbox.clear()
        self._waiting.clear()
        self._prefilling, self._running, self._batch = [], [], None
        for h in handles:
            h._put(Failed(err))

    def _admit(self):
        while self._inbox:
            h = self._inbox.popleft()
            try:
                self._waiting.append(_Seq(h))
            except RuntimeUserError as e:  # (serving checks the sampling parameters first)
                h._put(Failed(ServeError(400, str(e))))
        now = time.perf_counter()
        for s in [s for s in self._waiting if s.h.cancelled or now - s.h.arrival > self.config.request_timeout]:
            self._waiting.remove(s)
            if not s.h.cancelled:
                s.h._put(Failed(ServeError(503, "timed out waiting for a batch slot", "timeout")))
            self.metrics.finished.labels("cancelled" if s.h.cancelled else "timeout").inc()
        self._prefilling = [s for s in self._prefilling if not self._dropped(s)]
        while self._waiting and len(self._prefilling) + len(self._running) < self.config.max_batch:
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
        ``prefill_chunk`` (so cached boundaries are shared between prompts); chunks of the same length
        from several prompts run as one batch."""
        c, budget = self.config.prefill_chunk, self.config.prefill_budget
        groups: dict = {}
        for s in self._prefilling:
            if budget <= 0:
                break
            end = min(len(s.req.prompt), (s.done // c + 1) * c, s.done + budget)
            groups.setdefault(end - s.done, []).append(s)
            budget -= end - s.done
        joined, total = [], 0
        for n, group in groups.items():
            toks = np.array([s.req.prompt[s.done:s.done + n] for s in group], dtype=np.int64)
            try:
                st = group[0].state if len(group) == 1 else State.concat([s.state for s in group])
                logits, st = self.session.prefill(toks, st, chunk_size=c)
            except RuntimeUserError as e:
                for s in group:
                    self._prefilling.remove(s)
                    s.h._put(Failed(ServeError(400, str(e))))
                continue
            self.metrics.prefill_tokens.inc(n * len(group))
            total += n * len(group)
            arrays = st.numpy()
            for i, s in enumerate(group):
                row = {k: v[i:i + 1] for k, v in arrays.items()}
                s.state = st if len(group) == 1 else self.session.state_from_numpy(row)
                s.done, s.logits = s.done + n, logits[i]
                if s.done % c == 0 or s.done == len(s.req.prompt):
                    self.cache.put(s.req.state_base, s.req.prompt[:s.done], row, s.logits)
                if s.done == len(s.req.prompt):
                    self._prefilling.remove(s)
                    joined.append(s)
        if joined:
            self._join(joined)
        return total

    def _join(self, seqs: list):
        parts = ([self._batch] if self._batch is not None else []) + [s.state for s in seqs]
        self._batch = parts[0] if len(parts) == 1 else State.concat(parts)
        for s in seqs:
            s.state = None
        self._running.extend(seqs)

    def _sample(self, s: _Seq):
        """The next token of ``s``, or a ServeError for it alone (the rest of the batch carries on)."""
        try:
            # greedy without penalties is the argmax of the logits (what Sampler computes, minus its
            # softmax); argmax picks a NaN or +inf if there is one, so checking that one logit catches
            # the damaged rows the Sampler refuses (instead of emitting token 0 after token 0)
            if s.greedy:
                t = int(np.argmax(s.logits))
                if not np.isfinite(s.logits[t]):
                    raise RuntimeUserError("sampling: the logits contain NaN or inf (a damaged model or state?)")
                return t
            return s.sampler(s.logits)
        except RuntimeUserError as e:  # e.g. NaN/inf logits
            if s.req.state is not None:  # most likely from the state the client sent
                return ServeError(400, f"{e} (from the imported state)", param="state")
            return ServeError(500, f"internal error: {e}", "server_error")

    def _decode_step(self):
        seqs = self._running
        picked = [self._sample(s) for s in seqs]
        toks = np.array([t if isinstance(t, int) else 0 for t in picked], dtype=np.int64)
        keep, now, self._rows = [], time.perf_counter(), None
        for row, (s, tok) in enumerate(zip(seqs, toks)):
            if isinstance(picked[row], ServeError):
                self.metrics.finished.labels("error").inc()
                s.h._put(Failed(picked[row]))
                continue
            reason = "cancelled" if s.h.cancelled else self._accept(s, int(tok), now)
            if reason is None:
                keep.append(row)
            else:
                self._finish(s, row, int(tok), reason, now)
        if len(keep) != len(seqs):
            self._running = [seqs[r] for r in keep]
            self._batch = self._batch.select(keep) if keep else None
        if not keep:
            return
        self.metrics.batch_size.observe(len(keep))
        self.metrics.steps.inc()
        logits, self._batch = self.session.step(toks[keep], self._batch)
        for s, lg in zip(self._running, logits):
            s.logits = lg

    def _row(self, row: int) -> dict:
        """One sequence's state arrays (the batch is copied out once per step, however many finish)."""
        if self._rows is None:
            self._rows = self._batch.numpy()
        return {k: v[row:row + 1] for k, v in self._rows.items()}

    def _accept(self, s: _Seq, tok: int, now: float) -> str | None:
        """Take a sampled token: emit its text; the finish reason if the sequence ends here."""
        m = self.metrics
        if s.first:
            m.ttft.observe(now - s.h.arrival)
            s.first = False
        else:
            m.itl.observe(now - s.t_last)
        s.t_last = now
        if tok in s.req.stop_ids:
            return "stop"
        s.generated.append(tok)
        m.generated_tokens.inc()
        if s.lp_wait is not None:  # only the sequences that asked pay for a log-softmax
            s.lp_wait.append(token_logprob(s.logits, tok, s.req.logprobs))
        s.pending.append(tok)
        piece = self.session.decode(s.pending)
        if "\ufffd" in piece and len(s.pending) < 8:  # wait for the rest of a UTF-8 character
            piece = ""
        else:
            s.pending = []
            self._decoded(s, piece)
        text, stopped = self._apply_stops(s, piece)
        self._emit(s, text, stopped)
        if stopped:
            return "stop-text"
        if len(s.generated) >= s.req.max_tokens:
            return "length"
        if now - s.h.arrival > self.config.request_timeout:
            return "timeout"
        return None

    @staticmethod
    def _decoded(s: _Seq, piece: str):
        """The tokens waiting for their text (a multi-byte character's pieces) produced ``piece``."""
        if s.lp_wait is None:
            return
        for e in reversed(s.lp_wait):
            if e.end is not None:
                break
            e.start, e.end = s.decoded, s.decoded + len(piece)
        s.decoded += len(piece)

    @staticmethod
    def _emit(s: _Seq, text: str, stopped: bool, tokens: int = 1):
        """Deliver ``text`` with the log-probabilities of the tokens whose text it completes; on a stop
        string, of every token that produced some delivered text (the rest are never reported)."""
        lps = None
        if s.lp_wait is not None:
            s.sent += len(text)
            n = 0
            for e in s.lp_wait:  # in order: start and end never decrease
                if e.end is None or not (e.start < s.sent if stopped else e.end <= s.sent):
                    break
                n += 1
            lps, s.lp_wait = s.lp_wait[:n], [] if stopped else s.lp_wait[n:]
        if text or lps:
            s.h._put(Delta(text, tokens, lps or None))

    @staticmethod
    def _apply_stops(s: _Seq, piece: str) -> tuple[str, bool]:
        """Stop strings across token boundaries: hold back any tail that could begin a stop string."""
        if not s.req.stop:
            return piece, False
        buf = s.held + piece
        hits = [i for i in (buf.find(x) for x in s.req.stop) if i >= 0]
        if hits:
            s.held = ""
            return buf[:min(hits)], True
        hold = 0
        for x in s.req.stop:
            for k in range(min(len(x) - 1, len(buf)), hold, -1):
                if buf.endswith(x[:k]):
                    hold = k
                    break
        s.held = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold], False

    def _flush(self, s: _Seq) -> bool:
        """At the end (not on a stop string): deliver what was held back, an incomplete character or
        the start of a stop string; True if that completed a stop string (the text ends before it)."""
        piece = self.session.decode(s.pending) if s.pending else ""
        self._decoded(s, piece)
        text, stopped = self._apply_stops(s, piece)
        text += "" if stopped else s.held
        self._emit(s, text, stopped, 0)
        return stopped

    def _finish(self, s: _Seq, row: int, tok: int, reason: str, now: float):
        m = self.metrics
        m.finished.labels(reason.replace("stop-text", "stop")).inc()
        if reason == "cancelled":
            return
        if reason == "stop-text":
            reason = "stop"
        elif self._flush(s):  # the held-back text completed a stop string after all
            reason = "stop"
        appended = bool(s.generated) and tok not in s.req.stop_ids
        fed = s.generated[:-1] if appended else s.generated
        arrays = self._row(row)
        if fed:  # a conversation's next turn usually starts with this prompt + reply
            self.cache.put(s.req.state_base, list(s.req.prompt) + fed, arrays, s.logits)
            if self.on_finish is not None and s.req.session_id and not s.req.state_base:
                try:
                    self.on_finish(s.req.session_id, list(s.req.prompt) + fed, arrays, s.logits)
                except Exception:  # noqa: BLE001 - a store that is down must not fail the request
                    log.exception("on_finish hook failed")
        blob = None
        if s.req.return_state:
            if appended:  # the last token is part of the reply: feed it
                _, st = self.session.step(np.array([s.generated[-1]], dtype=np.int64), self.session.state_from_numpy(arrays))
                arrays = st.numpy()
            blob = statefile.encode(arrays, self.binding,
                                    s.req.state_tokens + len(s.req.prompt) + len(s.generated))
        m.e2e.observe(now - s.h.arrival)
        s.h._put(Finished(reason, len(s.req.prompt), len(s.generated), s.cached, blob))
        log.info(json.dumps({"event": "request_done", "id": s.req.request_id, "finish_reason": reason,
                             "prompt_tokens": len(s.req.prompt), "cached_tokens": s.cached,
                             "completion_tokens": len(s.generated),
                             "seconds": round(now - s.h.arrival, 4)}))
