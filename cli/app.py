"""The `fv-remote` command: a root Typer app with one sub-app per stage."""

from __future__ import annotations

import sys

import typer

from fv_remote.errors import UserError

app = typer.Typer(
    name="fv-remote",
    help="Function vectors in language models: trace heads, rank them, build and steer with FVs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _register() -> None:
    # Sub-commands live in their own modules; importing them attaches them to `app`.
    from fv_remote.cli import data_cmd, extract_cmd, models_cmd, pipeline_cmd, store_cmd  # noqa: F401
    from fv_remote.cli import remote_cmd  # noqa: F401
    from fv_remote.cli import jobs_cmd  # noqa: F401
    from fv_remote.cli import graft_cmd  # noqa: F401
    from fv_remote.cli import relational_cmd  # noqa: F401


def main() -> None:
    _register()
    try:
        app()
    except UserError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(2)
