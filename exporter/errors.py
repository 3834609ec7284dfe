"""Errors a user can cause while exporting, and the one wrapper that turns them into one CLI line.

Every command module (cli.py, validate.py, engine.py, triton_cli.py, ...) takes ``user_errors`` from here,
so no command module imports another."""

from __future__ import annotations

import functools
import os

import click

from rwkv_runtime.errors import RuntimeUserError


class ExportError(RuntimeUserError):
    """A problem with the checkpoint or the export options."""


class CheckpointError(ExportError):
    """The checkpoint is missing, unreadable, of an unknown layout or inconsistent."""


class UnsupportedArchitecture(ExportError):
    """The checkpoint is recognised, but its RWKV version is not supported by this exporter yet."""


class Interrupted(click.ClickException):
    exit_code = 130  # the shell's code for SIGINT


def one_line(msg: str) -> str:
    """The message with every non-printable character escaped (a key or path from a damaged file can hold
    newlines or other line separators), so an error is always exactly one line."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in msg)


def user_errors(fn):
    """Turn the project's user errors (and OS ones) into one clean line + exit status 1.

    Anything else is a bug: still one line (no traceback; RWKV_EXPORT_DEBUG=1 shows it), exit 1."""

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except click.ClickException as e:  # raised by a command itself: same one-line rule
            e.message = one_line(str(e.message))
            raise
        except (click.exceptions.Exit, click.Abort):
            raise
        except RuntimeUserError as e:
            raise click.ClickException(one_line(str(e))) from None
        except OSError as e:
            where = e.filename if e.filename is not None else "I/O"
            raise click.ClickException(one_line(f"{where}: {e.strerror or type(e).__name__}")) from None
        except KeyboardInterrupt:
            raise Interrupted("interrupted") from None
        except (MemoryError, RecursionError) as e:
            raise click.ClickException(f"out of memory or nesting too deep ({type(e).__name__})") from None
        except Exception as e:  # EOFError included: click would print a bare "Aborted!" for it
            if os.environ.get("RWKV_EXPORT_DEBUG"):
                raise
            msg = str(e).splitlines()[0][:200] if str(e) else ""
            raise click.ClickException(
                one_line(
                    f"internal error ({type(e).__name__}: {msg}); "
                    "please report it (RWKV_EXPORT_DEBUG=1 shows the traceback)"
                )
            ) from None

    return wrapper


def run_user_errors(fn):
    """Call ``fn()`` with the same one-line treatment of user errors as the decorated commands."""
    return user_errors(fn)()
