"""The server's command-line options, declared once.

Each option is a field of ``runner.ServerOptions`` (or of ``engine.EngineConfig``, through its
``engine`` field) whose metadata holds a ``Flag``: the help text, the flag name, the type and the
bounds. Both command lines are generated from these: argparse (``python -m rwkv_runtime.server``,
``__main__.py``) and click (``rwkv-export serve``, ``exporter/serve_cli.py``), and ``from_cli`` turns
what either parsed into a ``ServerOptions``, checking the bounds in one place. A default is the
field's default, nowhere else.

EngineConfig lives in engine.py (the scheduler); its flags are described here in ``ENGINE_FLAGS``,
keyed by field name, with the defaults read from EngineConfig itself.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from rwkv_runtime import RuntimeUserError

API_KEY_ENV = "RWKV_API_KEY"


@dataclass(frozen=True)
class Flag:
    help: str
    flag: str | None = None  # default: the field name, --with-dashes
    type: type = str  # int, float or str (the command-line value; ``scale`` converts it to the field's)
    min: float | None = None
    min_open: bool = False  # min itself is refused
    max: float | None = None
    choices: tuple | None = None
    multiple: bool = False  # repeatable; the field gets a tuple (None when not given)
    scale: float | None = None  # field value = command-line value * scale (rounded to int)
    env: str | None = None  # environment variable read when the flag is not given
    secret: bool = False  # never shown (a default from the environment, say)


def opt(default, help: str, **kw):
    """A dataclass field with a default and a command-line flag."""
    return dataclasses.field(default=default, metadata={"cli": Flag(help, **kw)})


# EngineConfig's command-line flags (its other fields are for Python callers only)
ENGINE_FLAGS = {
    "max_batch": Flag("sequences decoded together", type=int, min=1),
    "max_queue": Flag("queued requests before 429", type=int, min=1),
    "prefill_chunk": Flag("prompt chunk length (prefix states are cached at chunk ends)", type=int, min=1),
    "prefill_budget": Flag(
        "prompt tokens prefilled between two decode steps (interleaved with decoding)", type=int, min=1
    ),
    "max_prompt_tokens": Flag("longer prompts get 413", type=int, min=1),
    "max_tokens": Flag("ceiling on a request's max_tokens", type=int, min=1),
    "request_timeout": Flag("seconds per request (then finish_reason timeout)", type=float, min=0, min_open=True),
    "cache_bytes": Flag("prefix-state cache budget in MiB (0: off)", flag="--cache-mb", type=float, min=0, scale=2**20),
}


@dataclass(frozen=True)
class CliOption:
    """One generated flag: where its value goes (``target``: "server" or "engine"), the field, the flag."""

    target: str
    name: str
    flag: Flag
    default: object  # as the command line shows it (scaled back)

    @property
    def flag_name(self) -> str:
        return self.flag.flag or "--" + self.name.replace("_", "-")

    @property
    def dest(self) -> str:
        return self.flag_name[2:].replace("-", "_")


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def cli_options() -> list[CliOption]:
    """Every flag of both command lines, in help order (EngineConfig's where ServerOptions holds it)."""
    from .engine import EngineConfig
    from .runner import ServerOptions

    out = []
    for f in dataclasses.fields(ServerOptions):
        if f.name == "engine":
            for ef in dataclasses.fields(EngineConfig):
                if ef.name in ENGINE_FLAGS:
                    fl = ENGINE_FLAGS[ef.name]
                    d = _default(ef)
                    out.append(CliOption("engine", ef.name, fl, d / fl.scale if fl.scale else d))
        elif "cli" in f.metadata:
            d = _default(f)
            out.append(CliOption("server", f.name, f.metadata["cli"], None if f.metadata["cli"].secret else d))
    return out


def _check(o: CliOption, v):
    fl, name = o.flag, o.flag_name
    if fl.choices is not None and v not in fl.choices:
        raise RuntimeUserError(f"{name} must be one of {', '.join(map(str, fl.choices))}, not {v!r}")
    if fl.min is not None and (v < fl.min or (fl.min_open and v == fl.min)):
        raise RuntimeUserError(f"{name} must be {'>' if fl.min_open else '>='} {fl.min:g}")
    if fl.max is not None and v > fl.max:
        raise RuntimeUserError(f"{name} must be <= {fl.max:g}")


def from_cli(model: str, values: dict):
    """A ``ServerOptions`` from parsed command-line values (keyed by each option's ``dest``); a value that
    is None or absent takes the option's environment variable, if it has one, else the field default.
    RuntimeUserError for a value out of bounds."""
    from .engine import EngineConfig
    from .runner import ServerOptions

    server, engine = {}, {}
    for o in cli_options():
        v = values.get(o.dest)
        if o.flag.multiple:
            v = tuple(v) if v else None
        if v is None and o.flag.env:
            v = os.environ.get(o.flag.env) or None
        if v is None:
            continue
        for x in v if o.flag.multiple else (v,):
            _check(o, x)
        if o.flag.scale:
            v = int(v * o.flag.scale)
        (engine if o.target == "engine" else server)[o.name] = v
    return ServerOptions(str(model), engine=EngineConfig(**engine), **server)
