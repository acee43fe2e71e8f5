"""The root Typer app `fv-remote`. Command modules attach themselves to it; `cli.app` imports them and runs it
(kept apart so that the command modules and `cli.app` do not import each other)."""

import typer

app = typer.Typer(
    name="fv-remote",
    help="Function vectors in language models: trace heads, rank them, build and steer with FVs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
