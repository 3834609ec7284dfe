"""``rwkv-export triton``: write a Triton Inference Server model repository for an export."""

from __future__ import annotations

import click

from ..cli_options import choice_option, output_option, path_argument, plugin_option


@click.command("triton")
@path_argument("model")
@output_option(
    "repo",
    help="The model repository folder (created if needed); the model goes into REPO/NAME/.",
)
@choice_option(
    "--backend",
    choices=["onnxruntime", "tensorrt", "python"],
    default="onnxruntime",
    help="onnxruntime/tensorrt: Triton keeps the state (implicit state); "
    "python: rwkv_runtime inside Triton's Python backend (CPU).",
)
@click.option(
    "--max-batch",
    default=None,
    type=click.IntRange(1, 1024),
    help="Sequences stepped together in one execution (max_batch_size) [default: 8; an engine: at "
    "most its own maximum batch].",
)
@click.option("--name", default=None, help="Model name in the repository (default: the file name's stem).")
@click.option(
    "--idle-timeout",
    "idle_s",
    default=300.0,
    show_default=True,
    type=click.FloatRange(0.001, 1e7),
    help="Seconds a sequence may sit idle before Triton drops its state (Triton's default is 1 s).",
)
@click.option(
    "--max-sequences",
    default=None,
    type=click.IntRange(1, 2**31 - 1),
    help="Sequences open at once (oldest strategy's max_candidate_sequences; default 4 x --max-batch).",
)
@plugin_option(
    help="tensorrt: the plugin library to ship with the engine (default: the one build-engine used).",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace REPO/NAME if it exists and this command wrote it (it holds "
    ".rwkv-export-triton); never a folder holding an input, never a link.",
)
def triton_command(model, repo, backend, max_batch, name, idle_s, max_sequences, plugins, force):
    """Write a Triton model repository serving exported MODEL (an .onnx export or, for tensorrt, an engine).

    Each conversation is one Triton sequence (correlation id); see docs/triton.md.
    """
    from ..errors import run_user_errors
    from .triton import write_repository

    dest = run_user_errors(
        lambda: write_repository(model, repo, backend, max_batch, name, idle_s, max_sequences, force, tuple(plugins))
    )
    click.echo(f"wrote {dest} ({backend} backend); serve it with: tritonserver --model-repository {repo}")
    if (dest / "plugins").is_dir():
        libs = ";".join(str((dest / "plugins" / p.name).resolve()) for p in sorted((dest / "plugins").iterdir()))
        click.echo(f'the engine needs its plugin library loaded: add --backend-config=tensorrt,plugins="{libs}"')
