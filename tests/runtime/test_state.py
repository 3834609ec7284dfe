"""State is never aliased, saves atomically, and loads only from sound files of the same export."""

from __future__ import annotations

import io
import os
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rwkv_runtime import BatchGenerator, RuntimeUserError, SamplingParams, Session, State
from rwkv_runtime.artifact import EXPORT_ID_KEY

from .conftest import manifest_dict, write_manifest


def _snap(state: State) -> dict:
    return {k: v.copy() for k, v in state.numpy().items()}


def _same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_indexing_and_numpy_return_copies(tiny_session):
    _, st_ = tiny_session.step([5])
    before = _snap(st_)
    name = st_.keys()[0]
    st_[name][...] = 123.0
    for v in st_.numpy().values():
        v[...] = -7.0
    _same(_snap(st_), before)


def test_step_never_writes_into_a_held_state(tiny_session):
    """Hold every state of a loop (the buffer sets must never reuse one) and check each is unchanged."""
    s = tiny_session
    held, snaps = [], []
    st_ = s.new_state(1)
    for t in [3, 4, 5, 6, 7, 8, 9]:
        held.append(st_)
        snaps.append(_snap(st_))
        _, st_ = s.step([t], st_)
    for h, snap in zip(held, snaps):
        _same(_snap(h), snap)
    # the usual loop (old states dropped) gives the same result as the all-held one
    st2 = s.new_state(1)
    for t in [3, 4, 5, 6, 7, 8, 9]:
        logits2, st2 = s.step([t], st2)
    _same(_snap(st2), _snap(st_))


def test_branching_from_one_state_twice_gives_the_same_logits(tiny_session):
    s = tiny_session
    _, base = s.prefill([[1, 2, 3]])
    a, _ = s.step([4], base)
    _, other = s.step([9], base)
    _, other = s.step([9], other)
    b, _ = s.step([4], base)
    np.testing.assert_array_equal(a, b)


def test_prefill_many_leaves_the_callers_state_alone(tiny_session):
    s = tiny_session
    _, st_ = s.prefill([[1, 2], [3, 4]])
    before = _snap(st_)
    s.prefill_many([[5, 6, 7], [8]], st_)
    _same(_snap(st_), before)


def test_batch_generator_leaves_the_callers_state_alone(tiny_session):
    s = tiny_session
    _, st_ = s.prefill([[1, 2]])
    before = _snap(st_)
    gen = BatchGenerator(s)
    gen.add([3, 4], SamplingParams(temperature=0), state=st_)
    for _ in range(3):
        gen.step()
    _same(_snap(st_), before)


def test_returned_logits_are_not_reused_buffers(tiny_session):
    s = tiny_session
    l1, st_ = s.step([1])
    keep = l1.copy()
    for t in range(2, 6):
        _, st_ = s.step([t], st_)
    np.testing.assert_array_equal(l1, keep)


# -- save / load -----------------------------------------------------------------------------------
def test_save_load_round_trip_carries_the_export_id(tiny_session, tmp_path):
    _, st_ = tiny_session.prefill([[1, 2, 3]])
    st_.save(tmp_path / "s.npz")
    with np.load(tmp_path / "s.npz") as z:
        assert str(z[EXPORT_ID_KEY]) == tiny_session.export_id
    back = tiny_session.load_state(tmp_path / "s.npz")
    _same(_snap(back), _snap(st_))
    assert os.listdir(tmp_path) == ["s.npz"]


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt(), ValueError("boom")])
def test_failed_save_leaves_nothing_and_keeps_the_old_file(tiny_session, tmp_path, monkeypatch, exc):
    _, st_ = tiny_session.prefill([[1]])
    target = tmp_path / "s.npz"
    target.write_bytes(b"old")

    def failing(*a, **k):
        raise exc

    monkeypatch.setattr(np, "savez", failing)
    with pytest.raises(RuntimeUserError if isinstance(exc, OSError) else type(exc)):
        st_.save(target)
    assert os.listdir(tmp_path) == ["s.npz"] and target.read_bytes() == b"old"


def test_save_into_a_missing_folder_or_a_directory(tiny_session, tmp_path):
    st_ = tiny_session.new_state()
    with pytest.raises(RuntimeUserError, match="cannot write"):
        st_.save(tmp_path / "nope" / "s.npz")
    with pytest.raises(RuntimeUserError, match="directory"):
        st_.save(tmp_path)


def test_state_from_another_export_is_refused(tiny, tmp_path):
    for p in (tiny, tiny.with_name("tiny4-plain.seq.onnx")):
        d = manifest_dict(p)
        d["export_id"] = "export-one"
        write_manifest(p, d)
    a = Session(tiny)
    _, st_ = a.prefill([[1, 2]])
    st_.save(tmp_path / "a.npz")
    for p in (tiny, tiny.with_name("tiny4-plain.seq.onnx")):
        d = manifest_dict(p)
        d["export_id"] = "export-two"
        write_manifest(p, d)
    b = Session(tiny)  # the same sizes, another export
    with pytest.raises(RuntimeUserError, match="another export"):
        b.load_state(tmp_path / "a.npz")
    with pytest.raises(RuntimeUserError, match="another export"):
        b.step([1], st_)
    # a state saved without an id (an older save) still loads
    arrays = st_.numpy()
    np.savez(tmp_path / "old.npz", **arrays)
    b.load_state(tmp_path / "old.npz")


def _npz(arrays: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_oversized_header_is_refused_before_reading(tiny_session, tmp_path):
    """A member whose header claims a huge batch: refused from the header, nothing allocated."""
    name = tiny_session.manifest.state[0]
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (10**9,) + tuple(name.shape[1:])}
    )
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(name.name + ".npy", b"\x93NUMPY\x01\x00" + header.getvalue()[8:] + b"\0" * 64)
    (tmp_path / "big.npz").write_bytes(buf.getvalue())
    with pytest.raises(RuntimeUserError, match="shape|truncated"):
        tiny_session.load_state(tmp_path / "big.npz")


@pytest.mark.parametrize("content", [b"", b"PK", b"not a zip at all", b"PK\x03\x04" + b"\0" * 40])
def test_not_a_state_file(tiny_session, tmp_path, content):
    (tmp_path / "x.npz").write_bytes(content)
    for fn in (
        tiny_session.load_state,
        tiny_session.set_initial_state,
        lambda p: Session(tiny_session.path, initial_state=p),
    ):
        with pytest.raises(RuntimeUserError):
            fn(tmp_path / "x.npz")


def test_pickled_members_are_refused(tiny_session, tmp_path):
    name = tiny_session.manifest.state[0].name
    np.savez(tmp_path / "p.npz", **{name: np.array([{"a": 1}], dtype=object)})
    with pytest.raises(RuntimeUserError, match="objects"):
        tiny_session.load_state(tmp_path / "p.npz")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_state_files_never_raise_anything_else(tiny_session, tmp_path, data):
    s = tiny_session
    good = s.new_state(1).numpy()
    kind = data.draw(st.sampled_from(["truncate", "flip", "drop", "extra", "dtype", "shape", "batch", "random"]))
    raw = _npz(good)
    if kind == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "flip":
        i = data.draw(st.integers(0, len(raw) - 1))
        raw = raw[:i] + bytes([raw[i] ^ data.draw(st.integers(1, 255))]) + raw[i + 1 :]
    elif kind == "drop":
        k = data.draw(st.sampled_from(sorted(good)))
        raw = _npz({n: v for n, v in good.items() if n != k})
    elif kind == "extra":
        raw = _npz({**good, data.draw(st.text(min_size=1, max_size=8).filter(lambda t: "/" not in t)): np.zeros(2)})
    elif kind == "dtype":
        k = data.draw(st.sampled_from(sorted(good)))
        dt = data.draw(st.sampled_from([np.float64, np.int32, np.complex64, np.bool_, "U3"]))
        raw = _npz({**good, k: good[k].astype(dt)})
    elif kind == "shape":
        k = data.draw(st.sampled_from(sorted(good)))
        raw = _npz({**good, k: np.zeros(data.draw(st.lists(st.integers(0, 5), max_size=3)), np.float32)})
    elif kind == "batch":
        b = data.draw(st.integers(1, 3))
        raw = _npz({k: np.repeat(v, b if i % 2 else 1, 0) for i, (k, v) in enumerate(good.items())})
    else:
        raw = data.draw(st.binary(max_size=300))
    path = tmp_path / "h.npz"
    path.write_bytes(raw)
    try:
        loaded = s.load_state(path)
    except RuntimeUserError as e:
        assert "\n" not in str(e)
    else:
        logits, _ = s.step(np.zeros(loaded.batch_size, np.int64), loaded)
        assert logits.shape == (loaded.batch_size, s.vocab_size)


def test_keeping_some_states_of_a_bound_loop(tiny_session):
    """The ping-pong buffers skip a set while the caller keeps a state in it."""
    s = tiny_session
    st_, kept = s.new_state(), []
    for t in range(12):
        _, st_ = s.step([t], st_)
        if t % 3 == 0:
            kept.append((st_, _snap(st_)))
    for h, snap in kept:
        _same(_snap(h), snap)
    ref = s.new_state()
    for t in range(12):
        _, ref = s.step([t], ref)
        ref = ref.copy()  # a state outside the buffer sets every step
    _same(_snap(ref), _snap(st_))
