"""`fv-remote remote ...`: NDIF service status and client/server version check."""

from __future__ import annotations

import typer
from rich.table import Table

from fv_remote.cli.root import app
from fv_remote.cli.common import out

remote_app = typer.Typer(help="NDIF (remote execution): hosted models and version check.", no_args_is_help=True)
app.add_typer(remote_app, name="remote")


@remote_app.command("status")
def status(model: str = typer.Option(None, "--model", "-m", help="repo id to check (e.g. meta-llama/Llama-3.1-70B)"),
           revision: str = typer.Option(None, help="revision of --model (default: any)")) -> None:
    """Models NDIF hosts right now, and whether --model is running."""
    from fv_remote import execution as remote

    state = remote.status()
    table = Table("repo id", "revision", "task", "level", "state")
    for entry in state.models:
        table.add_row(entry["repo_id"], entry["revision"], entry["task"], entry["level"], entry["state"])
    out.print(f"NDIF at {state.host}: {len(state.models)} hosted model(s)")
    if state.models:
        out.print(table)
    for entry in state.models:
        if entry.get("note"):
            out.print(f"{entry['repo_id']}: {entry['note']}", soft_wrap=True)
    if model:
        running = state.running(model, revision)
        out.print(f"{model}: {'running' if running else 'not running'}")
        if not running:
            raise typer.Exit(1)


@remote_app.command("check")
def check() -> None:
    """Compare this client's nnsight/torch/transformers versions with the NDIF server's."""
    from fv_remote import execution as remote
    from fv_remote.core.errors import UserError

    result = remote.check()
    table = Table("package", "client", "server")
    for name, (local, server) in sorted(result.packages.items()):
        table.add_row(name, str(local), str(server))
    table.add_row("python", result.python[0], result.python[1])
    out.print(f"NDIF at {result.host}")
    out.print(table)
    out.print(f"API key: {'set' if result.api_key_set else 'not set (NDIF_API_KEY or `nnsight login`)'}")
    if not result.ok:
        raise UserError(result.message)
    out.print(f"ok: {result.message}")
