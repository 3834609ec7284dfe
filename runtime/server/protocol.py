"""OpenAI's request and response shapes (the subset this server implements), validated at the edge.

Requests are pydantic models in strict mode: a field of the wrong type (``"max_tokens": "4"``, ``true``
for a number, ``"yes"`` for a boolean; an integer is accepted for a float) or out of range is a 400 in
OpenAI's error shape, naming the field, before anything reaches the engine. Unknown fields are ignored, as clients send many; OpenAI
fields that would change the result and that this server cannot honour (``suffix``) are refused unless
set to their "off" value; ``response_format``, ``tools`` and vLLM's structured-output fields are
honoured by constrained decoding (structured.py). Two fields
are this server's own: ``state`` (resume from an exported conversation state) and ``return_state``
(get the state after this reply back, in each choice's ``state``).
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Every stop string is searched for after every token in the scheduler thread, which all requests
# share: an unbounded list (100 000 strings: ~0.1 s a token), or one huge string, would stall every
# stream of the server. Bounded in number and in total length (characters).
MAX_STOPS = 64
MAX_STOP_CHARS = 1024

# strict: no coercion ("4" -> 4, true -> 1, "yes" -> True); unknown fields ignored, as clients send many
_STRICT = ConfigDict(extra="ignore", strict=True)


class _Request(BaseModel):
    # NaN/Infinity (which Python's JSON parser accepts) are refused as what they are, not as "out of range"
    model_config = ConfigDict(**_STRICT, allow_inf_nan=False)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # 0: off (OpenAI has no top_k; vLLM and ai00 accept it)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    penalty_decay: float = Field(0.996, ge=0.0, le=1.0)  # RWKV's occurrence decay (ChatRWKV alpha_decay)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: dict | None = None
    user: str | None = None
    state: str | None = None  # base64 conversation state from a previous reply's ``state``
    return_state: bool = False
    # OpenAI fields this server cannot honour: accepted in their "off" form (clients send defaults),
    # refused otherwise (Serving.check_unsupported), rather than silently ignored
    logit_bias: dict | None = None
    # structured output (server/structured.py): OpenAI's response_format, vLLM's structured_outputs and
    # its older guided_* fields; at most one per request
    response_format: dict | None = None
    structured_outputs: dict | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, v):
        if isinstance(v, list) and len(v) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings, not {len(v)}")
        total = len(v) if isinstance(v, str) else sum(map(len, v or ()))
        if total > MAX_STOP_CHARS:
            raise ValueError(f"the stop strings have {total} characters in all; at most {MAX_STOP_CHARS}")
        return v

    def stops(self) -> tuple:
        s = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(x for x in s if x)

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)  # alternatives per token (OpenAI's legacy limit)
    max_tokens: int | None = Field(None, ge=0)  # 0: the prompt alone (echo, its logprobs): prompt_scoring.py
    prompt_logprobs: int | None = Field(None, ge=0, le=20)  # vLLM's: the prompt tokens' logprobs, k alternatives
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=20)  # (OpenAI's limit)

    @field_validator("logprobs", mode="before")
    @classmethod
    def _number_of_logprobs(cls, v):
        if isinstance(v, bool):  # (pydantic would read true as 1)
            if v:
                raise ValueError("logprobs is the number of alternatives per token here (0-5), not true")
            return None  # false: the "off" value some clients send
        return v


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"] = "text"
    text: str


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None


class TokenizeRequest(BaseModel):
    """``POST /tokenize`` (vLLM's shape): a ``prompt`` as the completions endpoint tokenizes it, or chat
    ``messages`` as the chat endpoint renders them (the prompt the model would see)."""

    model_config = _STRICT

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)


class DetokenizeRequest(BaseModel):
    model_config = _STRICT

    model: str | None = None
    tokens: list[int]


# -- responses (plain dicts in OpenAI's JSON shape) -------------------------------------------------
def error_body(message: str, type_: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def usage(prompt: int, completion: int, cached: int) -> dict:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def completion(rid: str, model: str, choices: list, use: dict, chat: bool) -> dict:
    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": use,
        "system_fingerprint": None,
    }


def _logprob(x: float) -> float:
    return max(x, -9999.0)  # a -inf logit: JSON has no -inf (vLLM's floor)


def completion_logprobs(entries: list, texts) -> dict:
    """The legacy shape; ``texts(id) -> (str, bytes)``. ``top_logprobs`` also holds the chosen token (so
    up to k + 1 entries, as OpenAI); tokens of equal text share a key, the most likely one's."""
    tops = []
    for e in entries:
        top: dict = {}
        for t, lp in (*e.top, (e.token, e.logprob)):
            top.setdefault(texts(t)[0], _logprob(lp))
        tops.append(top)
    return {
        "tokens": [texts(e.token)[0] for e in entries],
        "token_logprobs": [_logprob(e.logprob) for e in entries],
        "top_logprobs": tops,
        "text_offset": [e.start for e in entries],
    }


def chat_logprobs(entries: list, texts) -> dict:
    def item(t, lp):
        text, raw = texts(t)
        return {"token": text, "logprob": _logprob(lp), "bytes": list(raw)}

    return {
        "content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]
    }


def choice(index: int, text: str, finish: str, chat: bool, state: str | None, logprobs: dict | None = None) -> dict:
    c = {"index": index, "finish_reason": finish, "logprobs": logprobs}
    if chat:
        c["message"] = {"role": "assistant", "content": text}
    else:
        c["text"] = text
    if state is not None:
        c["state"] = state
    return c


def chunk(
    rid: str,
    model: str,
    created: int,
    chat: bool,
    index: int,
    text: str | None = None,
    finish: str | None = None,
    role: bool = False,
    state: str | None = None,
    use: dict | None = None,
    logprobs: dict | None = None,
) -> dict:
    choices = []
    if use is None:
        c = {"index": index, "finish_reason": finish, "logprobs": logprobs}
        if chat:
            c["delta"] = {"role": "assistant", "content": ""} if role else {"content": text} if text is not None else {}
        else:
            c["text"] = text or ""
        if state is not None:
            c["state"] = state
        choices.append(c)
    out = {
        "id": rid,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
    }
    if use is not None:
        out["usage"] = use
    return out
