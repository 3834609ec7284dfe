"""Misuse of the public runtime API found by an audit: each is a RuntimeUserError naming the mistake, never a
TypeError/IndexError/ValueError from numpy or onnxruntime, and nothing is run or written before the check."""

from __future__ import annotations

import numpy as np
import pytest

import rwkv_runtime
from rwkv_runtime import RuntimeUserError, Sampler, SamplingParams, Session, State

from .conftest import copy_export, manifest_dict, write_manifest


@pytest.fixture(scope="module")
def other_session(rwkv4_ref, tmp_path_factory):
    """A second export of the same checkpoint: same sizes, another export id."""
    from rwkv_export.export import ExportOptions, export

    p = export(rwkv4_ref, tmp_path_factory.mktemp("other") / "o.onnx", ExportOptions(graphs=("step",)))[0]
    return Session(p)


def _user_error(fn, match):
    with pytest.raises(RuntimeUserError, match=match):
        fn()


@pytest.mark.parametrize("path", [None, 5, 1.5])
def test_session_path_of_the_wrong_type(path):
    _user_error(lambda: Session(path), "model path must be a str or Path")


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"threads": -1}, "threads must be an integer"),
        ({"threads": 1.5}, "threads must be an integer"),  # was "onnxruntime could not load the model (...)"
        ({"threads": "2"}, "threads must be an integer"),
        ({"providers": 5}, "providers must be a list"),  # was TypeError: 'int' object is not iterable
        ({"session_options": 5}, "session_options must be an onnxruntime.SessionOptions"),
    ],
)
def test_session_options_of_the_wrong_type(rwkv4_exports, kw, match):
    _user_error(lambda: Session(rwkv4_exports["plain"], **kw), match)


def test_new_state_batch_is_bounded(tiny_session):
    # was a MemoryError (466 TiB) from numpy
    _user_error(lambda: tiny_session.new_state(10**12), r"batch_size must be an integer in \[1, 65536\]")


@pytest.mark.parametrize(
    "ids, match",
    [
        ([300], "outside the byte vocabulary"),  # was ValueError: bytes must be in range(0, 256)
        ([-1], "not a token id"),
        ([1.5], "integer token ids"),  # was silently int(1.5)
        ("ab", "integer token ids"),  # was ValueError from int('a')
        (None, "integer token ids"),  # was TypeError
        ([10**30], "integer token ids"),
        ([[1], [1, 2]], "integer token ids"),
    ],
)
def test_decode_checks_its_ids(tiny_session, ids, match):
    _user_error(lambda: tiny_session.decode(ids), match)


def test_decode_still_decodes(tiny_session):
    assert tiny_session.decode([104, 105]) == "hi" and tiny_session.decode(np.array([104])) == "h"
    assert tiny_session.decode([]) == ""


def test_prefill_many_checks_the_state_like_every_call(tiny_session, other_session):
    # a State of another export was accepted (numpy() dropped its export id)
    _user_error(lambda: tiny_session.prefill_many([[1]], other_session.new_state(1)), "another export")
    # a dict state of batch 1 for two prompts was an IndexError
    _user_error(lambda: tiny_session.prefill_many([[1], [2]], tiny_session.new_state(1).numpy()), "batch of 1")
    _user_error(lambda: tiny_session.prefill_many([[1]], "x"), "state must be a State")


def test_generation_checks_tokens_when_called_not_when_iterated(tiny_session):
    _user_error(lambda: tiny_session.generate([300], 3), r"outside \[0, 256\)")
    _user_error(lambda: tiny_session.generate(["a"], 3), "must be integers")


def test_a_tokenizer_larger_than_the_model_is_named(rwkv4_exports, tmp_path):
    """An export whose tokenizer encodes to ids the model does not have (e.g. --tokenizer world on a
    byte-level model) is reported as such when text is generated, not as an anonymous bad id."""
    p = copy_export(rwkv4_exports["plain"], tmp_path / "w")
    for f in (p, p.with_name(p.stem + ".seq.onnx")):
        write_manifest(f, {**manifest_dict(f), "tokenizer": {"kind": "world"}})
    pytest.importorskip("pyrwkv_tokenizer")
    s = Session(p)
    _user_error(lambda: s.generate("hello", 2), "the export's tokenizer does not fit this model")
    bg = rwkv_runtime.BatchGenerator(s)
    _user_error(lambda: bg.add("hello"), "does not fit this model")
    assert s.encode("hello")  # encode itself gives the tokenizer's ids, as before


def test_tokenizer_messages(rwkv4_exports, tmp_path):
    p = copy_export(rwkv4_exports["plain"], tmp_path / "t")
    for kind, match in (
        ("none", r"--tokenizer none\): give token ids to generate_tokens"),
        ("klingon", "tokenizer kind 'klingon' is not one this runtime knows"),
    ):
        for f in (p, p.with_name(p.stem + ".seq.onnx")):
            write_manifest(f, {**manifest_dict(f), "tokenizer": {"kind": kind}})
        s = Session(p)
        _user_error(lambda s=s: s.generate([1, 2], 2), match)  # at the call, not at the first next()
        assert list(s.generate_tokens([1, 2], 2, SamplingParams(temperature=0)))  # ids need no tokenizer


def test_set_initial_state_of_the_wrong_type(tiny_session):
    _user_error(lambda: tiny_session.set_initial_state(5), "an initial state must be an .npz path")
    _user_error(lambda: tiny_session.load_state(5), "a state file must be a path")


def test_set_initial_state_takes_a_state_of_this_export(rwkv4_exports, other_session):
    s = Session(rwkv4_exports["plain"])
    _user_error(lambda: s.set_initial_state(other_session.new_state()), "another export")
    s.set_initial_state(s.new_state())


@pytest.mark.parametrize(
    "rows, match",
    [
        ([0.5], "integer row indices"),  # was silently row 0
        (["a"], "integer row indices"),  # was ValueError from numpy
        ([[0], [0, 1]], "integer row indices"),
    ],
)
def test_state_select_needs_integer_rows(tiny_session, rows, match):
    _user_error(lambda: tiny_session.new_state(2).select(rows), match)


def test_state_concat_and_save_arguments(tiny_session, tmp_path):
    st = tiny_session.new_state()
    _user_error(lambda: State.concat([st, 5]), "joins States, not int")  # was AttributeError
    _user_error(lambda: State.concat(5), "a list of States")
    assert State.concat(s for s in [st, st]).batch_size == 2  # any iterable (was: not subscriptable)
    _user_error(lambda: st.save(5), "needs a file path")  # was TypeError
    assert not list(tmp_path.iterdir())


def test_batch_generator_arguments(tiny_session):
    bg = rwkv_runtime.BatchGenerator(tiny_session)
    _user_error(lambda: bg.add(5), "the prompt must be text or a list of token ids")  # was TypeError
    seq = bg.add("hi", SamplingParams(temperature=0))
    _user_error(lambda: bg.remove([seq]), "no sequence")  # was TypeError: unhashable
    assert bg.remove(seq) == []


@pytest.mark.parametrize(
    "logits, match",
    [
        (["a"], "logits must be real numbers"),  # was ValueError from numpy
        (np.array([1j, 2]), "logits must be real numbers"),  # was a ComplexWarning and the real part
        (np.zeros(10), "10 logits for a vocabulary of 256"),
    ],
)
def test_sampler_logits(logits, match):
    _user_error(lambda: Sampler(SamplingParams(seed=0), vocab_size=256)(logits), match)


def test_sampler_rows_shrinking_without_a_vocabulary():
    s = Sampler(SamplingParams(temperature=0, presence_penalty=1.0))
    assert s(np.arange(256.0)) == 255
    _user_error(lambda: s(np.arange(10.0)), "fewer than this sampler's earlier rows")  # was IndexError


def test_extreme_logits_sample_without_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Sampler(SamplingParams(seed=0))(np.array([1e308, -1e308, 0.0])) == 0


def test_zero_new_tokens_still_times_the_prefill(tiny_session):
    gen = tiny_session.generate("hello", 0)
    assert list(gen) == [] and gen.stats["prefill_s"] > 0


def test_unusable_path_names_are_user_errors(tiny_session, tmp_path):
    _user_error(lambda: Session(str(tmp_path / ("a" * 5000))), "cannot open it")  # was OSError ENAMETOOLONG
    _user_error(
        lambda: tiny_session.new_state().save(str(tmp_path / "s\0.npz")), "cannot write the state"
    )  # ValueError
    assert not list(tmp_path.iterdir())  # no temporary file left
