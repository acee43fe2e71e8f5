"""`fv-remote decode`: vectors read through the final norm and unembedding (top tokens, relation words)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table
from rich.text import Text

from fv_remote.core.checks import (check_output_path, require_finite)
from fv_remote.cli.root import app
from fv_remote.cli.common import (_remote_opt, _write_json, executor, load_stage, out)
from fv_remote.core.errors import UserError, require_positive
from fv_remote.models.loading import DEFAULT_MODEL



@app.command()
def decode(
    vectors: list[str] = typer.Argument(..., help="vector files (.safetensors: FV or FFV), or BANK:RELATION"),
    words: Optional[str] = typer.Option(None, help="comma-separated relation words to rank, e.g. opposite,antonym "
                                                   "(default: the task's relation words when known)"),
    top_k: int = typer.Option(15, help="top tokens to list"),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m"),
    json_path: Optional[Path] = typer.Option(None, "--json"),
    remote: bool = _remote_opt("all vectors through the server's final norm and unembedding in one request"),
) -> None:
    """Project vectors through the final norm and unembedding: top tokens and relation-word ranks, side by side."""
    from fv_remote.relational.bank import RelationBank
    from fv_remote.data import load_task
    from fv_remote.relational.decode import decode_many
    from fv_remote.fv.vectors import FunctionVector

    require_positive("--top-k", top_k)
    check_output_path(json_path, "--json")
    ex = executor(remote)
    loaded = load_stage(model, ex)
    top_k = min(top_k, loaded.adapter.vocab_size)
    named = []
    for spec in vectors:
        path, _, relation = spec.partition(":") if ":" in spec and not Path(spec).exists() else (spec, "", "")
        if relation:
            bank = RelationBank.load(path)
            vec = bank.function_vector(relation)
        else:
            vec = FunctionVector.load(path)
        vec.check_model(loaded)
        require_finite(vec.vector, f"{spec}: the vector", "it decodes to nothing; fit or fine-tune it again")
        if vec.vector.numel() and not bool(vec.vector.any()):
            raise UserError(f"{spec}: the vector is all zeros (an FFV kept at its zero start?): every token ties, so "
                            "its top tokens would be an arbitrary order; decode a trained vector")
        named.append((f"{vec.kind.upper()} {vec.task} L{vec.layer}" if vec.task else Path(path).name, vec))
    word_list = [w.strip() for w in words.split(",") if w.strip()] if words else []
    if not word_list:
        for _, vec in named:
            try:
                word_list += [w for w in load_task(vec.task).relation_words if w not in word_list]
            except UserError:
                pass
    results = decode_many(loaded, [(name, vec.vector) for name, vec in named], word_list, top_k)
    table = Table(title="top tokens (final norm + unembedding)", title_justify="left")
    table.add_column("#", justify="right")
    for r in results:
        table.add_column(Text(r.name))
    for i in range(top_k):
        table.add_row(str(i + 1), *[Text(repr(r.top[i][0])) if i < len(r.top) else "" for r in results])
    out.print(table)
    if word_list:
        ranks = Table(title=f"rank of relation words among {loaded.adapter.vocab_size} tokens (1 = top)",
                      title_justify="left")
        ranks.add_column("word")
        for r in results:
            ranks.add_column(Text(r.name), justify="right")
        for w in word_list:
            ranks.add_row(Text(w), *[f"{r.ranks[w]} ({r.forms[w]!r})" if w in r.ranks else "—" for r in results])
        out.print(ranks)
    if json_path:
        _write_json({"model": loaded.model_id, "words": word_list, "vectors": [r.as_json() for r in results]},
                    json_path)
