"""One look at a submitted job: its status and, once COMPLETED, the values its session saved."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fv_remote.core.errors import UserError
from fv_remote.execution.config import api_key, host
from fv_remote.execution.messages import _detail, _summary


@dataclass
class PollResult:
    """The state of a submitted job: its last status and, once COMPLETED, the values its session saved."""

    job_id: str
    status: str  # RECEIVED / QUEUED / RUNNING / COMPLETED / ... or UNKNOWN (no status recorded yet)
    result: dict | None = None
    result_bytes: int = 0


def poll_job(job_id: str, compress: bool = True, model_key: str = "", at: str | None = None) -> PollResult:
    """One look at a job submitted with `NDIF(wait=False)` (GET /response/{id}); the saved values once it is COMPLETED.

    `at` is the host the job went to (default: the configured host). A job that failed on the server raises a
    UserError naming it; so does a host that cannot be reached.
    """
    import httpx
    from nnsight.intervention.backends.remote import RemoteBackend, RemoteError

    class _Poller(RemoteBackend):
        result_bytes = 0

        def finalize(self, content: bytes) -> Any:
            self.result_bytes = len(content)
            return super().finalize(content)

    where = (at or host()).rstrip("/")
    backend = _Poller(model_key or "poll", host=where, api_key=api_key() or "", blocking=False, job_id=job_id)
    backend.compress = compress
    backend.display.enabled = False
    try:
        result = backend.poll()
    except RemoteError as exc:
        raise UserError(f"NDIF job {job_id} failed on the server: {_summary(str(exc))}") from None
    except httpx.HTTPStatusError as exc:
        raise UserError(f"NDIF ({where}) answered the poll of job {job_id} with HTTP "
                        f"{exc.response.status_code}: {_detail(exc.response.content)}") from None
    except httpx.HTTPError as exc:
        raise UserError(f"cannot reach NDIF at {where} to poll job {job_id}: {exc or type(exc).__name__}") \
            from None
    status = backend.status.value if backend.status is not None else "UNKNOWN"
    if status == "COMPLETED" and not isinstance(result, dict):
        raise UserError(f"NDIF job {job_id} is COMPLETED but its result could not be read")
    return PollResult(job_id, status, result if status == "COMPLETED" else None, backend.result_bytes)

