"""`fv-remote data`: see the bundled relation tasks and the prompts built from them."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from fv_remote.cli.root import app
from fv_remote.data import build_prompts, list_tasks, load_task
from fv_remote.core.errors import require_positive
from fv_remote.models.loading import DEFAULT_MODEL

data_app = typer.Typer(
    help="Relation datasets: list the bundled tasks, show pairs and example prompts.", no_args_is_help=True
)
app.add_typer(data_app, name="data")

console = Console()


def _local_tokenizer(model: str):
    """The tokenizer of a cached short name or a local model folder (no download, no weights); None otherwise."""
    import os

    from fv_remote.models.loading import RELEASES, is_cached, model_dir

    if model in RELEASES:
        if not is_cached(model):
            return None
        folder = str(model_dir(model))
    elif os.path.isdir(os.path.expanduser(model)):
        folder = os.path.expanduser(model)
    else:
        return None
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception:  # noqa: BLE001 - a tokenizer we cannot read just means "not checked"
        return None


def usability(tokenizer, task, min_pairs: int = 12) -> str:
    """Whether a task works on a tokenizer: its answers need a first token that is not whitespace (accuracy is
    top-1 of that token), and enough such pairs for 10-shot prompts."""
    from fv_remote.data import resolve_answers

    kept, _, problems = resolve_answers(tokenizer, task.pairs)
    if len(kept) < min_pairs:
        return f"no: {len(kept)}/{len(task.pairs)} answers have a usable first token"
    if problems:
        return f"yes ({len(problems)} pair{'s' if len(problems) > 1 else ''} skipped)"
    return "yes"


@data_app.command("list")
def list_cmd(model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="check usability with this model's "
                                       "tokenizer (a cached short name or a local folder; nothing is downloaded)")
             ) -> None:
    """List the bundled tasks and whether each is usable on the model (default: the default model)."""
    tokenizer = _local_tokenizer(model)
    table = Table(title="bundled relation tasks", title_justify="left")
    usable_col = f"usable on {model}"
    for column in ("name", "category", "#pairs", usable_col, "description"):
        table.add_column(column, justify="right" if column == "#pairs" else "left")
    names = list_tasks()
    unusable = []
    for name in names:
        task = load_task(name)
        verdict = usability(tokenizer, task) if tokenizer is not None else "?"
        if verdict.startswith("no"):
            unusable.append(name)
        table.add_row(Text(task.name), Text(task.category), str(len(task.pairs)),
                      Text(verdict, style="red" if verdict.startswith("no") else ""), Text(task.description))
    console.print(table)
    if not names:
        console.print("no bundled tasks found")
    if tokenizer is None:
        console.print(f"usability not checked: {model} is not cached locally (`fv-remote models pull {model}`)")
    elif unusable:
        console.print(Text(f"{len(unusable)} relation(s) unusable on {model}: {', '.join(unusable)} (their answers "
                           "begin with a bare space token, e.g. ' 0' -> ' ', '0'); `bank build` skips them"))


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
