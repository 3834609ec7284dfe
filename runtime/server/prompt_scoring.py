"""The prompt's own log-probabilities on ``/v1/completions``: ``echo`` with ``logprobs`` (OpenAI's legacy
shape, what lm-evaluation-harness's ``local-completions`` sends for loglikelihood tasks), vLLM's
``prompt_logprobs``, and ``max_tokens: 0`` (the prompt alone, nothing generated); plus
``GET /tokenizer_info``, which lets lm-evaluation-harness tokenize with this server's own tokenizer
(``tokenizer_backend=remote``, through ``/tokenize`` and ``/detokenize``).

How: each prompt is scored with ``Session.score`` (runtime/scoring.py: the all-logits sequence graph
in bounded chunks, or one step a token) in a worker thread, one prompt at a time. The prefix cache is
**bypassed** for the scoring itself: it holds states, not the distributions of the positions that led
to them, so a cached prefix would leave those positions without log-probabilities. What the scoring
computes is then put into the cache (the state after the whole prompt), so when tokens are generated
after it (``max_tokens`` >= 1) the engine starts from there instead of running the prompt again; with
the cache off the engine runs it again. The engine's chunked prefill and its cache are untouched.
Backends are safe to call from this thread beside the scheduler's (onnxruntime sessions are; the
TensorRT backend holds a lock).

The first prompt token has no log-probability (``null``), as OpenAI reports it: nothing predicted it
(also after an imported ``state``, whose file carries no logits).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid

import numpy as np

from rwkv_runtime import RuntimeUserError
from rwkv_runtime.scoring import ScoringStopped

from . import protocol, statefile
from .engine import ServeError
from .logprobs import TokenTexts

_LOCK = threading.Lock()  # one prompt scored at a time (the scheduler thread keeps the other core busy)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def wanted(req) -> bool:
    """Whether this completions request is this module's: prompt log-probabilities or ``max_tokens: 0``."""
    return bool(
        (req.echo and req.logprobs is not None)
        or getattr(req, "prompt_logprobs", None) is not None
        or req.max_tokens == 0
    )


def add_routes(app, serving):
    @app.get("/tokenizer_info")
    async def tokenizer_info():
        """vLLM's shape, as much of it as applies (lm-evaluation-harness reads ``eos_token``)."""
        s = serving.session
        eos = None
        if serving.config.stop_token_ids:
            try:
                text = s.decode([serving.config.stop_token_ids[0]])
                eos = text if text and s.encode(text) == [serving.config.stop_token_ids[0]] else None
            except (RuntimeUserError, ValueError, UnicodeError):
                eos = None
        return {
            "tokenizer_class": s.manifest.tokenizer.get("kind", "none"),
            "eos_token": eos,
            "bos_token": None,
            "pad_token": None,
            "model_max_length": serving.engine.config.max_prompt_tokens,
        }


class _Scored:
    """One prompt's scoring, in the shapes the responses need."""

    def __init__(self, ids, sc, row: int = 0):
        self.ids = list(ids)
        self.logprobs = sc.logprobs[row]
        self.top_ids = sc.top_ids[row]
        self.top_logprobs = sc.top_logprobs[row]
        self.rank = sc.rank[row]
        self.arrays = {k: v[row : row + 1] for k, v in sc.state.numpy().items()}
        self.logits = sc.logits[row]


def _texts(serving) -> TokenTexts:
    if getattr(serving, "_token_texts", None) is None:
        serving._token_texts = TokenTexts(serving.session.tokenizer)
    return serving._token_texts


def _offsets(serving, ids: list) -> tuple[list, str]:
    """Where each token's text starts in the decoded prompt (a piece of a multi-byte character: where the
    character starts), and that text."""
    from rwkv_runtime.tokenizers import StreamDecoder

    dec, out, text = StreamDecoder(serving.session.tokenizer), [], ""
    start = 0
    for t in ids:
        if not dec.pending:
            start = len(text)
        out.append(start)
        text += dec.push(t)
    return out, text + dec.flush()


def legacy_logprobs(serving, p: _Scored, k: int, offsets: list) -> dict:
    """OpenAI's completions shape for the prompt's tokens: the first token's logprob and top are null."""
    texts = _texts(serving)
    tops: list = [None]
    for j in range(1, len(p.ids)):
        top: dict = {}
        for t, lp in (*zip(p.top_ids[j][:k].tolist(), p.top_logprobs[j][:k].tolist()), (p.ids[j], p.logprobs[j])):
            top.setdefault(texts(t)[0], protocol._logprob(float(lp)))
        tops.append(top)
    return {
        "tokens": [texts(t)[0] for t in p.ids],
        "token_logprobs": [None] + [protocol._logprob(float(x)) for x in p.logprobs[1:]],
        "top_logprobs": tops,
        "text_offset": list(offsets),
    }


def vllm_prompt_logprobs(serving, p: _Scored, k: int) -> list:
    """vLLM's ``prompt_logprobs``: per position ``{token id: {logprob, rank, decoded_token}}`` for the
    prompt's token and the ``k`` most likely; null for the first."""
    texts = _texts(serving)
    out: list = [None]
    for j in range(1, len(p.ids)):
        d = {}
        for r, (t, lp) in enumerate(zip(p.top_ids[j][:k].tolist(), p.top_logprobs[j][:k].tolist()), 1):
            d[str(t)] = {"logprob": protocol._logprob(float(lp)), "rank": r, "decoded_token": texts(t)[0]}
        d.setdefault(
            str(p.ids[j]),
            {
                "logprob": protocol._logprob(float(p.logprobs[j])),
                "rank": int(p.rank[j]),
                "decoded_token": texts(p.ids[j])[0],
            },
        )
        out.append(d)
    return out


def _merge(a: dict | None, b: dict | None, shift: int) -> dict | None:
    """Prompt logprobs ``a`` followed by the generated tokens' ``b`` (its offsets moved past the prompt)."""
    if a is None:
        return b
    if not b:
        return a
    return {
        "tokens": a["tokens"] + b["tokens"],
        "token_logprobs": a["token_logprobs"] + b["token_logprobs"],
        "top_logprobs": a["top_logprobs"] + b["top_logprobs"],
        "text_offset": a["text_offset"] + [o + shift for o in b["text_offset"]],
    }


async def completions(serving, req, prompts: list, is_disconnected, session_id=None):
    """A completions request that wants its prompts' log-probabilities (or ``max_tokens: 0``)."""
    eng = serving.engine
    if eng.draining:
        raise ServeError(503, "the server is shutting down", "service_unavailable")
    if req.max_tokens == 0 and req.best_of not in (None, 1):
        raise ServeError(400, "best_of needs tokens to rank (max_tokens >= 1)", param="best_of")
    serving.check_count(req, prompts)
    ids_list = [serving._tokens(p) for p in prompts]
    for ids in ids_list:
        if len(ids) > eng.config.max_prompt_tokens:
            raise ServeError(
                413,
                f"the prompt has {len(ids)} tokens; this server accepts at most {eng.config.max_prompt_tokens}",
                param="prompt",
                code="context_length_exceeded",
            )
    named = serving.named_state(req.model)  # model MODEL:NAME: scored from that named state
    state = serving.session.state_from_numpy(named.arrays) if named is not None else None
    if req.state is not None:
        try:
            arrays, _ = statefile.decode(req.state, eng.binding, eng.config.max_state_bytes)
            state = serving.session.state_from_numpy(arrays)
        except RuntimeUserError as e:
            raise ServeError(400, str(e), param="state") from None
        if state.batch_size != 1:
            raise ServeError(400, "state must hold one conversation (batch 1)", param="state")
    lp_k = req.logprobs if req.echo else None  # the legacy shape's alternatives (None: not asked)
    vllm_k = getattr(req, "prompt_logprobs", None)
    k = max(lp_k or 0, vllm_k or 0)
    scored: list = [None] * len(ids_list)
    if k or lp_k is not None or vllm_k is not None:  # (max_tokens 0 alone: no scoring)

        def run(ids):
            with _LOCK:
                # a shutdown's drain over (engine stopped): abandoned between two model runs, so the
                # request is answered (503) before the server exits instead of cancelled mid-call (was:
                # uvicorn's CancelledError traceback and a plain-text 500 after its graceful timeout)
                return _Scored(
                    ids, serving.session.score(np.asarray([ids]), state, start=1, top_k=k, stop=lambda: eng.stopped)
                )

        # one prompt per turn of the lock: concurrent requests' prompts interleave (a request of many
        # long prompts cannot hold the others for all of its own), and a client that left stops its own
        eng.scoring += 1  # a drain waits for this request (up to its grace), as for the engine's own
        try:
            for i, ids in enumerate(ids_list):
                if i and await is_disconnected():
                    return None
                try:
                    scored[i] = await asyncio.to_thread(run, ids)
                except RuntimeUserError as e:
                    raise ServeError(400, str(e), param="prompt") from None
                except ScoringStopped:
                    raise ServeError(
                        503, "the server shut down while scoring the prompt; retry the request", "service_unavailable"
                    ) from None
        finally:
            eng.scoring -= 1
    views = [_offsets(serving, ids) for ids in ids_list]
    echo = [(p if isinstance(p, str) else views[i][1]) if req.echo else "" for i, p in enumerate(prompts)]
    prompt_lp = [
        legacy_logprobs(serving, scored[i], lp_k, views[i][0]) if lp_k is not None else None
        for i in range(len(ids_list))
    ]
    vllm_lp = [
        vllm_prompt_logprobs(serving, scored[i], vllm_k) if vllm_k is not None else None for i in range(len(ids_list))
    ]

    def extra(c: dict, i: int) -> dict:
        if vllm_lp[i] is not None:
            c["prompt_logprobs"] = vllm_lp[i]
        return c

    n = req.n
    if req.max_tokens == 0:  # nothing to generate: the prompt alone, without the engine
        rid, created = "cmpl-" + uuid.uuid4().hex[:24], int(time.time())
        total = sum(len(ids) for ids in ids_list)
        use = protocol.usage(total, 0, 0)
        choices = [
            extra(protocol.choice(c, echo[c // n], "length", False, None, prompt_lp[c // n]), c // n)
            for c in range(len(ids_list) * n)
        ]
        if not req.stream:
            return protocol.completion(rid, serving.config.model_name, choices, use, False)

        async def events():
            for c in choices:
                ch = protocol.chunk(
                    rid,
                    serving.config.model_name,
                    created,
                    False,
                    c["index"],
                    c["text"],
                    "length",
                    logprobs=c["logprobs"],
                )
                extra(ch["choices"][0], c["index"] // n)
                yield _sse(ch)
            if req.include_usage():
                yield _sse(protocol.chunk(rid, serving.config.model_name, created, False, 0, use=use))
            yield "data: [DONE]\n\n"

        return events()

    # tokens to generate after the prompt: the engine, as for any request (logprobs of the generated
    # tokens as usual), starting from the state the scoring left in the prefix cache
    plain = req.model_copy(update={"echo": False})
    gens = serving._requests(plain, prompts, req.max_tokens or serving._default_max(16), req.stops())
    k_cand = serving._candidates(req)
    for j, g in enumerate(gens):
        if j % k_cand == 0:
            p = scored[j // k_cand]
            eng.cache.put(g.state_base, list(g.prompt), p.arrays, p.logits, force=True)
    await serving._with_session(gens, session_id)
    result = await serving._run(plain, gens, False, [""] * len(gens), is_disconnected)
    if result is None:
        return None
    if not req.stream:
        for c in result["choices"]:
            i = c["index"] // n
            c["logprobs"] = _merge(prompt_lp[i], c["logprobs"], len(echo[i]))
            c["text"] = echo[i] + c["text"]
            extra(c, i)
        result["usage"]["prompt_tokens_details"] = {"cached_tokens": 0}  # (the prompt was run, for its scores)
        return result

    async def stream():
        head_sent = set()
        async for ev in result:
            body = ev[len("data: ") :].strip() if ev.startswith("data: {") else None
            obj = json.loads(body) if body else None
            if obj is None or "choices" not in obj:
                yield ev
                continue
            out = []
            for c in obj["choices"]:
                i = c["index"] // n
                if c["index"] not in head_sent:  # the echoed prompt (and its logprobs) first, in the same stream
                    head_sent.add(c["index"])
                    first = protocol.chunk(
                        obj["id"], obj["model"], obj["created"], False, c["index"], echo[i], logprobs=prompt_lp[i]
                    )
                    extra(first["choices"][0], i)
                    out.append(first)
                if c.get("logprobs") and prompt_lp[i] is not None:
                    c["logprobs"]["text_offset"] = [o + len(echo[i]) for o in c["logprobs"]["text_offset"]]
            if obj.get("usage"):
                obj["usage"]["prompt_tokens_details"] = {"cached_tokens": 0}
            for o in out + [obj]:
                yield _sse(o)

    return stream()
