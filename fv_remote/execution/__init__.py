"""The one place that knows where a stage's body runs: locally, as nnsight's in-process dry run, on NDIF (blocking)
or submitted to NDIF without waiting. One job per module:

| module | job |
|---|---|
| `executor` | `Executor` (`Local`, `DryRun`, `NDIF`), `Executor.run(stage, model, plan)`, `stage_session` |
| `stage` | `Stage`: a name, a typed JSON-able plan, one body, one commit |
| `jobs` | `Job`: a submitted stage's handle and job file (status, fetch = the stage's own commit) |
| `config` | API key, host, client time limit, sandbox opt-in (environment / nnsight's config) |
| `shipping` | `fv_remote.traces` shipped by source; `check_shippable` for what a body reads |
| `backend` | nnsight's RemoteBackend with time limit, one-line errors, size records, submit-only (`JobSubmitted`) |
| `polling` | one look at a submitted job (`poll_job`) and the values it saved |
| `messages` | one-line texts of NDIF's errors |
| `hosted` | weightless local copies of NDIF-hosted models |
| `service` | NDIF's `/status` (hosted models) and `/env` (version check) |
"""

from __future__ import annotations

from fv_remote.execution.backend import JobRecord, JobSubmitted, make_backend
from fv_remote.execution.config import api_key, host, sandboxed, timeout_s
from fv_remote.execution.executor import (NDIF, DryRun, Executor, Local, Target, executor_of, load_remote_model,
                                          resolve, run_stage, stage_session, trace_options)
from fv_remote.execution.hosted import remote_repo_id
from fv_remote.execution.polling import PollResult, poll_job
from fv_remote.execution.service import ServiceStatus, VersionCheck, check, status
from fv_remote.execution.shipping import check_shippable, register_traces


__all__ = ["NDIF", "DryRun", "Executor", "JobRecord", "JobSubmitted", "Local", "PollResult", "ServiceStatus",
           "Target", "VersionCheck", "api_key", "check", "check_shippable", "executor_of", "host", "run_stage",
           "load_remote_model", "make_backend", "poll_job", "register_traces",
           "remote_repo_id", "resolve", "sandboxed", "stage_session", "status", "timeout_s",
           "trace_options"]
