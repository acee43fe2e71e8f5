"""Errors that mean "the user asked for something we cannot do".

The CLI prints these as one line and exits non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
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
