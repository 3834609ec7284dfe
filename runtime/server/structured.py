"""Structured output on the OpenAI endpoints: ``response_format``, ``tools``/``tool_choice`` and vLLM's
extra fields -> one ``ConstraintSpec`` (rwkv_runtime.constraints), and the tool-call shapes of replies.

Request fields (docs/structured-output.md has the full contract):

* ``response_format``: ``{"type": "text"}`` (off), ``{"type": "json_object"}``, ``{"type": "json_schema",
  "json_schema": {"name": ..., "schema": {...}, "strict": true}}`` (chat and completions).
* vLLM's: ``structured_outputs`` ``{"json" | "regex" | "choice" | "grammar" | "json_object": ...}`` (vLLM >=
  0.12) and the older ``guided_json``/``guided_regex``/``guided_choice``/``guided_grammar``.
* ``tools`` + ``tool_choice`` (chat): ``"none"`` (tools ignored), a named function
  ``{"type": "function", "function": {"name": N}}`` (the output is N's arguments, constrained to its
  ``parameters`` schema), ``"required"`` (the output is ``{"name": ..., "arguments": {...}}`` for one of
  the tools), ``"auto"`` (the default with tools: unconstrained; a reply holding
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` — the Hermes function-calling style that
  RWKV-7 "G1" models were trained on — is returned as a tool call). With any mode but "none" the tools
  are described to the model in the system turn, in that same style.

At most one constraint per request: two of these fields at once is a 400 naming the second.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from rwkv_runtime import RuntimeUserError
from rwkv_runtime import constraints as C

from .events import ServeError

TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
_VLLM_KINDS = {
    "json": "json_schema",
    "regex": "regex",
    "choice": "choice",
    "grammar": "grammar",
    "json_object": "json_object",
}


@dataclass
class Plan:
    """What a request asks for: ``spec`` (None: unconstrained), the field it came from (``param``), and
    for chat with tools the ``mode`` ("none", "auto", "required", "named"), the ``tools`` offered
    ({name: function definition}) and the ``forced`` function's name."""

    spec: C.ConstraintSpec | None = None
    param: str | None = None
    mode: str = "none"
    tools: dict = field(default_factory=dict)
    forced: str | None = None

    @property
    def tool_mode(self) -> bool:
        return self.mode in ("auto", "required", "named")


def _bad(msg: str, param: str):
    return ServeError(400, msg, param=param)


def _spec(kind: str, value, param: str) -> C.ConstraintSpec:
    if kind == "json_schema" and isinstance(value, str):  # vLLM accepts the schema as JSON text too
        try:
            value = json.loads(value)
        except ValueError as e:
            raise _bad(f"{param}: the JSON schema is not valid JSON ({e})", param) from None
    try:
        return C.ConstraintSpec(kind, None if kind == "json_object" else value)
    except RuntimeUserError as e:
        raise _bad(f"{param}: {e}", param) from None


def _response_format(fmt) -> C.ConstraintSpec | None:
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return C.json_object()
    if kind == "json_schema":
        js = fmt.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("schema", {}), dict):
            raise _bad("response_format.json_schema must be an object with a 'schema' object", "response_format")
        # strict or not, the schema is enforced (strict: false is a best-effort request, met in full here)
        return _spec("json_schema", js.get("schema", {}), "response_format")
    raise _bad(
        f"response_format type {str(kind)[:40]!r} is not one of text, json_object, json_schema", "response_format"
    )


def _tools(req) -> dict:
    out = {}
    for i, t in enumerate(req.tools or []):
        f = t.get("function") if isinstance(t, dict) else None
        if (
            not isinstance(t, dict)
            or t.get("type", "function") != "function"
            or not isinstance(f, dict)
            or not isinstance(f.get("name"), str)
            or not f["name"]
        ):
            raise _bad(
                f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': {{...}}}}}}",
                "tools",
            )
        params = f.get("parameters", {"type": "object"})
        if not isinstance(params, dict):
            raise _bad(f"tools[{i}].function.parameters must be a JSON schema object", "tools")
        out[f["name"]] = {**f, "parameters": params}
    return out


def plan(req, chat: bool) -> Plan:
    """The request's constraint and tool mode (shapes checked here: a 400 naming the field)."""
    found: list = []
    fmt = getattr(req, "response_format", None)
    if fmt:
        if not isinstance(fmt, dict):
            raise _bad("response_format must be an object", "response_format")
        s = _response_format(fmt)
        if s is not None:
            found.append((s, "response_format"))
    so = getattr(req, "structured_outputs", None)
    if so:
        given = {k: v for k, v in so.items() if k in _VLLM_KINDS and v not in (None, False)}
        if len(given) != 1:
            raise _bad(f"structured_outputs needs exactly one of {', '.join(_VLLM_KINDS)}", "structured_outputs")
        ((k, v),) = given.items()
        found.append((_spec(_VLLM_KINDS[k], v, "structured_outputs"), "structured_outputs"))
    for name, k in _GUIDED.items():
        v = getattr(req, name, None)
        if v is not None:
            found.append((_spec(_VLLM_KINDS[k], v, name), name))
    p = Plan()
    tools = getattr(req, "tools", None)
    choice = getattr(req, "tool_choice", None)
    if tools:
        p.tools = _tools(req)
        if choice in (None, "auto"):
            p.mode = "auto"
        elif choice == "none":
            p.mode = "none"
        elif choice == "required":
            p.mode = "required"
            found.append(
                (
                    _spec(
                        "json_schema",
                        {
                            "anyOf": [
                                {
                                    "type": "object",
                                    "properties": {"name": {"const": n}, "arguments": f["parameters"]},
                                    "required": ["name", "arguments"],
                                    "additionalProperties": False,
                                }
                                for n, f in p.tools.items()
                            ]
                        },
                        "tools",
                    ),
                    "tools",
                )
            )
        elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
            name = choice["function"].get("name")
            if not isinstance(name, str) or name not in p.tools:  # (a list name is unhashable: not a 500)
                raise _bad(f"tool_choice names the function {str(name)[:60]!r}, which is not in tools", "tool_choice")
            p.mode, p.forced = "named", name
            found.append((_spec("json_schema", p.tools[name]["parameters"], "tools"), "tools"))
        else:
            raise _bad(
                "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}",
                "tool_choice",
            )
    elif choice not in (None, "none", "auto"):
        raise _bad("tool_choice needs tools", "tool_choice")
    if len(found) > 1:
        raise _bad(f"{found[1][1]} and {found[0][1]} both constrain the output; give one", found[1][1])
    if found:
        p.spec, p.param = found[0]
    if p.mode == "auto" and found:
        p.mode = "none"  # a constrained output cannot also hold a free-form tool call: tools are only described
    return p


def compile_for(p: Plan, session):
    """Compile the plan's spec for the model (cached): a schema the engine cannot compile is a 400
    naming the field; the engine missing is a 400 that says how to install it."""
    if p.spec is None:
        return None
    try:
        return C.compile_constraint(p.spec, session.tokenizer, session.vocab_size)
    except RuntimeUserError as e:
        raise _bad(f"{p.param}: {e}", p.param) from None


# -- the prompt ------------------------------------------------------------------------------------------
def tools_system_text(p: Plan) -> str | None:
    """The tools described for the model (Hermes style, one line per function), or None."""
    if not (p.tool_mode and p.tools):
        return None
    lines = [
        "You can call these functions. To call one, reply with",
        TOOL_OPEN + '{"name": <function name>, "arguments": <arguments object>}' + TOOL_CLOSE,
        "<tools>",
    ]
    lines += [
        json.dumps({"type": "function", "function": f}, ensure_ascii=False, separators=(",", ":"))
        for f in p.tools.values()
    ]
    lines.append("</tools>")
    return "\n".join(lines)


# -- replies ---------------------------------------------------------------------------------------------
def _call(name: str, arguments: str) -> dict:
    return {
        "id": "call_" + uuid.uuid4().hex[:24],
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def tool_calls(p: Plan, text: str) -> tuple[str | None, list | None]:
    """(content, tool_calls) for a finished chat reply: the named function's arguments as generated; the
    "required" object split into name and arguments; for "auto", ``<tool_call>`` blocks naming one of
    the tools (the text before the first is the content). No tool call found: (text, None)."""
    if p.mode == "named":
        return None, [_call(p.forced, text)]
    if p.mode == "required":
        try:
            obj = json.loads(text)
            return None, [_call(obj["name"], json.dumps(obj["arguments"], ensure_ascii=False, separators=(",", ":")))]
        except (ValueError, KeyError, TypeError):  # cut short by max_tokens: no call to return
            return text, None
    if p.mode == "auto" and TOOL_OPEN in text:
        calls, rest = [], text
        content = text[: text.index(TOOL_OPEN)].rstrip() or None
        while TOOL_OPEN in rest:
            body, _, rest = rest.split(TOOL_OPEN, 1)[1].partition(TOOL_CLOSE)
            try:
                obj = json.loads(body.strip())
                if obj["name"] in p.tools and isinstance(obj["arguments"], dict):
                    calls.append(_call(obj["name"], json.dumps(obj["arguments"], ensure_ascii=False)))
            except (ValueError, KeyError, TypeError):
                continue
        if calls:
            return content, calls
    return text, None


def shape_response(p: Plan, body: dict) -> dict:
    """A non-streamed chat completion with tool calls in OpenAI's shape (finish_reason "tool_calls"
    when the call is complete; "length" stays "length")."""
    if not p.tool_mode:
        return body
    for c in body.get("choices", []):
        msg = c.get("message")
        if msg is None:
            continue
        content, calls = tool_calls(p, msg.get("content") or "")
        if calls:
            msg["content"], msg["tool_calls"] = content, calls
            if c.get("finish_reason") == "stop":
                c["finish_reason"] = "tool_calls"
    return body


async def shape_stream(p: Plan, events):
    """Server-sent events of a chat stream with tools: the named function's arguments stream as
    ``tool_calls`` argument pieces; "required" and "auto" replies are held to the end (the call is known
    only then) and sent as one content or tool-call delta before the finish chunk."""
    if not p.tool_mode:
        async for ev in events:
            yield ev
        return
    held: dict = {}
    started: set = set()
    ids: dict = {}
    async for ev in events:
        if not ev.startswith("data: {"):
            yield ev
            continue
        obj = json.loads(ev[6:])
        choices = obj.get("choices") or []
        if not choices or "delta" not in choices[0]:
            yield ev
            continue
        c = choices[0]
        i, delta = c["index"], c["delta"]
        text = delta.get("content")
        if delta.get("role"):  # the opening chunk
            yield ev
            continue
        if text:
            if p.mode == "named":
                tc = {"index": 0, "function": {"arguments": text}}
                if i not in started:
                    started.add(i)
                    ids[i] = _call(p.forced, "")
                    tc = {
                        "index": 0,
                        "id": ids[i]["id"],
                        "type": "function",
                        "function": {"name": p.forced, "arguments": text},
                    }
                c["delta"] = {"tool_calls": [tc]}
                yield _sse(obj)
            else:
                held[i] = held.get(i, "") + text
            continue
        if c.get("finish_reason") is not None:
            finish = c["finish_reason"]
            if p.mode == "named":
                if i not in started:  # nothing was generated: an empty call still names the function
                    yield _sse(
                        {
                            **obj,
                            "choices": [
                                {
                                    **c,
                                    "finish_reason": None,
                                    "delta": {
                                        "tool_calls": [
                                            {
                                                "index": 0,
                                                "id": _call(p.forced, "")["id"],
                                                "type": "function",
                                                "function": {"name": p.forced, "arguments": ""},
                                            }
                                        ]
                                    },
                                }
                            ],
                        }
                    )
                if finish == "stop":
                    c["finish_reason"] = "tool_calls"
            else:
                content, calls = tool_calls(p, held.pop(i, ""))
                if calls:
                    d = {"tool_calls": [{"index": k, **tc} for k, tc in enumerate(calls)]}
                    if content:
                        d["content"] = content
                    if finish == "stop":
                        c["finish_reason"] = "tool_calls"
                else:
                    d = {"content": content} if content else {}
                if d:
                    yield _sse({**obj, "choices": [{**c, "finish_reason": None, "delta": d}]})
            yield _sse(obj)
            continue
        yield ev


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
