"""`fv-remote models ...`: list, pull and describe models."""

from __future__ import annotations

import typer
from rich.markup import escape
from rich.table import Table

from fv_remote.models import loading as M
from fv_remote.cli.root import app
from fv_remote.cli.common import console, offline_if_local, out, placement

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
    """Layers, heads, head_dim, d_model, vocabulary, family, where the post-attention norm is, cache location, and
    where each block lives with the memory it takes (`fv-remote --device cuda --dtype bfloat16 models info`)."""
    offline_if_local(name)
    table = Table("property", "value")
    described = M.describe(name, placement())
    blocks = described.pop("blocks")
    for key, value in described.items():
        table.add_row(key, escape(str(value)))  # paths like layers[i] are not rich markup
    out.print(table)
    where = Table("block", "device", "weights")
    for row in blocks:
        where.add_row(escape(row["block"]), row["device"], f"{row['bytes'] / 2**20:.1f} MiB")
    total = sum(row["bytes"] for row in blocks)
    where.add_row("total", "", f"{total / 2**20:.1f} MiB")
    out.print(where)


@models_app.command("families")
def families() -> None:
    """The supported architecture families: config model types, module paths, and the post-attention norm (the
    norm between the attention output and the residual add, which FVs are carried through)."""
    from fv_remote.models.adapters import SPECS

    table = Table("family", "model_type")
    table.add_column("per-head site (o_proj input)", no_wrap=True)
    table.add_column("post-attention norm", no_wrap=True)
    table.add_column("notes")
    for spec in SPECS:
        table.add_row(spec.family, "/".join(spec.model_types), escape(f"{spec.layers}[i].{spec.head_site}"),
                      escape(f"{spec.layers}[i].{spec.post_attn_norm}") if spec.post_attn_norm else "none",
                      spec.notes)
    out.print(table)
