"""rwkv_runtime on its own: torch-free, state handling, sampling semantics, bad input."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import rwkv_runtime
from rwkv_runtime import RuntimeUserError, SamplingParams
from rwkv_runtime.sampling import Sampler, sample_probs

from ..conftest import PROMPTS, ref_logits
from ..helpers import step_all

NAME = "golden-rwkv4"


def test_runtime_runs_with_torch_and_onnx_blocked(rwkv4_exports):
    """The runtime imports and runs with numpy + onnxruntime only."""
    code = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in ('torch', 'onnx', 'rwkv_export'):
                    raise ImportError('blocked: ' + name)
        sys.meta_path.insert(0, Block())
        import numpy as np, rwkv_runtime
        s = rwkv_runtime.Session({str(rwkv4_exports["plain"])!r})
        st = s.new_state(1)
        for t in {list(PROMPTS["in"])!r}:
            logits, st = s.step(np.array([t]), st)
        np.save(sys.argv[1], logits)
        text = ''.join(s.generate('ab', 5, temperature=0))
        assert isinstance(text, str) and 'torch' not in sys.modules and 'onnx' not in sys.modules
        print('ok')
    """)
    out = subprocess.run([sys.executable, "-c", code, "/dev/stdout"], capture_output=True)
    assert out.returncode == 0, out.stderr.decode()[-2000:]


def test_state_copy_save_load(rwkv4_exports, tmp_path):
    s = rwkv_runtime.Session(rwkv4_exports["plain"])
    _, st = step_all(s, b"Describe the ")
    snapshot = st.copy()
    st.save(tmp_path / "state.npz")
    loaded = s.load_state(tmp_path / "state.npz")
    rest = b"structure of an atom."
    a, _ = step_all(s, rest, snapshot)
    b, _ = step_all(s, rest, loaded)
    c, _ = step_all(s, rest, st)
    truth = ref_logits(NAME, "atom")[-len(rest) :]
    for x in (a, b, c):
        assert np.abs(x - truth).max() <= 1e-5
    assert st["state.0.wkv_pp"].dtype == np.float32 and st["state.0.wkv_pp"].shape == (1, 64)


def test_fresh_state_follows_manifest(rwkv4_exports):
    s = rwkv_runtime.Session(rwkv4_exports["plain"])
    st = s.new_state(2).numpy()
    assert np.all(st["state.1.wkv_pp"] == np.float32(-1e30)) and np.all(st["state.1.wkv_aa"] == 0)
    assert st["state.0.att_shift"].shape == (2, 64)


def test_batch_select_and_concat(rwkv4_exports):
    """Sequences join and leave a batch: gather/scatter of states by row."""
    s = rwkv_runtime.Session(rwkv4_exports["plain"])
    _, a = step_all(s, b"hello")
    _, b = step_all(s, b"world!")
    both = rwkv_runtime.State.concat([a, b])
    logits, both = s.step(np.array([32, 32]), both)
    la, _ = s.step(np.array([32]), a)
    lb, _ = s.step(np.array([32]), b)
    np.testing.assert_allclose(logits, np.concatenate([la, lb]), atol=1e-5)
    only_b = both.select([1])
    l1, _ = s.step(np.array([65]), only_b)
    _, b2 = s.step(np.array([32]), b)
    l2, _ = s.step(np.array([65]), b2)
    np.testing.assert_allclose(l1, l2, atol=1e-5)


@pytest.mark.parametrize(
    "bad, msg",
    [
        (lambda s: s.step(np.array([256])), "outside [0, 256)"),
        (lambda s: s.step(np.array([-1])), "outside"),
        (lambda s: s.step(np.array([1.5])), "integers"),
        (lambda s: s.step(np.array([1, 2]), s.new_state(1)), "batch of 1"),
        (
            lambda s: s.step(
                np.array([1]), {**s.new_state(1).numpy(), "state.0.wkv_aa": np.zeros((1, 32), np.float32)}
            ),
            "shape",
        ),
        (
            lambda s: s.step(
                np.array([1]), {**s.new_state(1).numpy(), "state.0.wkv_aa": np.zeros((1, 64), np.float64)}
            ),
            "dtype",
        ),
        (lambda s: s.step(np.array([1]), {"state.0.wkv_aa": np.zeros((1, 64), np.float32)}), "missing"),
        (lambda s: s.new_state(0), "batch_size"),
        (lambda s: s.prefill(np.array([[1, 2]]), chunk_size=0), "chunk_size"),
    ],
)
def test_bad_input_is_one_clear_error(rwkv4_exports, bad, msg):
    s = rwkv_runtime.Session(rwkv4_exports["plain"])
    with pytest.raises(RuntimeUserError, match=msg.replace("[", r"\[").replace(")", r"\)").replace("(", r"\(")):
        bad(s)


def test_not_a_model(tmp_path):
    p = tmp_path / "x.onnx"
    p.write_bytes(b"not onnx at all")
    with pytest.raises(RuntimeUserError):
        rwkv_runtime.Session(p)
    with pytest.raises(RuntimeUserError, match="no such file"):
        rwkv_runtime.Session(tmp_path / "missing.onnx")


def test_sampling_semantics():
    rng = np.random.default_rng(0)
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    assert sample_probs(probs, 0.0, 0.85, 0, rng) == 0  # temperature 0: greedy
    # top_p=0.7 keeps {0.5, 0.3}; never samples the tail
    draws = {sample_probs(probs, 1.0, 0.7, 0, rng) for _ in range(200)}
    assert draws == {0, 1}
    draws = {sample_probs(probs, 1.0, 1.0, 1, rng) for _ in range(50)}  # top_k=1
    assert draws == {0}
    # seeded samplers are reproducible
    logits = np.log(np.array([0.25, 0.25, 0.25, 0.25], np.float32))
    a = Sampler(SamplingParams(top_p=1.0, seed=7))
    b = Sampler(SamplingParams(top_p=1.0, seed=7))
    assert [a(logits) for _ in range(20)] == [b(logits) for _ in range(20)]
    # a strong presence penalty forbids repeats among equally likely tokens
    c = Sampler(SamplingParams(top_p=1.0, presence_penalty=100.0, seed=1))
    assert sorted(c(logits) for _ in range(4)) == [0, 1, 2, 3]


def test_generate_streams_text_greedy(rwkv4_exports):
    s = rwkv_runtime.Session(rwkv4_exports["plain"])
    gen = s.generate("Describe the structure of an", 8, temperature=0)
    pieces = list(gen)
    text = "".join(pieces)
    # greedy continuation equals argmax stepping
    ids = list(b"Describe the structure of an")
    logits, st = step_all(s, ids)
    expect = []
    tok = int(np.argmax(logits[-1]))
    for _ in range(8):
        expect.append(tok)
        lg, st = s.step(np.array([tok]), st)
        tok = int(np.argmax(lg[0]))
    assert text == bytes(expect).decode("utf-8", errors="replace")
    assert gen.stats["new_tokens"] == 8


def test_world_tokenizer_vector():
    from rwkv_runtime.tokenizers import WorldTokenizer

    text = "I'll 'd test блабла 以下は、]) -> <|endoftext|><|padding|> int"
    ids = [
        74,
        5229,
        274,
        101,
        32223,
        5092,
        27980,
        2795,
        27980,
        33,
        10399,
        10258,
        10139,
        10079,
        1682,
        3463,
        295,
        125,
        25258,
        7588,
        2318,
        125,
        790,
        125,
        49520,
        125,
        63,
        21888,
    ]
    t = WorldTokenizer()
    assert t.encode(text) == ids and t.decode(ids) == text


def test_hf_tokenizer_json_travels_in_the_model(rwkv4_ref, tmp_path):
    from tokenizers import Tokenizer

    from rwkv_export.export import ExportOptions, export

    from ..conftest import hf_tokenizer_json

    tok = hf_tokenizer_json(tmp_path / "tokenizer.json")  # the 20B one where ../shared is, else a small BPE
    p = export(rwkv4_ref, tmp_path / "m.onnx", ExportOptions(graphs=("step",), tokenizer=str(tok)))[0]
    s = rwkv_runtime.Session(p)
    assert s.manifest.tokenizer["kind"] == "hf-json"
    want = Tokenizer.from_file(str(tok)).encode("Hello world").ids  # Hugging Face's own answer
    assert len(want) > 1 and s.encode("Hello world") == want and s.decode(want) == "Hello world"
