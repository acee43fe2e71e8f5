"""`fv-remote models ...`: list, pull and describe models."""

from __future__ import annotations

import typer
from rich.markup import escape
from rich.table import Table

from fv_remote import models as M
from fv_remote.cli.app import app
from fv_remote.cli.common import console, offline_if_local, out

models_app = typer.Typer(help="List, fetch and describe models.", no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("list")
def list_models() -> None:
    """Short model names that work offline, and whether each is cached."""
    table = Table("name", "cached", "original", "description")
    for name, rel in M.RELEASES.items():
        table.add_row(name + (" (default)" if name == M.DEFAULT_MODEL else ""),
                      "yes" if M.is_cached(name) else "no", rel.hub_repo, rel.description)
    out.print(table)
    out.print(f"cache: {M.cache_root()}  (set FV_REMOTE_CACHE to move it). "
              "Any Hugging Face repo id, local folder or .gguf file also works.")


@models_app.command("pull")
def pull(name: str = typer.Argument(M.DEFAULT_MODEL, help="short model name"),
         force: bool = typer.Option(False, help="download and dequantise again")) -> None:
    """Download, verify and cache a short-named model (idempotent)."""
    if M.is_cached(name) and not force:
        out.print(f"{name}: already cached at {M.model_dir(name)}")
        return
    path = M.pull(name, force=force, progress=lambda msg: console.print(f"[dim]{name}: {msg}[/]"))
    out.print(f"{name}: cached at {path}")


@models_app.command("info")
def info(name: str = typer.Argument(M.DEFAULT_MODEL, help="short name, repo id, folder or .gguf")) -> None:
    """Layers, heads, head_dim, d_model, vocabulary, family and cache location."""
    offline_if_local(name)
    table = Table("property", "value")
    for key, value in M.describe(name).items():
        table.add_row(key, escape(str(value)))  # paths like layers[i] are not rich markup
    out.print(table)
