"""Fixtures for the edge (JavaScript) tests: exports of the reference models, and the Python runtime's
answers on them (logits, greedy and seeded generations, a saved state, tokenizer ids) written to a
folder the JavaScript tests read. The JavaScript side must reproduce these; Python is the truth here,
and the Python runtime itself is checked against BlinkDL's logits elsewhere (and again below)."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REF, hf_tokenizer_json, ref_logits, ref_model

REPO = Path(__file__).resolve().parents[2]
JS = REPO / "js"
MODELS = {"v4": "golden-rwkv4", "v7": "golden-rwkv7"}
PROMPT = b"Describe the structure of an atom."
SAMPLING = [  # seeded sampling settings both runtimes must agree on token for token
    {"temperature": 1.0, "top_p": 0.85, "top_k": 0, "seed": 7},
    {"temperature": 0.7, "top_p": 0.95, "top_k": 20, "presence_penalty": 0.4, "frequency_penalty": 0.3, "seed": 123},
    {"temperature": 1.3, "top_p": 1.0, "top_k": 5, "penalty_decay": 0.9, "frequency_penalty": 1.0, "seed": 2**40 + 5},
    # (JSON turns the int keys into strings: the JavaScript side reads {"101": 2.5, ...})
    {"temperature": 0.9, "top_p": 0.9, "logit_bias": {101: 2.5, 32: -1.5, 10: -100.0, 116: 0.75}, "seed": 99},
    {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "seed": 31},  # no cut at all: the server's default
]


def node_ready() -> str | None:
    """Why the JavaScript tests cannot run here, or None."""
    if shutil.which("node") is None:
        return "node is not installed"
    if not (JS / "node_modules" / "onnxruntime-node").is_dir():
        return "js/node_modules is missing (run scripts/ci_edge_setup.sh: npm ci in js/)"
    return None


def node_export(tmp_path_factory, name: str):
    """(a fresh folder, the default model exported self-contained into it as m.onnx) for a JavaScript
    suite; skips when Node is not ready."""
    why = node_ready()
    if why:
        pytest.skip(why)
    from rwkv_export import DEFAULT_MODEL
    from rwkv_export.export import ExportOptions, export

    d = tmp_path_factory.mktemp(name)
    return d, export(DEFAULT_MODEL, d / "m.onnx", ExportOptions(external_data=False))[0]


def mixed_script_text(n_chars: int = 120_000, seed: int = 0) -> str:
    """A large deterministic text mixing scripts, punctuation, digits, emoji and whitespace runs."""
    rnd = random.Random(seed)
    ranges = [
        (0x20, 0x7E),
        (0x20, 0x7E),
        (0x20, 0x7E),
        (0xC0, 0x17F),
        (0x391, 0x3C9),
        (0x410, 0x44F),
        (0x5D0, 0x5EA),
        (0x621, 0x64A),
        (0x905, 0x939),
        (0xE01, 0xE30),
        (0x3041, 0x3093),
        (0x30A1, 0x30F6),
        (0x4E00, 0x4FFF),
        (0xAC00, 0xAD00),
        (0x1F600, 0x1F64F),
        (0x2000, 0x206F),
    ]
    words = [
        "the",
        " the",
        "ing",
        " and",
        "\n\n",
        "    ",
        "\t",
        "http://",
        "<|endoftext|>",
        "以下は",
        "блабла",
        " structure",
        "Describe",
        "1234567",
        "...",
        "—",
        "'ll",
        " 'd",
    ]
    out, n = [], 0
    while n < n_chars:
        if rnd.random() < 0.35:
            w = rnd.choice(words)
        else:
            lo, hi = rnd.choice(ranges)
            w = "".join(chr(rnd.randint(lo, hi)) for _ in range(rnd.randint(1, 8)))
            w += rnd.choice([" ", "", "", "\n", ", "])
        out.append(w)
        n += len(w)
    return "".join(out)


def _state_tuned_v6(d: Path) -> Path:
    """The tiny RWKV-6 exported with a (made-up, well-scaled) state-tuning file: an embedded initial state."""
    from rwkv_export.export import ExportOptions, export
    from tests.helpers import random_state_tuning

    path = ref_model("golden-rwkv6")
    random_state_tuning(path, d / "tuned6.pth", seed=0)
    return export(path, d / "golden-rwkv6-tuned.onnx", ExportOptions(state_tuning=str(d / "tuned6.pth")))[0]


def _python_case(name: str, path: Path, d: Path, blinkdl: bool = True, ref: str | None = None) -> dict:
    from rwkv_runtime import SamplingParams, Session
    from tests.helpers import step_all

    s = Session(path)
    tokens = list(PROMPT)
    step_logits, _ = step_all(s, tokens)
    prefill_logits, st = s.prefill(np.array([tokens]))
    st.save(d / f"{name}.state.npz")  # Python's saved state, for JavaScript to load
    after, st2 = s.step(np.array([ord(" ")]), st)
    greedy = list(s.generate_tokens(tokens, 40, SamplingParams(temperature=0)))
    sampled = [list(s.generate_tokens(tokens, 40, SamplingParams(**p))) for p in SAMPLING]
    return {
        "name": name,
        "model": str(path),
        "prompt": tokens,
        "step_logits": step_logits.tolist(),
        "prefill_logits": prefill_logits[0].tolist(),
        "blinkdl_logits": ref_logits(ref or name, "atom").tolist() if blinkdl else None,
        "state_file": str(d / f"{name}.state.npz"),
        "after_state_token": ord(" "),
        "after_state_logits": after[0].tolist(),
        "greedy": greedy,
        "sampled": [{"params": p, "tokens": t} for p, t in zip(SAMPLING, sampled)],
    }


@pytest.fixture(scope="session")
def edge_fixtures(tmp_path_factory) -> Path:
    """Exports + the Python runtime's answers, in one folder (also read by the browser tests)."""
    from rwkv_export.export import ExportOptions, export
    from rwkv_runtime import SamplingParams
    from rwkv_runtime.sampling import Sampler

    d = tmp_path_factory.mktemp("edge")
    cases = []
    for name in MODELS.values():
        paths = export(ref_model(name), d / f"{name}.onnx", ExportOptions())
        cases.append(_python_case(name, paths[0], d))
    # RWKV-4 with its weights in an external-data file (Node: ORT finds it by path; web: externalData)
    ext = d / "ext"
    ext.mkdir()
    p = export(ref_model(MODELS["v4"]), ext / "tiny4-ext.onnx", ExportOptions(external_data=True))[0]
    cases.append(_python_case("tiny4-ext", p, d, ref=MODELS["v4"]))
    # RWKV-6 with a learned initial state embedded in the export (no BlinkDL logits for it)
    cases.append(_python_case("golden-rwkv6-tuned", _state_tuned_v6(d), d, blinkdl=False))
    # tokenizers: the World vocabulary (BlinkDL's package ships it) and the 20B tokenizer.json
    import rwkv
    from pyrwkv_tokenizer import RWKVTokenizer

    vocab = Path(rwkv.__file__).parent / "rwkv_vocab_v20230424.txt"
    shutil.copy(vocab, d / vocab.name)
    text = mixed_script_text()
    (d / "mixed.txt").write_text(text, encoding="utf-8")
    world = {"vocab": str(d / vocab.name), "text": str(d / "mixed.txt"), "ids": RWKVTokenizer().encode(text)}
    # a tokenizer.json: the 20B one where ../shared is, else a small byte-level BPE trained here
    from tokenizers import Tokenizer

    hf_json = hf_tokenizer_json(d / "tokenizer.json")
    tok = Tokenizer.from_file(str(hf_json))
    ids = tok.encode(text).ids
    hf = {"json": str(hf_json), "text": str(d / "mixed.txt"), "ids": ids, "decoded": tok.decode(ids)}
    # the sampler alone, on fixed logits: the reference logits, rows in turn, many seeds
    logits = np.load(REF / f"{MODELS['v4']}.blinkdl-logits-atom.npy")
    sampler_cases = []
    for seed in range(20):
        for p in SAMPLING:
            params = {**p, "seed": seed}
            smp = Sampler(SamplingParams(**params))
            sampler_cases.append({"params": params, "tokens": [smp(row) for row in logits]})
    (d / "cases.json").write_text(
        json.dumps(
            {
                "models": cases,
                "world": world,
                "hf": hf,
                "sampler": {"logits": logits.tolist(), "cases": sampler_cases},
                "rng": {str(seed): np.random.default_rng(seed).random(5).tolist() for seed in (0, 1, 42, 2**33 + 1)},
            }
        )
    )
    return d


def failures(out: str) -> str:
    """The failing cases of a `node --test` spec report, without the huge diffs of long arrays."""
    keep = [
        ln[:300] for ln in out.splitlines() if ln.startswith(("✖", "  Error", "  AssertionError", "  TypeError", "ℹ"))
    ]
    return "\n".join(keep[-60:])


def counts_ok(out: str) -> bool:
    """True when the report says: no failures, nothing skipped, at least one test."""
    import re

    got = {k: int(v) for k, v in re.findall(r"^ℹ (tests|pass|fail|skipped|cancelled) (\d+)$", out, re.M)}
    return (
        got.get("tests", 0) > 0
        and got.get("fail", 1) == 0
        and got.get("skipped", 1) == 0
        and got.get("cancelled", 1) == 0
    )


def run_node_tests(fixtures: Path, files: list[str], timeout: int = 600, env_extra: dict | None = None):
    env = {**os.environ, "RWKV_EDGE_FIXTURES": str(fixtures), **(env_extra or {})}
    return subprocess.run(
        ["node", "--test", "--test-reporter=spec", *files],
        cwd=JS,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
