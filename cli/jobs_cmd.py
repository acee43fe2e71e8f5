"""`fv-remote jobs ...`: follow NDIF jobs submitted with --no-wait and store their results."""

from __future__ import annotations

import typer
from rich.table import Table

from fv_remote.cli.app import app
from fv_remote.cli.common import out

jobs_app = typer.Typer(help="NDIF jobs submitted with --no-wait: status, fetch, list.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")


def submitted(job, settings: dict) -> None:
    """After a --no-wait submission: write the job file (with the CLI `settings` its fetch needs), print the id."""
    from fv_remote.cli.common import console
    from fv_remote.jobs import save_job

    path = save_job(job, settings)
    job_id = job.record.job_id
    console.print(f"submitted to NDIF ({job.record.payload_bytes:,} bytes); job file {path}")
    out.print(f"job {job_id}")
    out.print(f"check: fv-remote jobs status {job_id}; get the results: fv-remote jobs fetch {job_id}")


def _finish_evaluate(job: dict, saved: dict, progress=None) -> str:
    """An `evaluate --no-wait` job: the same table, sweep plot and JSON as the blocking command."""
    from fv_remote.cli.pipeline_cmd import report_evaluation
    from fv_remote.evaluate import scores_from_job

    scores, curve = scores_from_job(saved, job["details"])
    report_evaluation(job["settings"], scores, curve)
    return (f"{scores.task}: zero-shot {scores.zero_shot:.2f} -> {scores.zero_shot_fv:.2f} with the "
            f"{job['settings']['kind'].upper()} at layer {scores.layer} ({scores.n_test} test pairs)")


def _finish_cma(job: dict, saved: dict, progress=None) -> str:
    """A `cma --no-wait` job: the AIE into the store's TASK/cma group, the top-heads table and the heatmap."""
    from fv_remote.cli.pipeline_cmd import report_cma
    from fv_remote.cma import store_remote_cma
    from fv_remote.store import ActivationStore

    details = job["details"]
    result = store_remote_cma(ActivationStore(details["store"]), saved, details, progress)
    report_cma(job["settings"], result)
    return f"{result.task}: {result.n_prompts} corrupted prompts ({result.n_new} new) in {details['store']}"


def _finish_finetune(job: dict, saved: dict, progress=None) -> str:
    """A `finetune --no-wait` job: the FFV file and loss curve as the blocking command; the evaluation it would
    have run next is printed as a command instead."""
    from pathlib import Path

    from fv_remote.cli.relational_cmd import report_finetune
    from fv_remote.ffv_session import ffv_run_from_job

    settings = job["settings"]
    run = ffv_run_from_job(saved, job["details"])
    report_finetune(run, settings["task"], settings["init"], Path(settings["out"]), Path(settings["plot"]))
    message = f"{settings['task']}: FFV at layer {run.result.ffv.layer} saved to {settings['out']}"
    if settings.get("evaluate"):
        message += f"\nevaluate it: {settings['evaluate']}"
    return message


def _register_finishers() -> None:
    from fv_remote.jobs import FINISHERS

    FINISHERS.setdefault("evaluate", _finish_evaluate)
    FINISHERS.setdefault("cma", _finish_cma)
    FINISHERS.setdefault("finetune", _finish_finetune)


_register_finishers()


def _check_job_files(job_id: str | None = None) -> None:
    """A job file that parses but is not a job object (edited, or another tool's JSON) is named, not a traceback
    deep in `fv_remote.jobs`."""
    import json

    from fv_remote.errors import UserError
    from fv_remote.jobs import jobs_dir

    folder = jobs_dir()
    paths = [folder / f"{job_id}.json"] if job_id else (sorted(folder.glob("*.json")) if folder.is_dir() else [])
    for path in paths:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # missing or not JSON: `fv_remote.jobs` says so itself
        if not isinstance(data, dict) or not isinstance(data.get("settings", {}), dict) or \
                not isinstance(data.get("job_id"), str):
            raise UserError(f"job file {path} is not an fv-remote job (a JSON object with the job's details); move "
                            "it out of the jobs folder")


@jobs_app.command("status")
def status(job_id: str = typer.Argument(..., help="the id `--no-wait` printed")) -> None:
    """The job's state on NDIF (RECEIVED, QUEUED, RUNNING, COMPLETED) or FETCHED once stored."""
    from fv_remote.jobs import job_status

    _check_job_files(job_id)
    job, state = job_status(job_id)
    out.print(f"job {job_id} ({job['stage']}, {job['settings'].get('model', '')}): {state}")
    if state == "COMPLETED":
        out.print(f"store the results: fv-remote jobs fetch {job_id}")


@jobs_app.command("fetch")
def fetch(job_id: str = typer.Argument(..., help="the id `--no-wait` printed"),
          wait: bool = typer.Option(False, "--wait", help="poll until the job finishes instead of returning"),
          interval: float = typer.Option(5.0, help="seconds between polls with --wait")) -> None:
    """Store a finished job's results exactly as the blocking stage would have (exit 1 if not finished yet)."""
    import time

    from fv_remote.jobs import fetch_job

    _check_job_files(job_id)
    while True:
        state, message = fetch_job(job_id)
        if state in ("COMPLETED", "FETCHED") or not wait:
            break
        time.sleep(max(interval, 0.1))
    out.print(message, soft_wrap=True)  # no wrapping: a printed command stays one line
    if state not in ("COMPLETED", "FETCHED"):
        raise typer.Exit(1)


@jobs_app.command("list")
def list_jobs() -> None:
    """Jobs submitted from this machine (job files in FV_REMOTE_JOBS or the fv-remote cache)."""
    from fv_remote.jobs import jobs_dir, list_jobs as all_jobs

    _check_job_files()
    jobs = all_jobs()
    if not jobs:
        out.print(f"no jobs in {jobs_dir()}")
        return
    table = Table("job id", "stage", "model", "submitted", "state")
    for job in jobs:
        table.add_row(*[str(v) for v in (job["job_id"], job.get("stage", ""), job.get("settings", {}).get("model", ""),
                                          job.get("submitted", ""), job.get("state", ""))])
    out.print(table)
