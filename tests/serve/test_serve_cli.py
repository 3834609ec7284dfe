"""`rwkv-export serve` as a user starts it: an address it cannot listen on is one `Error:` line and exit 1,
before the model is loaded (uvicorn by itself logs the error and exits 3)."""

from __future__ import annotations

import socket
import subprocess
import sys

from .conftest import need_serve_deps

need_serve_deps()


def _serve(model, *args):
    return subprocess.run(
        [sys.executable, "-c", "from rwkv_export.cli import main; main()", "serve", str(model), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_taken_port_is_one_error_line(default_model):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = _serve(default_model, "--port", str(port))
    assert res.returncode == 1, res.stderr
    lines = res.stderr.strip().splitlines()
    assert lines == [f"Error: cannot listen on 127.0.0.1:{port} (Address already in use); choose another --port"]


def test_an_unknown_host_is_one_error_line(default_model):
    res = _serve(default_model, "--host", "no-such-host.invalid", "--port", "0")
    assert res.returncode == 1, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: cannot listen on no-such-host.invalid:0 ("), lines
