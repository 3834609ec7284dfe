"""runtime/constraints.py against independent truth: outputs of random walks through the mask parse and
validate with jsonschema / match with Python's re; the mask of a choice equals the set of tokens whose
bytes continue an option (computed here from the tokenizer's bytes); bad specs are one clear error."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest

pytest.importorskip("llguidance", reason="the [structured] extra (llguidance) is not installed")
jsonschema = pytest.importorskip("jsonschema")

from rwkv_runtime import RuntimeUserError, SamplingParams  # noqa: E402
from rwkv_runtime import constraints as C  # noqa: E402
from rwkv_runtime.tokenizers import ByteTokenizer, HFTokenizer, WorldTokenizer  # noqa: E402

SCHEMAS = [
    {
        "type": "object",
        "properties": {  # nested object, enum, integer range
            "user": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 8}, "role": {"enum": ["admin", "guest", "dev"]}},
                "required": ["name", "role"],
                "additionalProperties": False,
            },
            "age": {"type": "integer", "minimum": 18, "maximum": 99},
        },
        "required": ["user", "age"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {  # array with bounds, string pattern, boolean
            "tags": {
                "type": "array",
                "items": {"type": "string", "pattern": "^[a-z]{1,4}$"},
                "minItems": 1,
                "maxItems": 3,
            },
            "ok": {"type": "boolean"},
            "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
        },
        "required": ["tags", "ok", "code"],
        "additionalProperties": False,
    },
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 2, "maxItems": 4},
]


@pytest.fixture(scope="module")
def world():
    return WorldTokenizer()


def walk(compiled, tokenizer, seed, limit=400):
    """Pick uniformly among the allowed tokens until the constraint is finished; the output's bytes."""
    rng = np.random.default_rng(seed)
    st, out = compiled.start(), []
    for _ in range(limit):
        ok = np.nonzero(st.allowed())[0]
        assert ok.size, "the mask allows nothing before the output is complete"
        t = int(rng.choice(ok))
        st.advance(t)
        if st.eos_consumed:
            break
        out.append(t)
        if st.finished:
            break
    assert st.finished, "the walk did not finish (an unbounded constraint?)"
    return b"".join(tokenizer.token_bytes(t) for t in out)


@pytest.mark.parametrize("schema", SCHEMAS, ids=["nested-enum-range", "array-pattern", "int-array"])
@pytest.mark.parametrize("vocab", ["bytes", "world"])
def test_random_walks_validate(schema, vocab, world):
    tok, n = (ByteTokenizer(), 256) if vocab == "bytes" else (world, 65536)
    compiled = C.compile_constraint(C.json_schema(schema), tok, n)
    for seed in range(8):
        text = walk(compiled, tok, seed).decode("utf-8")
        jsonschema.validate(json.loads(text), schema)


def test_json_object_and_regex_and_grammar(world):
    for seed in range(6):
        obj = json.loads(
            walk(
                C.compile_constraint(
                    C.json_schema(
                        {
                            "type": "object",
                            "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}, "y": {"type": "null"}},
                            "additionalProperties": False,
                        }
                    ),
                    world,
                    65536,
                ),
                world,
                seed,
            )
        )
        assert isinstance(obj, dict) and set(obj) <= {"x", "y"}
        text = walk(C.compile_constraint(C.regex(r"[a-c]{2,5}-(x|yy)"), world, 65536), world, seed).decode()
        assert re.fullmatch(r"[a-c]{2,5}-(x|yy)", text), text
        lark = 'start: greet " " name\ngreet: "hi" | "hello"\nname: /[a-z]{1,5}/'
        text = walk(C.compile_constraint(C.grammar(lark), world, 65536), world, seed).decode()
        assert re.fullmatch(r"(hi|hello) [a-z]{1,5}", text), text
        gbnf = 'root ::= "ab" [0-9] [0-9]?'
        text = walk(C.compile_constraint(C.grammar(gbnf), ByteTokenizer(), 256), ByteTokenizer(), seed).decode()
        assert re.fullmatch(r"ab[0-9][0-9]?", text), text


def _continuations(tokenizer, n, prefix: bytes, options):
    """Independent truth: the tokens whose bytes keep prefix + bytes a prefix of some option."""
    out = set()
    for t in range(n):
        b = tokenizer.token_bytes(t)
        if b and any(o.startswith(prefix + b) for o in options):
            out.add(t)
    return out


def test_choice_mask_is_exactly_the_continuations(world):
    options = [b"yes", b"no", b"maybe"]
    st = C.compile_constraint(C.choice([o.decode() for o in options]), world, 65536).start()
    assert set(np.nonzero(st.allowed())[0]) == _continuations(world, 65536, b"", options)
    st.advance(world.encode("ma")[0])  # "ma" is one World token
    # the rest ("ybe") is forced: the engine then allows only the tokenizer's own first token of it
    # (canonical tokenization), a subset of the byte-wise continuations
    allowed = set(np.nonzero(st.allowed())[0])
    assert allowed == {world.encode("ybe")[0]} and allowed <= _continuations(world, 65536, b"ma", options)
    for t in world.encode("ybe"):
        st.advance(t)
    assert st.finished and not st.eos_consumed


def test_hf_vocabulary_mask(tmp_path):
    from tokenizers import Tokenizer

    from ..conftest import hf_tokenizer_json

    path = hf_tokenizer_json(tmp_path / "tokenizer.json")  # 20B where ../shared is, else a small BPE (eot = 0)
    tok = HFTokenizer(path.read_text())
    V = Tokenizer.from_file(str(path)).get_vocab_size()  # 50277 for the 20B tokenizer
    st = C.compile_constraint(C.choice(["true", "false"]), tok, V).start()
    assert set(np.nonzero(st.allowed())[0]) == _continuations(tok, V, b"", [b"true", b"false"])
    # an open-ended regex ends on the tokenizer's end-of-text (id 0), allowed only once the output is complete
    st = C.compile_constraint(C.regex("[0-9]+"), tok, V).start()
    assert not st.allowed()[0]
    st.advance(tok.encode("7")[0])
    assert st.allowed()[0] and st.accepting
    st.advance(0)
    assert st.finished and st.eos_consumed


def test_world_end_of_text_and_missing_ids(world):
    st = C.compile_constraint(C.regex("[0-9]+"), world, 65536).start()
    ok = st.allowed()
    assert not ok[0]  # empty output is not complete
    assert not any(ok[t] for t in range(65536) if not world.token_bytes(t))  # ids without bytes never
    st.advance(world.encode("4")[0])
    assert st.allowed()[0] and not st.finished
    st.advance(0)
    assert st.finished and st.eos_consumed
    with pytest.raises(RuntimeUserError, match="already complete"):
        st.apply(np.zeros(65536))


def test_apply_masks_logits_and_refuses_wrong_size():
    st = C.compile_constraint(C.choice(["ab", "ba"]), ByteTokenizer(), 256).start()
    x = st.apply(np.arange(256, dtype=np.float32))
    assert set(np.nonzero(np.isfinite(x))[0]) == {ord("a"), ord("b")}
    assert x[ord("b")] == ord("b")
    with pytest.raises(RuntimeUserError, match="256"):
        st.apply(np.zeros(300))
    with pytest.raises(RuntimeUserError, match="does not continue"):
        st.advance(ord("z"))


def test_prepare_masks_equals_each_rows_own(world, monkeypatch):
    monkeypatch.setattr(C, "PARALLEL_MIN_CPUS", 1)  # the engine's thread pool on any machine
    monkeypatch.setattr(C, "PARALLEL_MIN_ROWS", 2)
    specs = [C.json_schema(SCHEMAS[0]), C.regex("[0-9]{3}"), C.choice(["left", "right"]), C.json_object()]
    rows = [C.compile_constraint(s, world, 65536).start() for s in specs]
    solo = [C.compile_constraint(s, world, 65536).start() for s in specs]
    for _ in range(3):
        C.prepare_masks(rows + [None])
        assert all(r._bits is not None for r in rows if not r.finished)  # computed by the pool
        for r, s in zip(rows, solo):
            np.testing.assert_array_equal(r.allowed(), s.allowed())
        for r, s in zip(rows, solo):  # both advance by the same (first allowed) token
            if not r.finished:
                t = int(np.nonzero(r.allowed())[0][0])
                r.advance(t)
                s.advance(t)


@pytest.mark.parametrize(
    "spec, match",
    [
        (C.ConstraintSpec("regex", "(("), "regex cannot be compiled"),
        (C.ConstraintSpec("json_schema", {"type": "strin"}), "json schema cannot be compiled"),
        (C.ConstraintSpec("grammar", "start: nothing_defined"), "grammar cannot be compiled"),
    ],
)
def test_uncompilable_specs_are_one_error(spec, match):
    with pytest.raises(RuntimeUserError, match=match) as e:
        C.compile_constraint(spec, ByteTokenizer(), 256)
    assert "Traceback" not in str(e.value)


@pytest.mark.parametrize(
    "kind, value, match",
    [
        ("xml", "x", "not one of"),
        ("json_schema", "[]", "must be an object"),
        ("regex", "", "non-empty"),
        ("choice", [], "non-empty list"),
        ("choice", ["a", 3], "non-empty list"),
    ],
)
def test_bad_spec_shapes(kind, value, match):
    with pytest.raises(RuntimeUserError, match=match):
        C.ConstraintSpec(kind, value)


def test_from_dict():
    assert C.from_dict({"choice": ["a", "b"]}) == C.choice(["a", "b"])
    assert C.from_dict({"json_object": True}) == C.json_object()
    with pytest.raises(RuntimeUserError, match="exactly one key"):
        C.from_dict({"regex": "a", "choice": ["a"]})


def test_compile_is_cached():
    tok = ByteTokenizer()
    a = C.compile_constraint(C.json_schema(SCHEMAS[2]), tok, 256)
    assert C.compile_constraint(C.json_schema(json.loads(json.dumps(SCHEMAS[2]))), tok, 256) is a
    assert C.compile_constraint(C.json_schema(SCHEMAS[1]), tok, 256) is not a


def test_engine_missing_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)  # import fails as when not installed
    monkeypatch.setitem(sys.modules, "llguidance.numpy", None)
    with pytest.raises(RuntimeUserError, match=r"pip install 'rwkv-runtime\[structured\]'"):
        C.compile_constraint(C.regex("a"), ByteTokenizer(), 256)


# -- through the generation core: Session.generate and BatchGenerator --------------------------------------
def _reference_greedy(session, prompt: str, grammar: str, limit: int) -> list:
    """Greedy decoding under a grammar, written here from the engine's own API and Session.step alone."""
    import llguidance as llg

    class Bytes:  # the byte vocabulary + a virtual end-of-text token past it (never sampled)
        tokens = [bytes([i]) for i in range(256)] + [b""]
        eos_token_id, bos_token_id, special_token_ids = 256, None, []

        def __call__(self, s):
            return list(s.encode()) if isinstance(s, str) else list(s)

    m = llg.LLMatcher(llg.LLTokenizer(llg.TokenizerWrapper(Bytes())), grammar, log_level=0)
    logits, st = session.prefill(np.asarray([list(prompt.encode())]))
    out = []
    for _ in range(limit):
        bits = np.unpackbits(np.frombuffer(m.compute_bitmask(), np.uint8), bitorder="little")[:256].astype(bool)
        assert bits.any(), m.get_error()
        t = int(np.argmax(np.where(bits, logits[0], -np.inf)))
        assert m.consume_token(t), m.get_error()
        out.append(t)
        if m.is_stopped():
            break
        logits, st = session.step(np.array([t]), st)
    return out


SCHEMA_SMALL = {
    "type": "object",
    "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999}, "k": {"enum": ["red", "green"]}},
    "required": ["n", "k"],
    "additionalProperties": False,
}


def test_greedy_generate_equals_reference_loop(tiny_session):
    import llguidance as llg

    for spec, g in [
        (C.json_schema(SCHEMA_SMALL), llg.LLMatcher.grammar_from_json_schema(SCHEMA_SMALL, defaults=C.JSON_OPTIONS)),
        (C.regex("[a-z]{3}-[0-9]{2}"), llg.LLMatcher.grammar_from_regex("[a-z]{3}-[0-9]{2}")),
    ]:
        got = list(tiny_session.generate_tokens(list(b"The "), 200, SamplingParams(temperature=0, constraint=spec)))
        assert got == _reference_greedy(tiny_session, "The ", g, 200)
    text = "".join(tiny_session.generate("The ", 200, temperature=0, constraint=C.json_schema(SCHEMA_SMALL)))
    jsonschema.validate(json.loads(text), SCHEMA_SMALL)


def test_sampled_generate_validates_and_stops(tiny_session):
    for seed in range(5):
        g = tiny_session.generate(
            "A", 300, temperature=1.0, top_p=1.0, seed=seed, constraint=C.json_schema(SCHEMA_SMALL)
        )
        text = "".join(g)
        jsonschema.validate(json.loads(text), SCHEMA_SMALL)
        assert g.stats["new_tokens"] == len(text.encode())  # stopped at the end, nothing after it


def test_batch_rows_with_different_constraints_equal_their_solo_runs(tiny_session):
    from rwkv_runtime import BatchGenerator

    params = [
        SamplingParams(temperature=1.0, top_p=1.0, seed=1, constraint=C.json_schema(SCHEMA_SMALL)),
        SamplingParams(temperature=1.0, top_p=1.0, seed=2, constraint=C.regex("(ab|cd){1,4}!")),
        SamplingParams(temperature=1.0, top_p=1.0, seed=3),
    ]
    solo = [list(tiny_session.generate_tokens(list(b"Hi"), 60, p)) for p in params]
    gen = BatchGenerator(tiny_session)
    ids = [gen.add("Hi", p) for p in params]
    for _ in range(60):
        gen.step()
    got = [gen.seqs[i].tokens[:60] for i in ids]
    assert got == solo
    jsonschema.validate(json.loads(bytes(got[0]).decode()), SCHEMA_SMALL)
    assert re.fullmatch("(ab|cd){1,4}!", bytes(got[1]).decode())
    assert gen.seqs[ids[0]].reason == "stop" and len(got[2]) == 60
