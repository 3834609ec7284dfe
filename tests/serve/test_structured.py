"""Structured output through a real server on 127.0.0.1 and the official `openai` client: response_format
(json_object, json_schema), tools (named, required, auto, none; streamed and not), vLLM's
structured_outputs and guided_* fields. Truth: jsonschema and Python's re for every output (the tiny
model writes junk, so the constraint does all the work), ``Session.generate`` with the same constraint
for greedy and seeded outputs, and each request of a mixed batch equal to its solo run."""

from __future__ import annotations

import json
import re
import threading

import pytest

from .conftest import client, need_serve_deps

need_serve_deps()
pytest.importorskip("llguidance", reason="the [structured] extra (llguidance) is not installed")
jsonschema = pytest.importorskip("jsonschema")

import openai  # noqa: E402 - after the skip checks

from rwkv_runtime import Session  # noqa: E402
from rwkv_runtime import constraints as C  # noqa: E402

MSG = [{"role": "user", "content": "Give me the data."}]

SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 6}, "role": {"enum": ["admin", "guest"]}},
                "required": ["name", "role"],
                "additionalProperties": False,
            },
            "age": {"type": "integer", "minimum": 1, "maximum": 120},
        },
        "required": ["user", "age"],
        "additionalProperties": False,
    },
    "array": {
        "type": "object",
        "properties": {
            "ids": {
                "type": "array",
                "items": {"type": "integer", "minimum": 0, "maximum": 99},
                "minItems": 1,
                "maxItems": 3,
            },
            "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"},
            "ok": {"type": "boolean"},
        },
        "required": ["ids", "code", "ok"],
        "additionalProperties": False,
    },
}

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"tz": {"type": "integer", "minimum": -12, "maximum": 14}},
            "required": ["tz"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def srv(default_model):
    from rwkv_runtime.server import EngineConfig, ServerOptions, ServerThread, build_app

    app, eng = build_app(ServerOptions(str(default_model), "m", engine=EngineConfig()))
    with ServerThread(app, eng) as s:
        yield s


def _fmt(name):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_outputs_validate(srv, name):
    c = client(srv)
    for seed in range(4):
        r = c.chat.completions.create(
            model="m", messages=MSG, max_tokens=300, temperature=1.0, top_p=1.0, seed=seed, response_format=_fmt(name)
        )
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMAS[name])
    # completions too, streamed
    chunks = c.completions.create(
        model="m",
        prompt="Data:",
        max_tokens=300,
        temperature=1.0,
        seed=9,
        stream=True,
        extra_body={"response_format": _fmt(name)},
    )
    jsonschema.validate(json.loads("".join(ch.choices[0].text for ch in chunks if ch.choices)), SCHEMAS[name])


def test_json_object(srv):
    r = client(srv).chat.completions.create(
        model="m", messages=MSG, max_tokens=400, temperature=0, response_format={"type": "json_object"}
    )
    out = r.choices[0].message.content
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(out), dict)
    else:  # cut by max_tokens: what there is starts an object
        assert r.choices[0].finish_reason == "length" and out.startswith("{")


def test_greedy_and_seeded_equal_session_generate(srv, default_model):
    s = Session(default_model)
    spec = C.json_schema(SCHEMAS["nested"])
    c = client(srv)
    for kw in (dict(temperature=0), dict(temperature=1.0, top_p=1.0, seed=3)):
        r = c.completions.create(
            model="m", prompt="Data:", max_tokens=300, extra_body={"response_format": _fmt("nested")}, **kw
        )
        assert r.choices[0].text == "".join(s.generate("Data:", 300, constraint=spec, **kw))


def test_regex_grammar_choice_through_vllm_fields(srv):
    c = client(srv)
    for seed in range(3):
        kw = dict(model="m", prompt="Go:", max_tokens=60, temperature=1.0, seed=seed)
        t = c.completions.create(**kw, extra_body={"structured_outputs": {"regex": "[a-c]{2,4}-[0-9]{1,3}"}})
        assert re.fullmatch("[a-c]{2,4}-[0-9]{1,3}", t.choices[0].text)
        t = c.completions.create(**kw, extra_body={"guided_regex": "(yes|no)!"})
        assert t.choices[0].text in ("yes!", "no!") and t.choices[0].finish_reason == "stop"
        g = 'start: "(" num ("+" num)* ")"\nnum: /[1-9]/'
        t = c.completions.create(**kw, extra_body={"structured_outputs": {"grammar": g}})
        assert re.fullmatch(r"\([1-9](\+[1-9])*\)", t.choices[0].text) or t.choices[0].finish_reason == "length"
        t = c.completions.create(**kw, extra_body={"guided_choice": ["red", "green", "blue"]})
        assert t.choices[0].text in ("red", "green", "blue")
        t = c.completions.create(**kw, extra_body={"guided_json": SCHEMAS["array"]})
        jsonschema.validate(json.loads(t.choices[0].text), SCHEMAS["array"])


def test_named_tool_call(srv):
    c = client(srv)
    for seed in range(3):
        r = c.chat.completions.create(
            model="m",
            messages=MSG,
            max_tokens=200,
            temperature=1.0,
            seed=seed,
            tools=[WEATHER, TIME],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
        )
        ch = r.choices[0]
        assert ch.finish_reason == "tool_calls" and ch.message.content is None
        (call,) = ch.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather" and call.id
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    # streamed: the arguments arrive in pieces; the client's accumulation is the same call
    stream = c.chat.completions.create(
        model="m",
        messages=MSG,
        max_tokens=200,
        temperature=1.0,
        seed=0,
        stream=True,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    args, names, finish = "", set(), None
    for ch in stream:
        for d in ch.choices:
            for tc in d.delta.tool_calls or ():
                args += tc.function.arguments or ""
                if tc.function.name:
                    names.add(tc.function.name)
            finish = d.finish_reason or finish
    assert names == {"get_weather"} and finish == "tool_calls"
    first = c.chat.completions.create(
        model="m",
        messages=MSG,
        max_tokens=200,
        temperature=1.0,
        seed=0,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    assert args == first.choices[0].message.tool_calls[0].function.arguments  # the same seeded call
    jsonschema.validate(json.loads(args), WEATHER["function"]["parameters"])


def test_required_tool_call_streamed_and_not(srv):
    c = client(srv)
    seen = set()
    for seed in range(6):
        r = c.chat.completions.create(
            model="m",
            messages=MSG,
            max_tokens=200,
            temperature=1.0,
            seed=seed,
            tools=[WEATHER, TIME],
            tool_choice="required",
        )
        ch = r.choices[0]
        assert ch.finish_reason == "tool_calls"
        (call,) = ch.message.tool_calls
        tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
        jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
        seen.add(call.function.name)
    stream = c.chat.completions.create(
        model="m",
        messages=MSG,
        max_tokens=200,
        temperature=1.0,
        seed=0,
        stream=True,
        tools=[WEATHER, TIME],
        tool_choice="required",
    )
    calls, finish = {}, None
    for chunk in stream:
        for d in chunk.choices:
            for tc in d.delta.tool_calls or ():
                calls.setdefault(tc.index, ["", ""])
                calls[tc.index][0] += tc.function.name or ""
                calls[tc.index][1] += tc.function.arguments or ""
            finish = d.finish_reason or finish
    assert finish == "tool_calls" and len(calls) == 1
    name, args = calls[0]
    tool = {"get_weather": WEATHER, "get_time": TIME}[name]
    jsonschema.validate(json.loads(args), tool["function"]["parameters"])


def test_tool_choice_none_and_auto_are_plain_text(srv):
    c = client(srv)
    for choice in ("none", "auto"):
        r = c.chat.completions.create(
            model="m", messages=MSG, max_tokens=20, temperature=0, tools=[WEATHER], tool_choice=choice
        )
        assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("length", "stop")


def test_auto_parses_a_hermes_tool_call():
    from rwkv_runtime.server import structured

    class Req:
        tools, tool_choice = [WEATHER], "auto"

    p = structured.plan(Req(), True)
    content, calls = structured.tool_calls(
        p,
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}\n</tool_call>',
    )
    assert content == "Let me check." and calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo", "unit": "c"}
    assert structured.tool_calls(p, '<tool_call>{"name": "nope", "arguments": {}}</tool_call>')[1] is None


def test_mixed_batch_equals_solo_runs(srv):
    c = client(srv)
    reqs = [
        dict(extra_body={"response_format": _fmt("nested")}, seed=1),
        dict(extra_body={"structured_outputs": {"regex": "[a-z]{3,8}\\.[0-9]"}}, seed=2),
        dict(seed=3),
    ]
    solo = [
        c.completions.create(model="m", prompt="Go:", max_tokens=80, temperature=1.0, **kw).choices[0].text
        for kw in reqs
    ]
    out = [None] * 3
    barrier = threading.Barrier(3)

    def run(i):
        barrier.wait()
        out[i] = (
            c.completions.create(model="m", prompt="Go:", max_tokens=80, temperature=1.0, **reqs[i]).choices[0].text
        )

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == solo
    jsonschema.validate(json.loads(out[0]), SCHEMAS["nested"])
    assert re.fullmatch("[a-z]{3,8}\\.[0-9]", out[1])


@pytest.mark.parametrize(
    "body, param",
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
            "response_format",
        ),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"structured_outputs": {"regex": "(("}}, "structured_outputs"),
        ({"guided_grammar": "start: undefined_rule"}, "guided_grammar"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}],
                "tool_choice": "required",
            },
            "tools",
        ),
    ],
)
def test_uncompilable_is_a_400_naming_the_field(srv, body, param):
    with pytest.raises(openai.BadRequestError) as e:
        client(srv).chat.completions.create(model="m", messages=MSG, max_tokens=5, extra_body=body)
    assert e.value.body["param"] == param, e.value.body
    assert "Traceback" not in e.value.body["message"]


def test_max_tokens_cut_is_length(srv):
    r = client(srv).chat.completions.create(
        model="m", messages=MSG, max_tokens=3, temperature=0, response_format=_fmt("nested")
    )
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content.startswith("{")
