"""Turns validated OpenAI requests into engine requests, and engine events into OpenAI responses
(one JSON body, or server-sent events ending with ``[DONE]``)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field

import numpy as np

from rwkv_runtime import RuntimeUserError, Sampler, SamplingParams

from . import prompt_scoring, protocol, statefile, structured
from .engine import Delta, Engine, Failed, Finished, GenRequest, ServeError
from .logprobs import TokenTexts


@dataclass
class ChatTemplate:
    """RWKV's chat format: ``User: ...\\n\\nAssistant: ...`` turns, the prompt ending in ``Assistant:``.

    System and user turns are stripped and their blank lines folded to one newline (a blank line is
    the turn separator: a message must not be able to fake a turn). Assistant turns are history the
    model wrote after ``Assistant:``: rendered byte for byte as sent, so that the rendered history is
    the text the model saw and produced (and its tokens hit the prefix cache); one space is added only
    to a reply that starts with neither a space nor a newline (hand-written history)."""

    system: str = "System"
    user: str = "User"
    assistant: str = "Assistant"
    separator: str = "\n\n"
    stop: tuple = ("\n\nUser:",)

    @classmethod
    def from_json(cls, text: str) -> ChatTemplate:
        try:
            d = json.loads(text)
            t = cls(**{k: v for k, v in d.items() if k != "stop"}, stop=tuple(d.get("stop", cls.stop)))
        except (ValueError, TypeError, AttributeError) as e:
            raise RuntimeUserError(
                f"chat template: expected a JSON object with keys system/user/assistant/separator/stop ({e})"
            ) from None
        if not all(isinstance(getattr(t, k), str) for k in ("system", "user", "assistant", "separator")):
            raise RuntimeUserError("chat template: system/user/assistant/separator must be strings")
        return t

    def render_dicts(self, messages: list) -> str:
        """``render`` for plain ``{"role", "content"}`` dicts."""
        from .protocol import ChatMessage

        return self.render([ChatMessage(**m) for m in messages])

    def render(self, messages, continuation: bool = False) -> str:
        """The prompt for ``messages``. ``continuation``: they continue a conversation whose state the
        request carries (after an assistant reply), so the render starts with the separator:
        ``render(h) == render(h[:k]) + h[k].content + render(h[k + 1:], continuation=True)`` for an
        assistant turn ``h[k]``."""
        names = {"system": self.system, "developer": self.system, "user": self.user, "assistant": self.assistant}
        turns = []
        for m in messages:
            text = m.text()
            if m.role == "assistant":
                turns.append(f"{self.assistant}:" + (text if text[:1] in ("", " ", "\n") else " " + text))
                continue
            text = text.strip()
            while "\n\n" in text:
                text = text.replace("\n\n", "\n")
            turns.append(f"{names[m.role]}: {text}")
        out = self.separator.join(turns + [f"{self.assistant}:"])
        return self.separator + out if continuation else out


@dataclass
class ServingConfig:
    model_name: str
    template: ChatTemplate = field(default_factory=ChatTemplate)
    default_max_tokens: int = 256  # chat requests without max_tokens
    stop_token_ids: tuple = ()  # end-of-text token ids (e.g. 0 for World models)
    states: dict = field(default_factory=dict)  # NAME -> named_states.NamedState (serve --state NAME=FILE)


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Serving:
    def __init__(self, engine: Engine, config: ServingConfig, session_store=None):
        self.engine = engine
        self.session = engine.session
        self.config = config
        # optional: ``await session_store(session_id) -> (tokens, blob, logits) | None``, the last state of
        # a conversation kept elsewhere (another replica served its earlier turns): seeds the prefix cache
        self.session_store = session_store
        self._token_texts = None  # made on the first request for logprobs

    def _logprobs(self, entries: list, chat: bool) -> dict:
        if self._token_texts is None:
            self._token_texts = TokenTexts(self.session.tokenizer)
        return (protocol.chat_logprobs if chat else protocol.completion_logprobs)(entries, self._token_texts)

    def models(self) -> dict:
        return {
            "object": "list",
            "data": [self.model_card()]
            + [self.model_card(f"{self.config.model_name}:{n}") for n in self.config.states],
        }

    def model_card(self, name: str | None = None) -> dict:
        """The card of the model, or of ``MODEL:NAME`` (the model started from a named state)."""
        m = self.session.manifest
        card = {
            "id": name or self.config.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "rwkv-export",
            "architecture": m.architecture,
            "export_id": self.engine.binding,
            "max_prompt_tokens": self.engine.config.max_prompt_tokens,
        }
        state = self.named_state(name) if name else None
        if state is not None:
            card.update(parent=self.config.model_name, initial_state=state.name)
        return card

    def named_state(self, name: str):
        """The ``NamedState`` that ``model: MODEL:NAME`` picks (None: the model itself); 404 for any other name."""
        if name == self.config.model_name:
            return None
        model, colon, state = name.rpartition(":")
        if colon and model == self.config.model_name and state in self.config.states:
            return self.config.states[state]
        names = [self.config.model_name] + [f"{self.config.model_name}:{n}" for n in self.config.states]
        raise ServeError(
            404,
            f"the model {name!r} does not exist (this server serves "
            f"{', '.join(repr(n) for n in names[:8])}{' ...' if len(names) > 8 else ''})",
            param="model",
            code="model_not_found",
        )

    def check_model(self, name: str):
        self.named_state(name)

    # -- request -> engine requests -------------------------------------------------------------
    def _tokens(self, prompt) -> list:
        if isinstance(prompt, str):
            try:
                return self.session.encode(prompt)
            except (UnicodeError, ValueError) as e:
                raise ServeError(400, f"the prompt cannot be tokenized ({e})", param="prompt") from None
        return self._check_ids(prompt, "prompt")

    def _check_ids(self, ids, param: str) -> list:
        bad = [t for t in ids if not 0 <= t < self.session.vocab_size]
        if bad:
            raise ServeError(400, f"token id {bad[0]} is outside [0, {self.session.vocab_size})", param=param)
        return list(ids)

    @staticmethod
    def _check_supported(req):
        """400 for a field that would change the result and that this server cannot honour."""
        best_of = getattr(req, "best_of", None)
        if best_of is not None and best_of < req.n:
            raise ServeError(400, f"best_of ({best_of}) must be at least n ({req.n})", param="best_of")
        if best_of is not None and best_of > req.n and req.stream:
            raise ServeError(400, "best_of above n cannot be streamed (the best are known at the end)", param="best_of")

    @staticmethod
    def _top_logprobs(req) -> int | None:
        """The alternatives each token's log-probability comes with; None: no logprobs asked for."""
        if isinstance(req, protocol.ChatCompletionRequest):
            if req.top_logprobs and not req.logprobs:
                raise ServeError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
            return (req.top_logprobs or 0) if req.logprobs else None
        return req.logprobs

    def _logit_bias(self, req) -> dict | None:
        """OpenAI's ``logit_bias``: JSON object keys are strings; token ids in the vocabulary, values in
        [-100, 100] (OpenAI's range: -100 in effect bans a token, 100 forces it)."""
        if not req.logit_bias:
            return None
        out = {}
        for k, v in req.logit_bias.items():
            try:
                (t,) = self._check_ids([int(k)], "logit_bias")
            except ValueError:
                raise ServeError(400, f"logit_bias keys are token ids, not {k!r}", param="logit_bias") from None
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
                raise ServeError(
                    400, f"logit_bias values are numbers in [-100, 100], not {v!r} (token {t})", param="logit_bias"
                )
            out[t] = float(v)
        return out

    def check_count(self, req, prompts: list):
        """A request's choices wait in the queue together: more than it holds can never be accepted (a 429
        that no retry cures). Checked before tokenizing, which a huge prompt list would make slow, and
        before scoring prompts (prompt_scoring), which would hold a worker for as long."""
        k = self._candidates(req)
        if len(prompts) * k > self.engine.config.max_queue:
            raise ServeError(
                400,
                f"the request asks for {len(prompts) * k} completions ({len(prompts)} "
                f"prompt(s) x {'best_of' if k > req.n else 'n'}={k}); this server accepts at most "
                f"{self.engine.config.max_queue} per request",
                param=("best_of" if k > req.n else "n") if len(prompts) == 1 else "prompt",
            )

    @staticmethod
    def _candidates(req) -> int:
        """Sequences generated per prompt: ``n``, or ``best_of`` of which the ``n`` best are returned."""
        return max(req.n, getattr(req, "best_of", None) or 0)

    def _requests(self, req, prompts: list, max_tokens: int, stops: tuple, after_tail: bool = False) -> list:
        """``after_tail``: the prompts continue the conversation of ``req.state``; a prompt that starts with
        the text that state already read after its reply (its header's ``tail``, e.g. the turn separator
        and ``User:`` that stopped the reply) is fed from there on."""
        self._check_supported(req)
        top_logprobs = self._top_logprobs(req)
        if top_logprobs is None and self._candidates(req) > req.n:
            top_logprobs = 0  # ranking needs each token's log-probability (not returned unless asked)
        logit_bias = self._logit_bias(req)
        # response_format / tools / vLLM's structured outputs: compiled once here (a 400 naming the field)
        constraint = structured.compile_for(
            structured.plan(req, isinstance(req, protocol.ChatCompletionRequest)), self.session
        )
        self.check_count(req, prompts)
        k = self._candidates(req)
        if max_tokens > self.engine.config.max_tokens:
            raise ServeError(
                400,
                f"max_tokens is {max_tokens}; this server allows at most {self.engine.config.max_tokens}",
                param="max_tokens",
            )
        arrays, base, seen = None, "", 0
        named = self.named_state(req.model)
        if named is not None:  # (a conversation state below, if given, already went on from it)
            arrays, base = named.arrays, named.base
        if req.state is not None:
            try:
                arrays, meta = statefile.decode(req.state, self.engine.binding, self.engine.config.max_state_bytes)
                statefile.check_batch_one(arrays)
                self.session.state_from_numpy(arrays)  # (names, dtypes and shapes against the manifest)
            except RuntimeUserError as e:
                raise ServeError(400, str(e), param="state") from None
            base, seen = statefile.digest(req.state), meta.get("tokens", 0)
            tail = meta.get("tail", "")
            if after_tail and tail:
                prompts = [p[len(tail) :] if p.startswith(tail) else p for p in prompts]
        out = []
        for p in prompts:
            ids = self._tokens(p)
            for j in range(k):
                seed = None if req.seed is None else req.seed + j
                sp = SamplingParams(
                    temperature=req.temperature,
                    top_p=req.top_p,
                    top_k=req.top_k,
                    presence_penalty=req.presence_penalty,
                    frequency_penalty=req.frequency_penalty,
                    penalty_decay=req.penalty_decay,
                    seed=seed,
                    logit_bias=logit_bias,
                    constraint=constraint,
                )
                try:
                    Sampler(sp, self.session.vocab_size)  # checks the parameters: a clear 400, here
                except RuntimeUserError as e:
                    raise ServeError(400, str(e)) from None
                out.append(
                    GenRequest(
                        ids,
                        sp,
                        max_tokens,
                        stops,
                        frozenset(self.config.stop_token_ids),
                        arrays,
                        base,
                        seen,
                        req.return_state,
                        top_logprobs,
                    )
                )
        return out

    def _submit(self, gens: list):
        queue: asyncio.Queue = asyncio.Queue()
        handles = []
        try:
            for i, g in enumerate(gens):
                handles.append(self.engine.submit(g, queue, i))
        except ServeError:
            for h in handles:
                h.cancel()
            raise
        return queue, handles

    async def _restore(self, session_id: str | None, prompt: list):
        """Before a conversation's turn: if this replica has no cached state for a long prefix of it, but
        the session store has one (the replica that served it is gone), put that into the cache."""
        if not (self.session_store and session_id):
            return
        hit = self.engine.cache.peek_length("", prompt)
        found = await self.session_store(session_id)
        if not found:
            return
        tokens, blob, logits = found
        if hit < len(tokens) <= len(prompt) and list(prompt[: len(tokens)]) == list(tokens):
            try:
                arrays, _ = statefile.decode(blob, self.engine.binding, self.engine.config.max_state_bytes)
            except RuntimeUserError:
                return  # another export's state: just prefill
            self.engine.cache.put("", list(tokens), arrays, np.asarray(logits, np.float32), force=True)

    async def completions(self, req: protocol.CompletionRequest, is_disconnected, session_id=None):
        self.check_model(req.model)
        p = req.prompt
        prompts = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not prompts or any(len(x) == 0 for x in prompts):
            raise ServeError(400, "the prompt is empty", param="prompt")
        if req.suffix:
            raise ServeError(400, "suffix is not supported by this server", param="suffix")
        await self._compile(req, chat=False)
        if prompt_scoring.wanted(req):  # the prompt's own log-probabilities (echo + logprobs), or max_tokens 0
            return await prompt_scoring.completions(self, req, prompts, is_disconnected, session_id)
        gens = self._requests(req, prompts, req.max_tokens or self._default_max(16), req.stops())
        await self._with_session(gens, session_id)
        echo = [(x if isinstance(x, str) else self.session.decode(x)) if req.echo else "" for x in prompts]
        k = self._candidates(req)
        return await self._run(req, gens, False, [echo[i // k] for i in range(len(gens))], is_disconnected)

    async def _compile(self, req, chat: bool):
        """The request's constraint compiled in a worker thread (then a cache hit for ``_requests``): a
        large schema takes a while to compile, and the event loop must keep serving the other requests."""
        p = structured.plan(req, chat)
        if p.spec is not None:
            await asyncio.to_thread(structured.compile_for, p, self.session)

    def _default_max(self, default: int) -> int:
        # a default above the server's --max-tokens would refuse every request that leaves max_tokens out
        return min(default, self.engine.config.max_tokens)

    async def _with_session(self, gens: list, session_id):
        if session_id and len(gens) == 1 and not gens[0].state_base:
            gens[0].session_id = session_id
            await self._restore(session_id, gens[0].prompt)

    async def chat(self, req: protocol.ChatCompletionRequest, is_disconnected, session_id=None):
        self.check_model(req.model)
        messages = req.messages
        tools_text = structured.tools_system_text(structured.plan(req, True))
        await self._compile(req, chat=True)
        if tools_text and req.state is None:  # the tools, described to the model in a system turn
            messages = [protocol.ChatMessage(role="system", content=tools_text), *messages]
        text = self.config.template.render(messages, continuation=req.state is not None)
        max_tokens = req.max_completion_tokens or req.max_tokens or self._default_max(self.config.default_max_tokens)
        gens = self._requests(
            req, [text], max_tokens, tuple(dict.fromkeys(self.config.template.stop + req.stops())), after_tail=True
        )
        await self._with_session(gens, session_id)
        return await self._run(req, gens, True, [""] * len(gens), is_disconnected)

    # -- the tokenizer alone (to find the ids for logit_bias, to count a prompt) ---------------------
    def tokenize(self, req: protocol.TokenizeRequest) -> dict:
        if req.model is not None:
            self.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise ServeError(400, "give either prompt or messages", param="prompt")
        text = req.prompt if req.messages is None else self.config.template.render(req.messages)
        ids = self._tokens(text)
        return {"tokens": ids, "count": len(ids), "max_model_len": self.engine.config.max_prompt_tokens}

    def detokenize(self, req: protocol.DetokenizeRequest) -> dict:
        if req.model is not None:
            self.check_model(req.model)
        return {"prompt": self.session.decode(self._check_ids(req.tokens, "tokens"))}

    # -- engine events -> responses -------------------------------------------------------------
    async def _run(self, req, gens: list, chat: bool, prefixes: list, is_disconnected):
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        for g in gens:
            g.request_id = rid
        queue, handles = self._submit(gens)
        plan = structured.plan(req, chat) if chat else structured.Plan()
        if req.stream:
            return structured.shape_stream(plan, self._stream(rid, req, chat, queue, handles, prefixes))
        texts = list(prefixes)
        entries: list = [[] for _ in handles]  # TokenLogprobs (requests that asked)
        done: dict = {}
        loop = asyncio.get_running_loop()
        check_at = loop.time() + 0.5
        try:
            while len(done) < len(handles):
                # every 0.5 s whether events flow or not: a client that went away while tokens keep
                # coming would otherwise hold its batch slots until max_tokens
                if loop.time() >= check_at:
                    if await is_disconnected():
                        return None
                    check_at = loop.time() + 0.5
                try:
                    i, ev = await asyncio.wait_for(queue.get(), max(0.01, check_at - loop.time()))
                except asyncio.TimeoutError:
                    continue
                if isinstance(ev, Delta):
                    texts[i] += ev.text
                    entries[i] += ev.logprobs or ()
                elif isinstance(ev, Finished):
                    done[i] = ev
                elif isinstance(ev, Failed):
                    raise ev.error
        finally:
            for h in handles:
                h.cancel()  # a no-op for finished sequences; frees the others at once
        wants = self._top_logprobs(req) is not None  # (best_of computes them to rank, returns them if asked)
        k = self._candidates(req)
        picked = range(len(handles)) if k == req.n else self._best(entries, req.n, k)
        choices = [
            protocol.choice(
                c, texts[i], done[i].reason, chat, done[i].state, self._logprobs(entries[i], chat) if wants else None
            )
            for c, i in enumerate(picked)
        ]
        return structured.shape_response(
            plan, protocol.completion(rid, self.config.model_name, choices, self._usage(req, done), chat)
        )

    @staticmethod
    def _best(entries: list, n: int, k: int) -> list:
        """best_of: of each prompt's ``k`` candidates, the ``n`` with the highest mean log-probability
        per token (OpenAI's rule; a candidate with no tokens ranks last), best first."""

        def score(i):
            lps = [e.logprob for e in entries[i]]
            return sum(lps) / len(lps) if lps else float("-inf")

        out = []
        for p in range(0, len(entries), k):
            out += sorted(range(p, p + k), key=lambda i: (-score(i), i))[:n]
        return out

    @staticmethod
    def _usage(req, done: dict) -> dict:
        # n choices of one prompt share it: count each prompt once
        k = Serving._candidates(req)
        prompt = sum(ev.prompt_tokens for i, ev in done.items() if i % k == 0)
        cached = sum(ev.cached_tokens for i, ev in done.items() if i % k == 0)
        return protocol.usage(prompt, sum(ev.completion_tokens for ev in done.values()), cached)

    async def _stream(self, rid, req, chat, queue, handles, prefixes):
        model, created = self.config.model_name, int(time.time())
        wants = self._top_logprobs(req) is not None
        done: dict = {}
        try:
            for i in range(len(handles)):
                if chat:
                    yield sse(protocol.chunk(rid, model, created, chat, i, role=True))
                elif prefixes[i]:
                    yield sse(protocol.chunk(rid, model, created, chat, i, prefixes[i]))
            while len(done) < len(handles):
                i, ev = await queue.get()
                if isinstance(ev, Delta):  # (text whose tokens are not complete yet: no logprobs, [])
                    lps = self._logprobs(ev.logprobs or [], chat) if wants else None
                    yield sse(protocol.chunk(rid, model, created, chat, i, ev.text, logprobs=lps))
                elif isinstance(ev, Finished):
                    done[i] = ev
                    yield sse(protocol.chunk(rid, model, created, chat, i, None, ev.reason, state=ev.state))
                elif isinstance(ev, Failed):
                    e = ev.error
                    yield sse(protocol.error_body(e.message, e.type, e.param, e.code))
                    break
            else:
                if req.include_usage():
                    yield sse(protocol.chunk(rid, model, created, chat, 0, use=self._usage(req, done)))
            yield "data: [DONE]\n\n"
        finally:  # normal end, error, or the client went away (the task is cancelled)
            for h in handles:
                h.cancel()
