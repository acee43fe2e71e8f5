"""Non-blocking remote stages: a job file per submitted request, and fetching its results into place later.

`fv-remote extract|cma|evaluate|finetune|bank build --remote --no-wait` submits the stage's one NDIF request and
writes a small JSON job file (`<jobs dir>/<job id>.json`: the stage, its settings, the batch layout, host and
model); `fv-remote jobs status ID` polls it and `fv-remote jobs fetch ID` stores the results exactly as the blocking
run would have (same code path: the store's commit points for extract and cma, plus cma's heatmap; the table, plot
and --json file for evaluate; the FFV file and loss curve for finetune, which prints the evaluate command instead of
evaluating; the bank file for bank build), then marks the job fetched. Fetching twice is harmless.

From Python: run the stage under `fv_remote.execution.no_wait()`, catch `JobSubmitted`, `save_job(job, settings)`, and
later `fetch_job(id)`; or poll yourself and rebuild the result with `extract.store_remote_extraction`,
`cma.store_remote_cma`, `ffv_session.ffv_run_from_job`, `bank.store_remote_bank` or `evaluate.scores_from_job`.

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
from fv_remote.execution import JobSubmitted, PollResult, host, poll_job, saved_result

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


def save_job(job: JobSubmitted, settings: dict[str, Any]) -> Path:
    """Write the job file of a submitted stage: its `details` (from the stage) plus `settings` (how to reload the
    model and data: model, task, data_dir, ...). Returns the path."""
    if not job.details.get("stage"):
        raise UserError("this stage cannot be fetched later: it did not describe its results")
    record = job.record
    data = {
        "job_id": record.job_id, "host": record.host or host(), "model_key": job.model_key,
        "compress": job.compress, "payload_bytes": record.payload_bytes,
        "submitted": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "state": "submitted", "stage": job.details["stage"], "settings": settings, "details": job.details,
    }
    return _write(_path(record.job_id or ""), data)


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
    if not isinstance(data, dict) or not isinstance(data.get("settings", {}), dict) or \
            not isinstance(data.get("job_id"), str):
        raise UserError(f"job file {path} is not an fv-remote job (a JSON object with the job's details); move it "
                        "out of the jobs folder")
    return data


def _update(job_id: str, **changes: Any) -> None:
    data = load_job(job_id)
    data.update(changes)
    _write(_path(job_id), data)


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
    """(job file, current server status). A job already fetched reports FETCHED without asking the server."""
    job = load_job(job_id)
    if job.get("state") == "fetched":
        return job, "FETCHED"
    return job, _poll(job).status


# -- committing: what each stage that can run without waiting stores, and who shows it -----------------------------

Commit = Callable[[dict[str, Any], dict[str, Any], Any], tuple[Any, str]]
Reporter = Callable[[dict[str, Any], Any], None]


def _commit_extract(job: dict[str, Any], saved: dict[str, Any], progress: Any = None) -> tuple[Any, str]:
    from fv_remote.data import load_task
    from fv_remote.execution import hosted
    from fv_remote.fv.extract import store_remote_extraction
    from fv_remote.store.activations import ActivationStore

    settings, details = job["settings"], job["details"]
    outs = saved_result(saved, details, "outs", f"job {job['job_id']}")
    task = load_task(settings["task"], data_dir=settings.get("data_dir"))
    model = hosted.load_remote_model(settings["model"], revision=settings.get("revision") or None)
    store = ActivationStore(details["store"])
    result = store_remote_extraction(model, task, store, outs, details, progress)
    return result, (f"{result.task}: {result.n_complete} prompts in {details['store']} ({result.n_new} new); "
                    f"{details['n_shots']}-shot accuracy {result.accuracy:.2f}")


def _commit_cma(job: dict[str, Any], saved: dict[str, Any], progress: Any = None) -> tuple[Any, str]:
    """The AIE into the store's TASK/cma group and, when the job names one, the heatmap."""
    from fv_remote.fv.cma import store_remote_cma
    from fv_remote.core.plots import cma_heatmap
    from fv_remote.store.activations import ActivationStore

    settings, details = job["settings"], job["details"]
    result = store_remote_cma(ActivationStore(details["store"]), saved, details, progress)
    message = f"{result.task}: {result.n_prompts} corrupted prompts ({result.n_new} new) in {details['store']}"
    if settings.get("plot"):
        message += f"; heatmap: {cma_heatmap(result, settings['plot'], settings.get('model', ''))}"
    return result, message


def _commit_finetune(job: dict[str, Any], saved: dict[str, Any], progress: Any = None) -> tuple[Any, str]:
    """The FFV file and loss curve as the blocking `finetune`; the evaluation it would have run next is a command."""
    from fv_remote.relational.ffv import save_run
    from fv_remote.relational.ffv_session import ffv_run_from_job

    settings = job["settings"]
    run = ffv_run_from_job(saved, job["details"])
    if settings.get("out"):
        save_run(run, settings["out"], settings.get("plot"), settings.get("init", ""))
    message = f"{settings.get('task', run.result.ffv.task)}: FFV at layer {run.result.ffv.layer}" + \
        (f" saved to {settings['out']}" if settings.get("out") else "")
    if settings.get("evaluate"):
        message += f"\nevaluate it: {settings['evaluate']}"
    return run, message


def _commit_evaluate(job: dict[str, Any], saved: dict[str, Any], progress: Any = None) -> tuple[Any, str]:
    """The accuracies (and sweep) as the blocking `evaluate`, with its sweep plot and --json file when named."""
    from fv_remote.fv.evaluate import save_evaluation, scores_from_job

    settings = job["settings"]
    scores, curve = scores_from_job(saved, job["details"])
    written = save_evaluation(settings, scores, curve)
    kind = str(settings.get("kind", "fv")).upper()
    return (scores, curve), "\n".join(
        [f"{scores.task}: zero-shot {scores.zero_shot:.2f} -> {scores.zero_shot_fv:.2f} with the {kind} at layer "
         f"{scores.layer} ({scores.n_test} test pairs)", *written])


def _commit_bank(job: dict[str, Any], saved: dict[str, Any], progress: Any = None) -> tuple[Any, str]:
    from fv_remote.relational.bank import store_remote_bank

    details = job["details"]
    skipped: list[str] = []  # refused relations (diverged, never moved, their own start): said, not dropped silently

    def note(name: str, status: str) -> None:
        if status.startswith("skipped"):
            skipped.append(f"{name}: {status}")

    bank = store_remote_bank(saved, details, on_task=note, progress=progress)
    return bank, "\n".join([f"bank {details['path']}: {len(bank)} relations for {bank.model}", *skipped,
                            f"see `fv-remote bank info {details['path']}`"])


# Stage name (the job file's "stage") -> how its results are stored. Library code only: the CLI adds reporters.
COMMITS: dict[str, Commit] = {"extract": _commit_extract, "cma": _commit_cma, "finetune": _commit_finetune,
                              "evaluate": _commit_evaluate, "bank": _commit_bank}
REPORTERS: dict[str, Reporter] = {}


def register_reporter(stage: str, reporter: Reporter) -> None:
    """Show a fetched `stage` job's result (tables on a terminal) after it is stored; the CLI registers these."""
    if stage not in COMMITS:
        raise ValueError(f"no stage {stage!r} to report on (stages: {', '.join(COMMITS)})")
    REPORTERS[stage] = reporter


def fetch_job(job_id: str, progress: Any = None) -> tuple[str, str]:
    """Poll the job; when COMPLETED store its results as the blocking stage would. Returns (status, message)."""
    job = load_job(job_id)
    if job.get("state") == "fetched":
        return "FETCHED", f"job {job_id} was already fetched ({job.get('message', '')})"
    commit = COMMITS.get(job.get("stage", ""))
    if commit is None:
        raise UserError(f"job {job_id} is a {job.get('stage')!r} job, which this version cannot store")
    polled = _poll(job)
    if polled.status != "COMPLETED":
        return polled.status, f"job {job_id} ({job['stage']}) is {polled.status}; fetch it again later"
    result, message = commit(job, polled.result or {}, progress)
    reporter = REPORTERS.get(job["stage"])
    if reporter is not None:
        reporter(job, result)
    _update(job_id, state="fetched", result_bytes=polled.result_bytes, message=message,
            fetched=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    return "COMPLETED", message
