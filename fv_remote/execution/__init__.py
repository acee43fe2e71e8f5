"""The one place that knows where a stage's body runs: locally, as nnsight's in-process dry run, on NDIF (blocking)
or submitted to NDIF without waiting. One job per module:

| module | job |
|---|---|
| `executor` | `Executor` (`Local`, `DryRun`, `NDIF`), `resolve` of a stage's `remote` argument, `stage_session` |
| `config` | API key, host, client time limit, sandbox opt-in (environment / nnsight's config) |
| `shipping` | `fv_remote.traces` shipped by source; `check_shippable` for what a body reads |
| `backend` | nnsight's RemoteBackend with time limit, one-line errors, size records, submit-only (`JobSubmitted`) |
| `polling` | one look at a submitted job (`poll_job`) and the values it saved |
| `hosted` | weightless local copies of NDIF-hosted models |
| `service` | NDIF's `/status` (hosted models) and `/env` (version check) |
"""

from __future__ import annotations

from typing import Any

from fv_remote.execution import backend as _backend
from fv_remote.execution.backend import JobRecord, JobSubmitted, job_details, make_backend, no_wait
from fv_remote.execution.config import api_key, host, sandboxed, timeout_s
from fv_remote.execution.executor import NDIF, DryRun, Executor, Local, Target, resolve, stage_session, trace_options
from fv_remote.execution.hosted import load_remote_model, remote_repo_id
from fv_remote.execution.polling import PollResult, poll_job, saved_result
from fv_remote.execution.service import ServiceStatus, VersionCheck, check, status
from fv_remote.execution.shipping import check_shippable, register_traces


def __getattr__(name: str) -> Any:
    if name == "last_job":  # the record of the latest NDIF request (rebound per request, so read it live)
        return _backend.last_job
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["NDIF", "DryRun", "Executor", "JobRecord", "JobSubmitted", "Local", "PollResult", "ServiceStatus",
           "Target", "VersionCheck", "api_key", "check", "check_shippable", "host", "job_details",
           "load_remote_model", "make_backend", "no_wait", "poll_job", "register_traces",
           "remote_repo_id", "resolve", "sandboxed", "saved_result", "stage_session", "status", "timeout_s",
           "trace_options"]
