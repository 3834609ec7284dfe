"""Shared fixtures: the golden models in tests/golden (always present), the optional ../shared lane
(`@pytest.mark.shared`, skipped with a reason where absent) and session-scoped exports so each test file
does not re-export."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# BlinkDL's `rwkv` package reads these at import time: plain PyTorch on the CPU
os.environ.setdefault("RWKV_JIT_ON", "0")
os.environ.setdefault("RWKV_CUDA_ON", "0")

# Property-based tests (hypothesis) run a fixed, reproducible set of examples by default, so CI cannot
# pass or fail by luck; HYPOTHESIS_PROFILE=explore draws fresh examples on every run (local bug hunting).
try:
    from hypothesis import settings as _hsettings

    _hsettings.register_profile("ci", derandomize=True, print_blob=True)
    _hsettings.register_profile("explore", derandomize=False)
    _hsettings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # hypothesis is a dev dependency; its tests skip without it
    pass

REPO = Path(__file__).resolve().parents[1]
# The golden models every fast test uses: tiny random-weight checkpoints of each architecture with BlinkDL's
# logits, made by tests/golden/make_golden.py and committed (a clone has everything the fast tests need).
GOLDEN = REPO / "tests" / "golden"
REF = GOLDEN  # the folder of reference checkpoints and their BlinkDL logits
# ../shared (beside the checkout, in CI only): the trained tiny models, rwkv.cpp's logits and the 20B
# tokenizer, for the optional `shared` lane. RWKV_SHARED_DIR overrides it (a missing folder simulates a clone).
SHARED = Path(os.environ.get("RWKV_SHARED_DIR") or REPO.parent / "shared")
SHARED_MODELS = SHARED / "reference" / "models"
PROMPTS = {"in": b'"in', "atom": b"Describe the structure of an atom."}


def ref_model(name: str) -> Path:
    """A golden checkpoint (tests/golden/NAME.pth); never skipped: it is part of the repository."""
    p = GOLDEN / f"{name}.pth"
    assert p.is_file(), f"golden model {p} is missing (python tests/golden/make_golden.py makes it)"
    return p


def ref_logits(name: str, prompt: str) -> np.ndarray:
    """BlinkDL's logits [T, 256] for a golden model after each token of PROMPTS[prompt]."""
    return np.load(GOLDEN / f"{name}.blinkdl-logits-{prompt}.npy")


def shared_missing() -> str | None:
    """Why the shared lane cannot run here, or None."""
    if not SHARED_MODELS.is_dir():
        return f"needs {SHARED}/reference (absent; set RWKV_SHARED_DIR to use a copy elsewhere)"
    return None


def shared_file(rel: str) -> Path:
    """A file under ../shared/reference, or a one-line skip where it is absent."""
    p = SHARED / "reference" / rel
    if not p.is_file():
        pytest.skip(f"{p} is not available (../shared/reference is absent; see RWKV_SHARED_DIR)")
    return p


def shared_model(name: str) -> Path:
    """A trained tiny model from ../shared/reference/models (shared lane), or a one-line skip."""
    return shared_file(f"models/{name}.pth")


def hf_tokenizer_json(path: Path) -> Path:
    """The 20B tokenizer.json from ../shared where present, else a small byte-level BPE tokenizer.json that
    Hugging Face's `tokenizers` trains here (deterministic: fixed text, one thread's merges order), so the
    tokenizer.json paths run on a clone too. Written to ``path``; returns it."""
    src = SHARED / "reference" / "tokenizers" / "20B_tokenizer.json"
    if src.is_file():
        path.write_bytes(src.read_bytes())
        return path
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>", "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = [
        "Describe the structure of an atom. Hello world! The quick brown fox jumps over the lazy dog.",
        "def main():\n    import os\n    return os.getcwd()  # naive caf\u00e9, \u00fcber, na\u00efve",
        "In the beginning the model read bytes; then it read words, and the words were tokens.",
    ] * 20
    tok.train_from_iterator(text, trainer)
    tok.save(str(path))
    return path


def pytest_collection_modifyitems(config, items):
    """Tests marked `shared` skip with one line where ../shared is absent."""
    why = shared_missing()
    if why:
        for item in items:
            if item.get_closest_marker("shared"):
                item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture(scope="session")
def rwkv4_ref() -> Path:
    return ref_model("golden-rwkv4")


@pytest.fixture(scope="session")
def rwkv4_exports(rwkv4_ref, tmp_path_factory) -> dict:
    """The RWKV-4 golden model exported in plain and plugin mode (step + sequence graphs)."""
    from rwkv_export.export import ExportOptions, export

    out = {}
    d = tmp_path_factory.mktemp("rwkv4")
    for wkv in ("plain", "plugin"):
        paths = export(rwkv4_ref, d / f"tiny4-{wkv}.onnx", ExportOptions(wkv=wkv))
        out[wkv] = paths[0]
    return out
