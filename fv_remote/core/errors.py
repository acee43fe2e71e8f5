"""Errors that mean "the user asked for something we cannot do".

The CLI prints these as one line and exits non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
import errno
from collections.abc import Iterable


class UserError(Exception):
    """A mistake in the input (unknown name, malformed file, bad count); the message says what to do."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def require_positive(name: str, value: int) -> int:
    if value is None or int(value) <= 0:
        raise UserError(f"{name} must be a positive integer, got {value}")
    return int(value)


def os_error_message(exc: OSError, target: str, doing: str) -> str | None:
    """One line for an OSError a user can fix (permissions, read-only or full disk, file in the way), else None."""
    code = getattr(exc, "errno", None)
    if isinstance(exc, PermissionError) or code in (errno.EACCES, errno.EPERM):
        return f"cannot {doing} {target}: permission denied; use a folder you can write to"
    if code == errno.EROFS:
        return f"cannot {doing} {target}: the file system is read-only; use a writable folder"
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"cannot {doing} {target}: no space left on the device; free some space and rerun"
    if isinstance(exc, (NotADirectoryError, FileExistsError)) or code in (errno.ENOTDIR, errno.EEXIST):
        return f"cannot {doing} {target}: a file is in the way ({exc.filename or target} is not a folder)"
    if isinstance(exc, IsADirectoryError) or code == errno.EISDIR:
        return f"cannot {doing} {target}: it is a folder, not a file"
    return None
