"""Jobs: a stage submitted to NDIF without waiting, its job file, and fetching its results into place later.

`NDIF(wait=False)` runs a stage up to its request: `Executor.run` then writes a small JSON job file
(`<jobs dir>/<job id>.json`: the stage's name, its plan as JSON, host and model) and raises `JobSubmitted` whose
`job` is a `Job` handle. `job.status()` polls the server; `job.fetch()` (`fv-remote jobs fetch ID`) replays the
stage's own `commit` on the job's saved values, so a fetched job stores exactly what the blocking run would have,
then marks the job fetched (fetching twice is harmless). A job file read back needs the stage it names:
`fv_remote.stages.load_job(id)` looks it up in the stage registry.

The jobs dir is FV_REMOTE_JOBS, else `<fv-remote cache>/jobs` (FV_REMOTE_CACHE or ~/.cache/fv-remote).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fv_remote.core.errors import UserError
from fv_remote.execution.backend import JobSubmitted
from fv_remote.execution.config import host
from fv_remote.execution.polling import PollResult, poll_job
from fv_remote.execution.stage import Stage, plan_from_json, plan_to_json

_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


def jobs_dir() -> Path:
    env = os.environ.get("FV_REMOTE_JOBS")
    if env:
        return Path(env).expanduser()
    from fv_remote.models.loading import cache_root

    return cache_root() / "jobs"


def _path(job_id: str) -> Path:
    if not _ID.match(job_id or ""):
        raise UserError(f"{job_id!r} is not a job id")
    return jobs_dir() / f"{job_id}.json"


def _write(path: Path, data: dict[str, Any]) -> Path:
    """Via a temporary file (not *.json: `list_jobs` never reads half a job file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".tmp").write_text(json.dumps(data, indent=2))
    return path.with_suffix(".tmp").replace(path)


def load_job(job_id: str) -> dict[str, Any]:
    path = _path(job_id)
    if not path.is_file():
        known = sorted(p.stem for p in jobs_dir().glob("*.json")) if jobs_dir().is_dir() else []
        hint = f"; known jobs: {', '.join(known[-5:])}" if known else ""
        raise UserError(f"no job file for {job_id} in {jobs_dir()} (submitted from another machine or with another "
                        f"FV_REMOTE_JOBS?){hint}")
    data = _read(path)
    if data is None:
        raise UserError(f"job file {path} is not valid JSON")
    return data


def _read(path: Path) -> dict[str, Any] | None:
    """A job file's content (None: unreadable or not JSON). JSON that is not a job (edited, another tool's) is named
    here rather than failing later as a traceback."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("plan", {}), dict) or \
            not isinstance(data.get("job_id"), str):
        raise UserError(f"job file {path} is not an fv-remote job (a JSON object with the job's details); move it "
                        "out of the jobs folder")
    return data


def list_jobs() -> list[dict[str, Any]]:
    folder = jobs_dir()
    if not folder.is_dir():
        return []
    jobs = [job for path in sorted(folder.glob("*.json")) if (job := _read(path)) is not None]
    return sorted(jobs, key=lambda j: str(j.get("submitted", "")))


def _poll(job: dict[str, Any]) -> PollResult:
    """Poll the host the job went to (recorded at submission), with the current API key."""
    return poll_job(job["job_id"], compress=bool(job.get("compress", True)), model_key=job.get("model_key", ""),
                    at=job.get("host") or None)


def job_status(job_id: str) -> tuple[dict[str, Any], str]:
    """(job file, current server status); a job already fetched reports FETCHED without asking the server. Polling
    needs no stage, so any job file (of this version or another) can be asked about."""
    data = load_job(job_id)
    return data, "FETCHED" if data.get("state") == "fetched" else _poll(data).status


Reporter = Callable[[dict[str, Any], Any], None]
REPORTERS: dict[str, Reporter] = {}  # stage name -> what the CLI prints after a fetch (the library prints nothing)


def register_reporter(stage: str, reporter: Reporter) -> None:
    """Show a fetched `stage` job's result (tables on a terminal) after it is stored; the CLI registers these."""
    REPORTERS[stage] = reporter


class Job:
    """A submitted stage: its job file, its status on the server, and `fetch` (the stage's own commit)."""

    def __init__(self, stage: Stage, plan: Any, data: dict[str, Any]):
        self.stage, self.plan, self.data = stage, plan, data

    @property
    def id(self) -> str:
        return str(self.data["job_id"])

    @property
    def path(self) -> Path:
        return _path(self.id)

    @classmethod
    def create(cls, stage: Stage, plan: Any, submitted: JobSubmitted, model: str = "") -> Job:
        """The handle of a just-submitted stage, its job file written."""
        if not stage.can_submit:
            raise UserError(f"the {stage.name} stage cannot be fetched later; run it without --no-wait")
        record = submitted.record
        data = {
            "job_id": record.job_id, "host": record.host or host(), "model": model, "model_key": submitted.model_key,
            "compress": submitted.compress, "payload_bytes": record.payload_bytes,
            "submitted": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "state": "submitted", "stage": stage.name, "plan": plan_to_json(plan), "report": {},
        }
        job = cls(stage, plan, data)
        job._save()
        return job

    @classmethod
    def load(cls, job_id: str, stages: dict[str, Stage]) -> Job:
        """A job file read back; `stages` is the registry (`fv_remote.stages.STAGES`) its stage name is looked up in."""
        data = load_job(job_id)
        stage = stages.get(str(data.get("stage", "")))
        if stage is None or not isinstance(data.get("plan"), dict):
            raise UserError(f"job {job_id} is a {data.get('stage')!r} job written by another version of fv-remote, "
                            "which this version cannot store; fetch it with that version or run the stage again")
        try:
            plan: Any = plan_from_json(stage.plan_type, data["plan"])
        except (TypeError, ValueError, KeyError) as exc:
            raise UserError(f"job file {_path(job_id)} has a damaged {stage.name} plan ({exc})") from None
        return cls(stage, plan, data)

    def note(self, **report: Any) -> None:
        """Keep what the CLI needs to print the same tables after `jobs fetch` (never needed by the commit)."""
        self.data["report"] = {**self.data.get("report", {}), **report}
        self._save()

    def status(self) -> str:
        """The server's status (QUEUED, RUNNING, COMPLETED, ERROR, ...); FETCHED once stored, without asking."""
        if self.data.get("state") == "fetched":
            return "FETCHED"
        return _poll(self.data).status

    def fetch(self, progress: Any = None) -> tuple[str, str]:
        """Poll; when COMPLETED store the results with the stage's commit. Returns (status, message)."""
        if self.data.get("state") == "fetched":
            return "FETCHED", f"job {self.id} was already fetched ({self.data.get('message', '')})"
        polled = _poll(self.data)
        if polled.status != "COMPLETED":
            return polled.status, f"job {self.id} ({self.stage.name}) is {polled.status}; fetch it again later"
        result = self.stage.commit(self.plan, self.stage.outputs_from_saved(self.plan, polled.result or {}), progress)
        message = self.stage.summary(self.plan, result)
        reporter = REPORTERS.get(self.stage.name)
        if reporter is not None:
            reporter(self.data.get("report", {}), result)
        self.data.update(state="fetched", result_bytes=polled.result_bytes, message=message,
                         fetched=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        self._save()
        return "COMPLETED", message

    def _save(self) -> None:
        _write(self.path, self.data)
