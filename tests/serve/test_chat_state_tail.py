"""A returned conversation state remembers what it read after the reply (the stop string that ended it),
and the next chat turn through that state is fed from there on: continuing through the state equals
continuing from the full text. Real servers on 127.0.0.1, the official openai client."""

from __future__ import annotations

import base64
import io
import json

import numpy as np

from .conftest import need_serve_deps

need_serve_deps()

from .conftest import client  # noqa: E402 - after the skip check


def _meta(blob: str) -> dict:
    with np.load(io.BytesIO(base64.b64decode(blob))) as z:
        key = next(k for k in z.files if "meta" in k or "header" in k or k.startswith("__"))
        return json.loads(bytes(z[key]).decode())


def test_a_reply_ended_by_a_stop_string_records_what_the_state_read_after_it(default_model, make_server):
    srv = make_server(default_model, "m")
    c = client(srv)
    full = c.completions.create(model="m", prompt="def main(", max_tokens=24, temperature=0).choices[0].text
    stop = full[6:8]  # a stop string the greedy reply is sure to reach (byte tokens: it ends right there)
    assert stop and full.index(stop) == 6
    r = c.completions.create(
        model="m", prompt="def main(", max_tokens=24, temperature=0, stop=[stop], extra_body={"return_state": True}
    )
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == full[:6]
    meta = _meta(r.choices[0].model_extra["state"])
    assert meta.get("tail") == stop  # what the state read after the delivered text

    # a reply that ended on max_tokens read nothing more: no tail
    r2 = c.completions.create(
        model="m", prompt="def main(", max_tokens=3, temperature=0, extra_body={"return_state": True}
    )
    assert "tail" not in _meta(r2.choices[0].model_extra["state"])


def test_chat_through_a_state_that_read_the_separator_equals_chat_from_the_full_text(default_model, make_server):
    """The state of ``prompt + reply + "\\n\\nUser:"`` (a reply the template's stop string ended) continued
    with the next user turn: the same greedy text as the full history rendered from scratch."""
    import rwkv_runtime
    from rwkv_runtime.server import statefile
    from rwkv_runtime.server.protocol import ChatMessage
    from rwkv_runtime.server.serving import ChatTemplate

    srv = make_server(default_model, "m")
    s = rwkv_runtime.Session(default_model)
    t = ChatTemplate()
    first = t.render([ChatMessage(role="user", content="write a loop")])
    reply = " for i in range(3):"
    consumed = first + reply + "\n\nUser:"  # what a state returned after the stop string has read
    _, st = s.prefill(np.array([s.encode(consumed)]), s.new_state())
    blob = statefile.encode(st.numpy(), statefile.model_binding(s.manifest), len(s.encode(consumed)), tail="\n\nUser:")

    nxt = [ChatMessage(role="user", content="now print it")]
    via_state = client(srv).chat.completions.create(
        model="m",
        messages=[m.model_dump(exclude_none=True) for m in nxt],
        max_tokens=12,
        temperature=0,
        extra_body={"state": blob},
    )
    full_text = first + reply + t.render(nxt, continuation=True)
    from_text = client(srv).completions.create(
        model="m", prompt=full_text, max_tokens=12, temperature=0, stop=list(t.stop)
    )
    assert via_state.choices[0].message.content == from_text.choices[0].text
    # the prompt fed through the state starts after what it had read
    assert via_state.usage.prompt_tokens == len(s.encode(t.render(nxt, continuation=True))) - len(s.encode("\n\nUser:"))
