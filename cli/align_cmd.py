"""`fv-remote align`: a bank's relation similarity against human ratings (Spearman rho, bootstrap CI)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import typer

from fv_remote.core.checks import (MAX_BOOT, check_output_path, require_count, require_finite_option)
from fv_remote.cli.root import app
from fv_remote.cli.common import (DEFAULT_BANK, _write_json, console,
                                  executor, load_stage, out, progress_bar)
from fv_remote.core.errors import UserError
from fv_remote.models.loading import DEFAULT_MODEL


@app.command()
def align(
    ratings: Path = typer.Option(..., "--ratings", help="CSV: two word pairs and a rating per row"),
    bank_path: Path = typer.Option(Path(DEFAULT_BANK), "--bank", help="relation bank file"),
    columns: Optional[str] = typer.Option(None, help="5 column names: pair1 word1, pair1 word2, pair2 word1, "
                                                     "pair2 word2, rating (default pair1_word1,pair1_word2,"
                                                     "pair2_word1,pair2_word2,mean_rating)"),
    method: str = typer.Option("weights", help="weights (cosine of CFV weight profiles), cfv (cosine of CFVs), "
                                               "logp (correlation of log-prob profiles), bank (cosine of top bank "
                                               "vectors)"),
    temperature: float = typer.Option(1.0, help="softmax temperature for the weight profiles"),
    n_boot: int = typer.Option(1000, help="bootstrap resamples for the interval"),
    seed: int = typer.Option(0),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m"),
    plot: Optional[Path] = typer.Option(None, help="scatter PNG (default next to --json, or out/align.png)"),
    json_path: Optional[Path] = typer.Option(None, "--json"),
    exclude_trained: bool = typer.Option(False, "--exclude-trained", help="also score each row that shares a word "
                                         "pair with a bank entry's training pairs without that entry (per row), and "
                                         "the rows without overlap alone; prints all three figures"),
) -> None:
    """Spearman ρ (bootstrap 95% CI) between the model's relation similarity and human ratings.

    Always reports how many rows share a word pair (either order) with the pairs a bank entry was trained or
    validated on ("unknown" for banks built before fv-remote recorded them)."""
    from fv_remote.relational.align import align as run_align
    from fv_remote.relational.align import parse_columns, read_ratings, scatter
    from fv_remote.relational.analogy import AnalogySettings
    from fv_remote.relational.bank import RelationBank

    require_count("--n-boot", n_boot, MAX_BOOT, "bootstrap resamples; 1000 give a stable interval")
    require_finite_option("--temperature", temperature)
    check_output_path(json_path, "--json")
    check_output_path(plot, "--plot")
    rows = read_ratings(ratings, parse_columns(columns))
    bank = RelationBank.load(bank_path)
    loaded = load_stage(model, executor(False))
    pairs = len({p for r in rows for p in (r.pair1, r.pair2)})
    with progress_bar("relation profiles", pairs * len(bank)) as update:
        result = run_align(loaded, bank, rows, method, temperature, n_boot, seed,
                           AnalogySettings(temperature=temperature), update, exclude_trained)
    for line, reason in result.skipped[:10]:
        console.print(f"[yellow]skipped row at line {line}: {reason}[/]")
    if len(result.skipped) > 10:
        console.print(f"[yellow]... and {len(result.skipped) - 10} more[/]")
    why = result.undefined()
    if why:
        raise UserError(f"Spearman's rho is undefined on these {result.n_used} rows: {why}; use rows with varied "
                        "ratings, or another --method")
    plot = plot or (json_path.with_suffix(".png") if json_path else Path("out/align.png"))
    scatter(result, plot)
    lo, hi = result.ci95
    interval = f"95% CI [{lo:.3f}, {hi:.3f}]" if np.isfinite([lo, hi]).all() else \
        "95% CI undefined (every bootstrap resample had constant values; written as null)"
    out.print(f"Spearman ρ = {result.spearman:.3f}  {interval}  method {method}, "
              f"{result.n_used} rows used, {result.n_skipped} skipped; scatter {plot}")
    if result.overlap is not None:
        out.print(result.overlap.describe("rows"))
    if result.excluded is not None and result.clean is not None:
        n_empty = result.excluded["n_no_entry_left"]
        out.print(f"without the overlapping entries (left out per row): {_rho(result.excluded)}"
                  + (f"; {n_empty} rows shared a pair with every entry and are left out" if n_empty else ""))
        out.print(f"rows that share no pair with any entry's training pairs: {_rho(result.clean)}")
    if json_path:
        _write_json(result.as_json(), json_path)


def _rho(figure: dict) -> str:
    rho, (lo, hi), n = figure["spearman"], figure["ci95"], figure["n_used"]
    if not np.isfinite(rho):
        return f"Spearman ρ undefined on {n} rows (fewer than 3, or constant values; written as null)"
    interval = f"95% CI [{lo:.3f}, {hi:.3f}]" if np.isfinite([lo, hi]).all() else "95% CI undefined"
    return f"Spearman ρ = {rho:.3f}  {interval}, {n} rows"
