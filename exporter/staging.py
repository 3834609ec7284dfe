"""The exporter's name for ``rwkv_runtime.safe_write`` (one staging/commit/recovery primitive for every
writer of the project; see that module for the contract). Kept so ``from rwkv_export.staging import
Staging`` and the tests' ``staging.PREFIX`` / ``staging.recover`` still work."""

from __future__ import annotations

from rwkv_runtime.safe_write import (  # noqa: F401
    JOURNAL,
    LOCK,
    PREFIX,
    OutputIsInput,
    SafeWrite,
    Terminated,
    UnsafeOutput,
    check_not_inputs,
    recover,
    staging_folders,
    write_file,
)

Staging = SafeWrite
