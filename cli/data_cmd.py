"""`fv-remote data`: see the bundled relation tasks and the prompts built from them."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from fv_remote.cli.app import app
from fv_remote.data import build_prompts, list_tasks, load_task
from fv_remote.errors import require_positive

data_app = typer.Typer(
    help="Relation datasets: list the bundled tasks, show pairs and example prompts.", no_args_is_help=True
)
app.add_typer(data_app, name="data")

console = Console()


@data_app.command("list")
def list_cmd() -> None:
    """List the bundled tasks."""
    table = Table(title="bundled relation tasks", title_justify="left")
    for column in ("name", "category", "#pairs", "description"):
        table.add_column(column, justify="right" if column == "#pairs" else "left")
    names = list_tasks()
    for name in names:
        task = load_task(name)
        table.add_row(Text(task.name), Text(task.category), str(len(task.pairs)), Text(task.description))
    console.print(table)
    if not names:
        console.print("no bundled tasks found")


@data_app.command("show")
def show_cmd(
    task: str = typer.Argument(..., help="bundled task name, a task name in --data-dir, or a path to a .json file"),
    n: int = typer.Option(10, "--n", help="how many pairs to show"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="folder of NAME.json task files (Todd format)"),
    prompt_kind: str = typer.Option("clean", "--prompt-kind", help="clean, shuffled or zero_shot"),
    n_shots: int = typer.Option(3, "--n-shots", help="demonstrations in the example prompt"),
    seed: int = typer.Option(0, "--seed", help="seed for the example prompt"),
) -> None:
    """Show a task's first pairs and one example prompt."""
    require_positive("--n", n)
    loaded = load_task(task, data_dir=data_dir)
    prompt = build_prompts(loaded.pairs, 1, n_shots=n_shots, kind=prompt_kind, seed=seed)[0]

    title = f"{loaded.name} ({loaded.category}, {len(loaded.pairs)} pairs)"
    caption = Text(loaded.description) if loaded.description else None
    table = Table(title=Text(title), title_justify="left", caption=caption)
    table.add_column("x")
    table.add_column("y")
    for x, y in loaded.pairs[:n]:
        table.add_row(Text(x), Text(y))
    console.print(table)
    # Text(...) keeps words like "[name - occupation]" from being read as rich markup.
    console.print(Panel(Text(prompt.text), title=f"{prompt_kind} prompt, {len(prompt.demos)} demonstrations"))
    console.print(Text(f"expected answer: {prompt.answer!r}"))
