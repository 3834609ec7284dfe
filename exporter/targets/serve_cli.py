"""``rwkv-export serve MODEL``: the OpenAI-compatible server of ``rwkv_runtime.server`` from the CLI.

Its flags are generated from ``rwkv_runtime.server``'s ServerOptions / EngineConfig (options.py), as are
those of ``python -m rwkv_runtime.server``: one declaration, one default each."""

from __future__ import annotations

from pathlib import Path

import click

from rwkv_runtime.errors import RuntimeUserError

from ..cli_options import path_argument

_MISSING_EXTRA = None
try:
    from rwkv_runtime.server.options import cli_options
except ImportError as e:  # the serve extra is missing: the command still exists, and says so when run
    _MISSING_EXTRA = e.name

    def cli_options():
        return []


def _convert_states(model: Path, opts):
    """``--state NAME=FILE.pth``: a state-tuning file (torch's format) read here, where torch is, into the
    arrays the torch-free server starts from (``ServerOptions.state_arrays``); .npz files are the server's."""
    import dataclasses

    from rwkv_runtime.server.named_states import TORCH_SUFFIXES, parse

    todo = [(n, p) for n, p in parse(opts.states) if p.suffix.lower() in TORCH_SUFFIXES]
    if not todo:
        return opts
    from .. import arch
    from ..checkpoint import check_state_finite, read_state_tuning
    from ..export import load_manifest

    man = load_manifest(model)
    spec = arch.get(man.architecture)
    converted = {}
    for name, path in todo:
        if spec.load_state_tuning is None:
            raise RuntimeUserError(f"--state {name}={path}: {spec.name} has no learned initial state")
        try:
            arrays = spec.load_state_tuning(read_state_tuning(path), dict(man.dims))
        except (KeyError, ValueError, IndexError, TypeError) as e:
            raise RuntimeUserError(f"--state {name}={path}: not a state-tuning file of this model ({e})") from None
        for k, v in arrays.items():
            check_state_finite(v, f"--state {name}={path}: {k}")
        converted[name] = arrays
    return dataclasses.replace(opts, state_arrays=converted)


def _click_type(fl):
    if fl.choices:
        return click.Choice([str(c) for c in fl.choices])
    if fl.type is int and (fl.min is not None or fl.max is not None):
        return click.IntRange(fl.min, fl.max, min_open=fl.min_open)
    if fl.type is float and (fl.min is not None or fl.max is not None):
        return click.FloatRange(fl.min, fl.max, min_open=fl.min_open)
    return fl.type


def _with_options(f):
    for o in reversed(cli_options()):
        fl = o.flag
        f = click.option(
            o.flag_name,
            o.dest,
            default=() if fl.multiple else o.default,
            type=_click_type(fl),
            multiple=fl.multiple,
            help=fl.help + ".",
            show_default=not fl.secret,
            metavar="KEY" if fl.secret else None,
        )(f)
    return f


@click.command("serve")
@path_argument("model")
@_with_options
def serve_command(model, **values):
    """Serve MODEL over an OpenAI-compatible HTTP API (continuous batching, prefix-state cache).

    Needs the serve extra (pip install "rwkv-export[serve]"). Endpoints: /v1/completions,
    /v1/chat/completions, /v1/models, /tokenize, /detokenize, /health, /metrics. See docs/serving.md.
    """
    if _MISSING_EXTRA:
        raise click.ClickException(
            f'serving needs the serve extra: pip install "rwkv-export[serve]" ({_MISSING_EXTRA} is missing)'
        )
    from rwkv_runtime.server import run
    from rwkv_runtime.server.options import from_cli

    if not Path(model).is_file():
        raise click.ClickException(f"{model}: no such file")
    try:
        run(_convert_states(Path(model), from_cli(str(model), values)))
    except RuntimeUserError as e:  # (the CLI's user_errors, without importing cli.py: it imports us)
        raise click.ClickException(str(e)) from None
