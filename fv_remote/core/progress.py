"""`Progress`: the callback every long stage takes, called as `progress(done, total)` (the CLI draws a bar)."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[int, int], None]

__all__ = ["Progress"]
