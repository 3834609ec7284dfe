"""Errors a user can cause while exporting; the CLI prints them as one line and exits non-zero."""
from rwkv_runtime.errors import RuntimeUserError


class ExportError(RuntimeUserError):
    """A problem with the checkpoint or the export options."""


class CheckpointError(ExportError):
    """The checkpoint is missing, unreadable, of an unknown layout or inconsistent."""


class UnsupportedArchitecture(ExportError):
    """The checkpoint is recognised, but its RWKV version is not supported by this exporter yet."""
