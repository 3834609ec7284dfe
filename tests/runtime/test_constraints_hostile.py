"""runtime/constraints.py against hostile specs: a spec that cannot start, that admits only the empty
text, that is huge or nested past Python's stack is one RuntimeUserError at compile time (before any
request runs it); a spec that fails while generating (an engine limit) raises ConstraintError, the
client's fault, which the server answers with a 400."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("llguidance", reason="the [structured] extra (llguidance) is not installed")

from rwkv_runtime import RuntimeUserError  # noqa: E402
from rwkv_runtime import constraints as C  # noqa: E402
from rwkv_runtime.tokenizers import ByteTokenizer  # noqa: E402

BYTES = ByteTokenizer()


@pytest.mark.parametrize(
    "spec",
    [
        C.json_schema({"$ref": "#"}),  # a schema that is only itself
        C.json_schema({"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}),
        C.regex("[^\\x00-\\U0010FFFF]"),  # no character at all
        C.grammar("start: start"),  # a rule that never produces anything
    ],
    ids=["ref-self", "ref-cycle", "empty-class", "rule-loop"],
)
def test_a_spec_that_cannot_start_is_refused_at_compile_time(spec):
    with pytest.raises(RuntimeUserError, match="cannot be compiled"):
        C.compile_constraint(spec, BYTES, 256)


def test_a_spec_of_only_the_empty_text_is_refused_without_end_of_text():
    # the byte vocabulary has no end-of-text token: nothing could ever be sampled
    with pytest.raises(RuntimeUserError, match="only the empty text"):
        C.compile_constraint(C.grammar('start: ""'), BYTES, 256)


def test_a_spec_that_can_start_still_compiles():
    c = C.compile_constraint(C.regex("a?b"), BYTES, 256)
    assert c.start().allowed()[[ord("a"), ord("b")]].all()


@pytest.mark.parametrize(
    "spec",
    [
        lambda: C.choice([f"x{i}" for i in range(50000)]),  # compiled in 4.4 s before the bound
        lambda: C.json_schema({"enum": [f"v{i}" for i in range(100000)]}),
        lambda: C.grammar("start: " + "|".join(f'"w{i}"' for i in range(50000))),
        lambda: C.regex("a" * (C.MAX_SPEC_CHARS + 1)),
    ],
    ids=["choice", "enum", "grammar", "regex"],
)
def test_an_oversized_spec_is_refused_at_once(spec):
    t = time.perf_counter()
    with pytest.raises(RuntimeUserError, match=f"at most {C.MAX_SPEC_CHARS}"):
        C.compile_constraint(spec(), BYTES, 256)
    assert time.perf_counter() - t < 1.0


def test_a_schema_nested_past_pythons_stack_is_one_error():
    deep: dict = {"type": "integer"}
    for _ in range(5000):
        deep = {"type": "array", "items": deep}
    with pytest.raises(RuntimeUserError, match="not JSON"):
        C.json_schema(deep)


def test_an_engine_limit_while_generating_is_a_constraint_error():
    # right recursion: the engine's item limit is hit after the first token (llguidance's own limit)
    st = C.compile_constraint(C.grammar('start: "a" start'), BYTES, 256).start()
    assert st.allowed()[ord("a")]
    with pytest.raises(C.ConstraintError, match="does not continue"):
        st.advance(ord("a"))
    assert issubclass(C.ConstraintError, RuntimeUserError)
