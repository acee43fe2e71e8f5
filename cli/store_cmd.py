"""`fv-remote store info | verify | repair`: what an activation store holds, whether it is intact, mending it."""

from __future__ import annotations

import json

import typer
from rich.markup import escape
from rich.table import Table

from fv_remote.cli.root import app
from fv_remote.cli.common import console, out
from fv_remote.core.errors import UserError
from fv_remote.store.activations import ActivationStore
from fv_remote.store.kind import require_store

store_app = typer.Typer(help="Inspect, verify and repair activation stores.", no_args_is_help=True)
app.add_typer(store_app, name="store")

SHOWN_ATTRS = ("model", "family", "task", "n_shots", "seed", "positions", "library_version", "created", "command")


def _quick_problems(path: str) -> list:
    """Damage visible without reading the data: metadata, commit state, missing chunks."""
    from fv_remote.store.integrity import scan

    return scan(path, full=False).damage


@store_app.command("info")
def info(path: str = typer.Argument(..., help="store path or fsspec URL"),
         as_json: bool = typer.Option(False, "--json", help="print the full summary as JSON")) -> None:
    """Tasks, variables with their dims and shapes, and provenance of each group (damage is flagged)."""
    require_store(path)
    store = ActivationStore(path)
    store._root()  # a missing store, a plain file or a damaged root: one error line
    problems = _quick_problems(path)
    summary = store.summary()
    if as_json:
        summary["problems"] = [p.line() for p in problems]
        out.print_json(json.dumps(summary, default=str))
    else:
        out.print(f"[bold]{escape(path)}[/]  tasks: {escape(', '.join(summary['tasks'])) or 'none'}")
        identity = summary.get("identity") or {}
        if identity:
            out.print("  store identity: " + escape(", ".join(f"{k}={v}" for k, v in identity.items())))
        for task, entry in summary["tasks"].items():
            if "error" in entry:
                out.print(f"[red]{escape(task)}: unreadable[/]")
                continue
            table = Table("variable", "dims", "shape", "dtype", title=f"{task}: {entry['n_complete']} prompts")
            for name, var in entry["variables"].items():
                table.add_row(name, ", ".join(var["dims"]), " x ".join(map(str, var["shape"])), var["dtype"])
            out.print(table)
            for key in SHOWN_ATTRS:
                if key in entry["attrs"]:
                    out.print(f"  {key}: {escape(str(entry['attrs'][key]))}")
    for p in problems:
        console.print(f"[yellow]{escape(p.line())}[/]", soft_wrap=True)
    damage = [p for p in problems if p.kind != "uncommitted"]  # rows past the commit point: readers ignore them
    if damage:
        raise UserError(f"store {path} is damaged: {len(damage)} problem(s) (listed above); `fv-remote store "
                        f"repair {path}` mends it")


@store_app.command("verify")
def verify(path: str = typer.Argument(..., help="store path or fsspec URL"),
           as_json: bool = typer.Option(False, "--json", help="print the problems as JSON")) -> None:
    """Check everything: metadata, commit points, every chunk (present and decodable), NaN/inf, identity.

    Exit 0 when intact, 2 when damaged (each problem names the task and the prompt range)."""
    from fv_remote.store.integrity import scan

    require_store(path)
    result = scan(path, full=True)
    n_groups = len(result.groups)
    if as_json:
        out.print_json(json.dumps({"url": path, "groups": sorted(result.groups), "ok": not result.damage,
                                   "problems": [{"group": p.group, "kind": p.kind, "message": p.message,
                                                 "prompts": list(p.rows) if p.rows else None, "damage": p.fatal}
                                                for p in result.problems]}))
    else:
        for p in result.problems:
            style = "red" if p.fatal else "yellow"
            out.print(f"[{style}]{escape(p.line())}[/]", soft_wrap=True)
    if result.damage:
        raise UserError(f"store {path}: {len(result.damage)} problem(s) in {n_groups} group(s); `fv-remote store "
                        f"repair {path}` drops what is past the commit point or damaged and keeps the rest")
    if not as_json:
        out.print(f"{escape(path)}: intact ({n_groups} group(s), "
                  + ", ".join(f"{g} {s.n}" for g, s in sorted(result.groups.items())) + " prompts)")


@store_app.command("repair")
def repair(path: str = typer.Argument(..., help="store path or fsspec URL")) -> None:
    """Restore damaged metadata from the backup, drop rows past the commit point and damaged prompts (from the
    first damaged one on: a rerun of the stage redoes them), remove debris. Says what it dropped."""
    from fv_remote.store.integrity import repair as run_repair

    require_store(path)  # before the writer lock, which would create the folder
    store = ActivationStore(path)
    report = run_repair(store)
    for action in report.actions:
        out.print(escape(action), soft_wrap=True)
    if report.remaining:
        for p in report.remaining:
            console.print(f"[red]{escape(p.line())}[/]", soft_wrap=True)
        raise UserError(f"store {path}: {len(report.remaining)} problem(s) left that repair cannot fix (listed "
                        "above); move the task to another store or delete its group")
    out.print(f"{escape(path)}: " + ("nothing to repair; intact" if not report.actions else "repaired; intact now"))
