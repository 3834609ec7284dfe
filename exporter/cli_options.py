"""Click option declarations that several ``rwkv-export`` commands share, each in one place."""

from __future__ import annotations

from pathlib import Path

import click


def path_option(*decls, **attrs):
    """An option whose value is a ``pathlib.Path`` (``attrs`` as ``click.option`` takes them)."""
    return click.option(*decls, type=click.Path(path_type=Path), **attrs)


def output_option(dest: str, help: str):
    """The required ``-o/--output`` path, passed to the command as ``dest``."""
    return path_option("-o", "--output", dest, required=True, help=help)


def plugin_option(help: str):
    """``--plugin`` (repeatable): TensorRT plugin libraries, passed as the tuple ``plugins``."""
    return path_option("--plugin", "plugins", multiple=True, help=help)


def path_argument(name: str):
    """A positional argument whose value is a ``pathlib.Path``."""
    return click.argument(name, type=click.Path(path_type=Path))


def choice_option(*decls, choices, default, help: str, **attrs):
    """An option taking one of ``choices``, its default shown in --help."""
    return click.option(*decls, type=click.Choice(choices), default=default, show_default=True, help=help, **attrs)
