"""The deployment examples run as documented (on the tiny reference export)."""
import subprocess
import sys
from pathlib import Path

import numpy as np

import rwkv_runtime

EXAMPLES = Path(__file__).resolve().parents[1] / "deploy_examples"


def test_minimal_generate_runs_and_is_greedy(rwkv4_exports):
    out = subprocess.run([sys.executable, str(EXAMPLES / "minimal_generate.py"), str(rwkv4_exports["plain"]), "The "],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    s = rwkv_runtime.Session(rwkv4_exports["plain"])
    expect = "".join(s.generate("The ", 64, temperature=0))
    assert out.stdout.rstrip("\n") == expect.rstrip("\n")


def test_multi_conversation_runs(rwkv4_exports):
    out = subprocess.run([sys.executable, str(EXAMPLES / "multi_conversation.py"), str(rwkv4_exports["plain"])],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "--- greedy" in out.stdout and "--- late joiner" in out.stdout
    assert np.any([ln for ln in out.stdout.splitlines() if not ln.startswith("---")])
