"""The edge commands: ``rwkv-export web`` (a browser bundle) and ``rwkv-export mobile`` (ORT format)."""

from __future__ import annotations

import click

from rwkv_runtime.errors import RuntimeUserError

from ..cli_options import output_option, path_argument, path_option
from ..errors import ExportError


def _run(fn, *a):
    try:
        return fn(*a)
    except (ExportError, RuntimeUserError) as e:
        raise click.ClickException(str(e)) from None
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        raise click.ClickException(f"{e.filename}: {e.strerror}") from None


@click.command("web")
@path_argument("model")
@output_option("out", help="New folder for the bundle.")
@path_option(
    "--ort-web",
    "ort_web",
    default=None,
    help="Folder with ONNX Runtime Web 1.30's files: its dist folder, the onnxruntime-web package or the "
    "node_modules holding it (`npm install onnxruntime-web@1.30.0`). Default: a checkout's js/node_modules.",
)
def web_command(model, out, ort_web):
    """Write a static web bundle for an exported MODEL (.onnx): demo page, JS runtime, ONNX Runtime Web."""
    from .web import write_web_bundle

    files = _run(write_web_bundle, model, out, None, ort_web)
    size = sum(f.stat().st_size for f in files)
    click.echo(f"wrote {out} ({len(files)} files, {size / 1e6:.1f} MB); serve it with: python {out / 'serve.py'}")


@click.command("mobile")
@path_argument("model")
@output_option("out", help="New folder for the .ort files.")
def mobile_command(model, out):
    """Convert an exported MODEL (.onnx) and its companions to ORT format for ONNX Runtime Mobile."""
    from .mobile import write_mobile

    for f in _run(write_mobile, model, out):
        click.echo(f"wrote {f} ({f.stat().st_size / 1e6:.1f} MB)")


def register(main) -> None:
    main.add_command(web_command)
    main.add_command(mobile_command)
