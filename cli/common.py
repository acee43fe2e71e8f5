"""Shared CLI pieces: console, progress bars, offline defaults."""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console

from fv_remote.core.checks import MAX_BOOT, MAX_STEPS, json_text, require_count, require_finite_option, write_output
from fv_remote.core.errors import UserError

if TYPE_CHECKING:
    from fv_remote.execution import Executor
    from fv_remote.models.placement import Placement
    from fv_remote.models.loading import LoadedModel

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# Piped output (CI logs, files) gets a wide fixed width so result tables are not truncated.
# emoji=False: word pairs such as "dublin:ireland:" must not turn into flags.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 140, emoji=False)
out = Console(width=None if sys.stdout.isatty() else 140, emoji=False)


def offline_if_local(model: str) -> None:
    """A Hub lookup here hangs instead of failing fast; short names and local paths never need the Hub."""
    if "/" not in model or os.path.exists(os.path.expanduser(model)):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bars are enough on the terminal


_PLACEMENT: dict[str, Placement] = {}


def set_placement(device: str | None = None, dtype: str | None = None, device_map: str | None = None,
                  offload_folder: str | None = None) -> Placement:
    """The app-level `--device/--dtype/--device-map/--offload-folder` options (cli/app.py's callback), over the
    FV_REMOTE_DEVICE/_DTYPE/_DEVICE_MAP/_OFFLOAD environment variables: checked here, before any command runs."""
    from fv_remote.models.placement import Placement as _Placement

    chosen = _Placement.from_env(device=device, dtype=dtype, device_map=device_map, offload_folder=offload_folder)
    _PLACEMENT["current"] = chosen
    return chosen


def placement() -> Placement:
    """Where local commands load models (set once per invocation by the app's options)."""
    from fv_remote.models.placement import Placement as _Placement

    return _PLACEMENT.get("current") or _Placement.from_env()


def executor(remote: bool, no_wait: bool = False) -> Executor:
    """The executor a command's `--remote` / `--no-wait` flags name: the one place the CLI interprets them. A local
    one carries the app's placement (`fv-remote --device cuda --dtype bfloat16 CMD ...`)."""
    from fv_remote.execution import NDIF, Local

    if no_wait and not remote:
        from fv_remote.core.errors import UserError

        raise UserError("--no-wait needs --remote (only NDIF jobs can be fetched later)")
    return NDIF(wait=not no_wait) if remote else Local(placement=placement())


def load_stage(model: str, ex: Executor) -> LoadedModel:
    """The model a command runs on: local (offline when it can be) or, with --remote, NDIF's weightless copy."""
    if not ex.ndif:
        offline_if_local(model)
    return ex.load_model(model)


@contextmanager
def submits(report: dict):
    """Around a stage run: with --no-wait the stage's job file is written by the executor; here it gets the `report`
    the CLI prints the same tables from after `jobs fetch`, the job id is printed and the command ends there."""
    from fv_remote.execution import JobSubmitted

    try:
        yield
    except JobSubmitted as submitted:
        submitted.job.note(**report)
        show_submitted(submitted)
        raise typer.Exit(0) from None


def show_submitted(submitted) -> None:
    """After a --no-wait submission (its job file written): the file, the id and what to run next."""
    job, path = submitted, submitted.job.path
    job_id = job.record.job_id
    console.print(f"submitted to NDIF ({job.record.payload_bytes:,} bytes); job file {path}")
    out.print(f"job {job_id}")
    out.print(f"check: fv-remote jobs status {job_id}; get the results: fv-remote jobs fetch {job_id}")



@contextmanager
def progress_bar(description: str, total: int | None):
    """Yields an `update(done, total)` callback that drives a rich progress bar on stderr (`total` None: not known
    until the first update).

    Without a terminal (CI logs, pipes) a live bar shows nothing until the end, so print a line per ~10% instead.
    """
    if not console.is_terminal:
        state = {"shown": -1, "start": time.monotonic()}

        def update_plain(done: int, total_: int) -> None:
            step = done * 10 // max(total_, 1)
            if step != state["shown"] and (step > state["shown"]):
                state["shown"] = step
                console.print(f"{description}: {done}/{total_} ({time.monotonic() - state['start']:.0f} s)")

        yield update_plain
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task_id = bar.add_task(description, total=total)

        def update(done: int, total_: int) -> None:
            bar.update(task_id, completed=done, total=total_)

        yield update


# --- pieces shared by the relational commands (finetune, bank, decode, align, analogy) ---

DEFAULT_BANK = "out/bank.safetensors"

def _remote_opt(what: str):
    return typer.Option(False, "--remote", help=f"run on NDIF: {what} (--model is a Hub repo id; short names map "
                        "to their original repo)")


def _layer_option(text: Optional[str]):
    if text is None or text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise UserError(f"--layer takes a layer index or 'auto', got {text!r}") from None


def _write_json(data: dict, path: Path) -> None:
    """Atomically; a failed write puts the results in a fallback file and the error says where."""
    write_output(path, json_text(data))
    console.print(f"wrote {path}")


def _pct(x) -> str:
    return "—" if x is None else f"{x:.2f}"


ALLOW_UNCHANGED_HELP = ("keep a result equal to its starting vector (e.g. --init zero as a baseline on purpose); "
                       "without it such a run is refused and nothing is saved")


def _settings(steps, lr, l2, patience, batch_size, seed, allow_unchanged=False):
    from fv_remote.relational.ffv import FinetuneSettings

    require_finite_option("--lr", lr)
    require_finite_option("--l2", l2)
    require_count("--steps", steps, MAX_STEPS, "optimiser steps")
    require_count("--batch-size", batch_size, MAX_BOOT, "prompts per step")
    return FinetuneSettings(steps=steps, lr=lr, l2=l2, patience=patience, batch_size=batch_size, seed=seed,
                            allow_unchanged=allow_unchanged).check()


def load_vector(path: Path, loaded):
    """An FV/FFV file for this model, checked (model, width, finite); a note for an all-zero vector."""
    from fv_remote.core.checks import check_vector_fits, require_finite_vector
    from fv_remote.fv.vectors import FunctionVector

    fv = FunctionVector.load(path)
    fv.check_model(loaded)
    check_vector_fits(fv, loaded, path)
    require_finite_vector(fv, path)  # a NaN vector would steer into a table of nan
    from fv_remote.core.unchanged import zero_vector_note

    note = zero_vector_note(fv, path)
    if note:
        console.print(f"[yellow]note: {note}[/]", markup=True, soft_wrap=True)
    return fv
