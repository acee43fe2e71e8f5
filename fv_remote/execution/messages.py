"""One-line texts of NDIF's errors: the last line of a server traceback, the detail of a JSON error body."""

from __future__ import annotations

import json
from typing import Any


def _summary(description: str) -> str:
    """The last meaningful line of a server traceback ("ValueError: ..."), for one-line errors."""
    lines = [line.strip() for line in (description or "").strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no description"


def _detail(body: Any) -> str:
    """The `detail` of a FastAPI-style JSON error body, else the body as text."""
    if not body:
        return ""
    text = body.decode(errors="replace") if isinstance(body, (bytes, bytearray)) else str(body)
    try:
        parsed = json.loads(text)
    except ValueError:
        return text.strip()[:200]
    return str(parsed.get("detail", parsed)) if isinstance(parsed, dict) else str(parsed)
