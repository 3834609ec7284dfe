"""``python -m rwkv_runtime.server MODEL [--host 127.0.0.1] [--port 8000] ...`` (no torch, no click).

The flags are generated from ServerOptions / EngineConfig (options.py), as are those of ``rwkv-export serve``."""

from __future__ import annotations

import argparse
import sys

from rwkv_runtime import RuntimeUserError

from .options import cli_options, from_cli
from .runner import run


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rwkv_runtime.server", description=__doc__.splitlines()[0])
    p.add_argument("model", help="an exported model (.onnx, with its .seq.onnx beside it)")
    for o in cli_options():
        fl = o.flag
        shown = f" (default: {o.default})" if o.default is not None and not fl.multiple else ""
        kw = {"help": fl.help + shown, "type": fl.type, "dest": o.dest}
        if fl.choices:
            kw["choices"] = fl.choices
        if fl.multiple:
            kw["action"] = "append"
        if fl.secret:
            kw["metavar"] = "KEY"
        p.add_argument(o.flag_name, default=o.default, **kw)
    return p


def options_from(a):
    """A ServerOptions from parsed arguments (RuntimeUserError for a value out of bounds)."""
    return from_cli(a.model, vars(a))


def main(argv=None):
    a = parser().parse_args(argv)
    try:
        run(options_from(a))
    except RuntimeUserError as e:
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
