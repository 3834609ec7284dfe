"""Errors a user can cause (bad file, bad token, bad state): the CLI prints them as one line."""


class RuntimeUserError(ValueError):
    """A problem with the user's input, reported as one clear line (never a traceback)."""


class BackendUnavailable(RuntimeUserError):
    """An optional backend (TensorRT, CUDA bindings) is not installed."""
