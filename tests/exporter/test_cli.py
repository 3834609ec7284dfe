"""The rwkv-export CLI: each command works, and user errors are one line with a non-zero exit."""

import subprocess
import sys

import pytest
from click.testing import CliRunner

from rwkv_export.cli import main


def run_cli(*args):
    """Run the real console entry point in a subprocess (so tracebacks would show on stderr)."""
    return subprocess.run(
        [sys.executable, "-c", "from rwkv_export.cli import main; main()", *map(str, args)],
        capture_output=True,
        text=True,
    )


def test_help_for_every_command():
    r = CliRunner()
    for cmd in ([], ["export"], ["generate"], ["inspect"], ["bench"]):
        res = r.invoke(main, cmd + ["--help"])
        assert res.exit_code == 0 and "Usage" in res.output


def test_export_inspect_generate(rwkv4_ref, tmp_path):
    out = tmp_path / "m.onnx"
    res = run_cli("export", rwkv4_ref, "-o", out, "-q")
    assert res.returncode == 0, res.stderr
    assert out.is_file() and (tmp_path / "m.seq.onnx").is_file()
    res = run_cli("inspect", out)
    assert res.returncode == 0 and "rwkv4" in res.stdout and "state.0.wkv_pp" in res.stdout
    res = run_cli("generate", out, "--prompt", "Describe", "-n", "10", "--seed", "1")
    assert res.returncode == 0 and res.stdout.startswith("Describe") and "tokens/s" in res.stderr


def _one_clean_line(res):
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, res.stderr
    return lines[0]


@pytest.mark.parametrize(
    "make, expect",
    [
        (lambda d: d / "missing.pth", "no such file"),
        (lambda d: (d / "junk.pth").write_bytes(b"hello world") and d / "junk.pth", "not a PyTorch checkpoint"),
        (lambda d: (d / "empty.pth").write_bytes(b"") or d / "empty.pth", "empty"),
    ],
)
def test_bad_checkpoints(tmp_path, make, expect):
    res = run_cli("export", make(tmp_path), "-o", tmp_path / "out.onnx", "-q")
    assert expect in _one_clean_line(res)
    assert not (tmp_path / "out.onnx").exists()


def test_truncated_and_inconsistent_checkpoints(rwkv4_ref, tmp_path):
    import torch

    trunc = tmp_path / "trunc.pth"
    trunc.write_bytes(rwkv4_ref.read_bytes()[:200_000])
    assert "truncated" in _one_clean_line(run_cli("export", trunc, "-o", tmp_path / "o.onnx", "-q"))

    sd = torch.load(rwkv4_ref, weights_only=True)
    bad = dict(sd)
    bad["blocks.1.att.key.weight"] = torch.zeros(128, 64)
    torch.save(bad, tmp_path / "shape.pth")
    assert "inconsistent shape" in _one_clean_line(
        run_cli("export", tmp_path / "shape.pth", "-o", tmp_path / "o.onnx", "-q")
    )
    missing = {k: v for k, v in sd.items() if k != "blocks.1.ffn.value.weight"}
    torch.save(missing, tmp_path / "missing.pth")
    assert "missing keys" in _one_clean_line(
        run_cli("export", tmp_path / "missing.pth", "-o", tmp_path / "o.onnx", "-q")
    )
    extra = {**sd, "blocks.0.att.something": torch.zeros(3)}
    torch.save(extra, tmp_path / "extra.pth")
    assert "unknown keys" in _one_clean_line(run_cli("export", tmp_path / "extra.pth", "-o", tmp_path / "o.onnx", "-q"))
    torch.save({"foo": torch.zeros(3)}, tmp_path / "other.pth")
    assert "not an RWKV checkpoint" in _one_clean_line(
        run_cli("export", tmp_path / "other.pth", "-o", tmp_path / "o.onnx", "-q")
    )
    assert not (tmp_path / "o.onnx").exists()


def test_newer_versions_are_recognised_but_not_supported_yet(tmp_path):
    """Every RWKV version is recognised from its keys; unsupported ones say so in one line."""
    import torch

    from rwkv_export import arch

    sd = {"emb.weight": torch.zeros(4, 8), "blocks.0.att.r_k": torch.zeros(1, 8), "head.weight": torch.zeros(4, 8)}
    torch.save(sd, tmp_path / "v7.pth")
    res = run_cli("export", tmp_path / "v7.pth", "-o", tmp_path / "o.onnx", "-q")
    if any("rwkv7" in s.versions for s in arch.specs()):
        assert "RWKV-7" in _one_clean_line(res) or "missing" in _one_clean_line(res)
    else:
        assert "RWKV-7 checkpoint recognised" in _one_clean_line(res)


def test_runtime_errors_are_one_line(rwkv4_exports, tmp_path):
    res = run_cli("generate", tmp_path / "nope.onnx", "--prompt", "x")
    assert "no such file" in _one_clean_line(res)
    (tmp_path / "bad.onnx").write_bytes(b"\x00\x01garbage")
    res = run_cli("inspect", tmp_path / "bad.onnx")
    _one_clean_line(res)


@pytest.mark.parametrize(
    "exc, expect, code",
    [
        (ZeroDivisionError("division by zero"), "internal error (ZeroDivisionError", 1),
        (EOFError("Ran out of input"), "internal error (EOFError", 1),
        (OSError(30, "Read-only file system", "/x/m.onnx"), "/x/m.onnx: Read-only file system", 1),
        (KeyboardInterrupt(), "interrupted", 130),
    ],
)
def test_unexpected_errors_are_one_line_never_aborted(rwkv4_ref, tmp_path, monkeypatch, exc, expect, code):
    """Every command is wrapped (also those registered from other modules): a bug or an OS error is one
    line, never a traceback or click's bare "Aborted!"."""
    import rwkv_export.export as ex

    def boom(*a, **k):
        raise exc

    monkeypatch.setattr(ex, "export", boom)
    res = CliRunner().invoke(main, ["export", str(rwkv4_ref), "-o", str(tmp_path / "m.onnx"), "-q"])
    assert res.exit_code == code and isinstance(res.exception, SystemExit), res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and expect in lines[0] and "Aborted" not in res.output
