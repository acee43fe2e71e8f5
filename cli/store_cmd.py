"""`fv-remote store info`: what an activation store holds."""

from __future__ import annotations

import typer
from rich.table import Table

from fv_remote.cli.app import app
from fv_remote.cli.common import out
from fv_remote.store import ActivationStore, summary_json

store_app = typer.Typer(help="Inspect activation stores.", no_args_is_help=True)
app.add_typer(store_app, name="store")

SHOWN_ATTRS = ("model", "family", "task", "n_shots", "seed", "positions", "library_version", "created", "command")


@store_app.command("info")
def info(path: str = typer.Argument(..., help="store path or fsspec URL"),
         as_json: bool = typer.Option(False, "--json", help="print the full summary as JSON")) -> None:
    """Tasks, variables with their dims and shapes, and provenance of each group."""
    store = ActivationStore(path)
    if as_json:
        out.print_json(summary_json(store))
        return
    summary = store.summary()
    out.print(f"[bold]{path}[/]  tasks: {', '.join(summary['tasks']) or 'none'}")
    for task, entry in summary["tasks"].items():
        table = Table("variable", "dims", "shape", "dtype", title=f"{task}: {entry['n_complete']} prompts")
        for name, var in entry["variables"].items():
            table.add_row(name, ", ".join(var["dims"]), " x ".join(map(str, var["shape"])), var["dtype"])
        out.print(table)
        for key in SHOWN_ATTRS:
            if key in entry["attrs"]:
                out.print(f"  {key}: {entry['attrs'][key]}")
