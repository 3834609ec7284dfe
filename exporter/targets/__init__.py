"""Where an export goes after it is verified: TensorRT engines (``tensorrt/``), Triton model repositories,
browser bundles (``web``), ONNX Runtime Mobile (``mobile``), and the commands that drive them
(``triton_cli``, ``edge_cli``, ``serve_cli``). Each reads an export through ``rwkv_runtime.artifact``."""

from __future__ import annotations

from pathlib import Path


def check_new_folder(out: Path) -> None:
    """``out`` (a -o folder a target writes) must be new or empty, in a folder that exists."""
    from ..errors import ExportError

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out}: exists and is not an empty folder; choose another -o")
    if not out.parent.is_dir():
        raise ExportError(f"{out.parent}: no such folder")
