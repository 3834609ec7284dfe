"""Errors a user can cause (bad file, bad token, bad state): the CLI prints them as one line."""


class RuntimeUserError(ValueError):
    """A problem with the user's input, reported as one clear line (never a traceback)."""


class BackendUnavailable(RuntimeUserError):
    """An optional backend (TensorRT, CUDA bindings) is not installed."""


PROMPT_ERRORS = ("the prompt must be text or a list of token ids", "the prompt is empty")


def nonempty_list(values, not_a_list: str, empty: str) -> list:
    """``values`` (a caller's iterable) as a list; RuntimeUserError(``not_a_list``) when it is not
    iterable, RuntimeUserError(``empty``) when it holds nothing."""
    try:
        out = list(values)
    except TypeError:
        raise RuntimeUserError(not_a_list) from None
    if not out:
        raise RuntimeUserError(empty)
    return out
