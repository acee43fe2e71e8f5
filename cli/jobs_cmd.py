"""`fv-remote jobs ...`: follow NDIF jobs submitted with --no-wait and store their results."""

from __future__ import annotations

import typer
from rich.table import Table

from fv_remote.cli.root import app
from fv_remote.cli.common import out

jobs_app = typer.Typer(help="NDIF jobs submitted with --no-wait: status, fetch, list.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")


@jobs_app.command("status")
def status(job_id: str = typer.Argument(..., help="the id `--no-wait` printed")) -> None:
    """The job's state on NDIF (RECEIVED, QUEUED, RUNNING, COMPLETED) or FETCHED once stored."""
    from fv_remote.execution.jobs import job_status

    job, state = job_status(job_id)
    out.print(f"job {job_id} ({job.get('stage')}, {job.get('model', '')}): {state}")
    if state == "COMPLETED":
        out.print(f"store the results: fv-remote jobs fetch {job_id}")


@jobs_app.command("fetch")
def fetch(job_id: str = typer.Argument(..., help="the id `--no-wait` printed"),
          wait: bool = typer.Option(False, "--wait", help="poll until the job finishes instead of returning"),
          interval: float = typer.Option(5.0, help="seconds between polls with --wait")) -> None:
    """Store a finished job's results exactly as the blocking stage would have (exit 1 if not finished yet)."""
    import time

    from fv_remote.stages import fetch_job

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
    from fv_remote.execution.jobs import jobs_dir
    from fv_remote.execution.jobs import list_jobs as all_jobs

    jobs = all_jobs()
    if not jobs:
        out.print(f"no jobs in {jobs_dir()}")
        return
    table = Table("job id", "stage", "model", "submitted", "state")
    for job in jobs:
        table.add_row(*[str(v) for v in (job["job_id"], job.get("stage", ""), job.get("model", ""),
                                          job.get("submitted", ""), job.get("state", ""))])
    out.print(table)
