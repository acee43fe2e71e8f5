"""Where NDIF is and how long to wait: API key, host, client time limit, sandbox opt-in (all read at call time).

API key from `NDIF_API_KEY` or nnsight's config (`nnsight login`), host from `NDIF_HOST` or nnsight's
`CONFIG.API.HOST`, client wait limit from `FV_REMOTE_TIMEOUT` (seconds), `FV_REMOTE_SANDBOX=1` for NDIF's sandbox.
"""

from __future__ import annotations

import os

from fv_remote.core.errors import UserError

DEFAULT_TIMEOUT_S = 3600.0
# Status and /env checks are quick; don't hang a CLI on a dead host.
_HTTP_TIMEOUT = (5.0, 30.0)
# nnsight versions this client can talk to (0.8 changed the wire protocol: websocket + HTTP instead of socket.io).
SUPPORTED_SERVER = "0.8"


def api_key() -> str | None:
    """NDIF_API_KEY, else the key in nnsight's config (`nnsight login` / CONFIG.set_default_api_key)."""
    from nnsight import CONFIG

    return os.environ.get("NDIF_API_KEY") or CONFIG.API.APIKEY or None


def host() -> str:
    """NDIF_HOST, else nnsight's CONFIG.API.HOST (read at call time, so tests can point it elsewhere)."""
    from nnsight import CONFIG

    value = (os.environ.get("NDIF_HOST") or CONFIG.API.HOST or "").rstrip("/")
    if not value.startswith(("http://", "https://")):
        raise UserError(f"NDIF host {value!r} must start with http:// or https:// (set NDIF_HOST)")
    return value


def timeout_s() -> float:
    raw = os.environ.get("FV_REMOTE_TIMEOUT")
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise UserError(f"FV_REMOTE_TIMEOUT must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise UserError(f"FV_REMOTE_TIMEOUT must be positive, got {raw!r}")
    return value


def sandboxed() -> bool:
    """FV_REMOTE_SANDBOX=1: ask NDIF to run requests in its process sandbox (`"trusted": false` in the envelope).

    Public NDIF runs ordinary users' requests there (a runner process with a weightless model; no gradients cross
    to it); a server with auth off runs requests trusted unless asked. Set it to check a stage the way public NDIF
    will run it. A server with auth on decides by the API key and ignores this.
    """
    raw = os.environ.get("FV_REMOTE_SANDBOX", "").strip().lower()
    if raw in ("", "0", "false", "no"):
        return False
    if raw in ("1", "true", "yes"):
        return True
    raise UserError(f"FV_REMOTE_SANDBOX must be 1 or 0, got {raw!r}")


