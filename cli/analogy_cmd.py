"""`fv-remote analogy`: analogies scored with composite FVs (CFV) against the baselines."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table
from rich.text import Text

from fv_remote.core.checks import (MAX_BOOT, MAX_STEPS, atomic_save, check_output_path, check_scale, require_count,
                                   require_finite_option)
from fv_remote.cli.root import app
from fv_remote.cli.common import (DEFAULT_BANK, _remote_opt, _write_json, console,
                                  executor, load_stage, out, progress_bar)
from fv_remote.cli.plan_cmd import PLAN_HELP, plan_instead
from fv_remote.core.errors import UserError, require_positive
from fv_remote.models.loading import DEFAULT_MODEL


@app.command()
def analogy(
    mc: Optional[Path] = typer.Option(None, "--mc", help="multiple-choice JSONL (stem, choice, answer, prefix)"),
    csv_path: Optional[Path] = typer.Option(None, "--csv", help="2-choice CSV A,B,C,D,D_foil"),
    bank_path: Path = typer.Option(Path(DEFAULT_BANK), "--bank", help="relation bank file"),
    mode: str = typer.Option("mc", help="mc (score every choice) or generative (exact match of D)"),
    temperature: float = typer.Option(1.0, help="softmax temperature of the CFV weights"),
    score: str = typer.Option("first", help="first (log P of D's first token) or mean (mean log-prob of D's "
                                            "tokens)"),
    scale: float = typer.Option(1.0, help="multiplies the CFV and the single FFV"),
    limit: Optional[int] = typer.Option(None, help="use the first N items (after a seeded shuffle with --sample)"),
    sample: bool = typer.Option(False, help="shuffle the items (seeded) before --limit"),
    combiner: Optional[Path] = typer.Option(None, help="apply a learned affine combiner (.safetensors)"),
    train_combiner: Optional[Path] = typer.Option(None, help="multiple-choice JSONL to train a combiner on first"),
    save_combiner: Optional[Path] = typer.Option(None, help="where to save the trained combiner"),
    combiner_steps: int = typer.Option(40),
    combiner_lr: float = typer.Option(0.05),
    icl_format: str = typer.Option("{a}:{b}::{c}:", help="ICL baseline prompt; D follows without a space"),
    batch_size: int = typer.Option(48),
    n_boot: int = typer.Option(2000),
    seed: int = typer.Option(0),
    group_by: Optional[str] = typer.Option(None, help="report accuracy per value of this item field: relation "
                                                      "(JSONL prefix; the default when items have one), family "
                                                      "(BATS section / Google syntactic-semantic), any other JSONL "
                                                      "field or extra CSV column"),
    methods: Optional[str] = typer.Option(None, help="comma-separated methods to score (cfv always; default all: "
                                                     "cfv,no_vector,best_ffv,icl,icl_qa,icl_qa+cfv)"),
    min_group: int = typer.Option(10, help="groups with fewer items are pooled into one 'other' row; without "
                                           "--group-by a per-relation table is shown only when every relation has "
                                           "at least this many items"),
    bank_sources: Optional[str] = typer.Option(None, help="use only the bank entries from these sources (e.g. "
                                                          "semeval2012,todd: leave out the relations of the set "
                                                          "being tested)"),
    exclude_trained: bool = typer.Option(False, "--exclude-trained", help="also score each item that shares a word "
                                         "pair (stem or a choice) with a bank entry's training pairs without that "
                                         "entry (per item), and the items without overlap alone; prints all three"),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m"),
    json_path: Optional[Path] = typer.Option(None, "--json"),
    remote: bool = _remote_opt("relation profiles, CFV weights and every method's scores in one request (with "
                               "--combiner; --train-combiner runs locally only)"),
    plan: bool = typer.Option(False, "--plan", help=PLAN_HELP),
) -> None:
    """Analogies (A is to B as C is to ?) with composite FVs, against no vector, the best single FFV and ICL.

    Always reports how many items share a word pair (either order) with the pairs a bank entry was trained or
    validated on ("unknown" for banks built before fv-remote recorded them)."""
    import random

    from fv_remote.core.unchanged import combiner_unchanged
    from fv_remote.relational.analogy import METHODS, AnalogySettings, Combiner, group_keys, real_groups, run_analogies
    from fv_remote.relational.analogy import COMBINER_EXCLUDE, analogy_overlap, subset, without_trained
    from fv_remote.relational.analogy import train_combiner as fit_combiner
    from fv_remote.relational.overlap import find_overlap, require_known
    from fv_remote.relational.bank_sources import select_sources
    from fv_remote.relational.bank import RelationBank
    from fv_remote.data import read_analogy_csv, read_mc_analogies

    if (mc is None) == (csv_path is None):
        raise UserError("give exactly one of --mc FILE.jsonl or --csv FILE.csv")
    if combiner and train_combiner:
        raise UserError("use --combiner (apply a saved one) or --train-combiner (fit one), not both")
    if exclude_trained and (combiner or train_combiner):
        raise UserError(COMBINER_EXCLUDE)
    if remote and train_combiner:
        raise UserError("--train-combiner runs locally only: train and --save-combiner it locally, then use "
                        "--combiner FILE with --remote")
    check_output_path(json_path, "--json")
    check_output_path(save_combiner, "--save-combiner")
    require_count("--n-boot", n_boot, MAX_BOOT, "bootstrap resamples; 1000 give a stable interval")
    require_count("--combiner-steps", combiner_steps, MAX_STEPS, "optimiser steps")
    require_positive("--min-group", min_group)
    check_scale(scale)
    require_finite_option("--temperature", temperature)
    require_finite_option("--combiner-lr", combiner_lr)
    settings = AnalogySettings(mode=mode, temperature=temperature, score=score, scale=scale, batch_size=batch_size,
                               icl_format=icl_format, n_boot=n_boot, seed=seed).check()
    items = read_mc_analogies(mc) if mc else read_analogy_csv(csv_path)  # type: ignore[arg-type]  # one given
    if sample:
        random.Random(seed).shuffle(items)
    if limit is not None:
        items = items[:require_positive("--limit", limit)]
    if group_by is not None and group_by not in group_keys(items):
        keys = group_keys(items)
        raise UserError(f"--group-by {group_by!r}: no item has that field; "
                        + (f"these items can be grouped by {', '.join(keys)}" if keys else "these items have no "
                           "groupings (JSONL prefix or extra CSV columns under a header)"))
    chosen = list(METHODS)
    if methods:
        chosen = [m.strip() for m in methods.split(",") if m.strip()]
        chosen = ["cfv", *[m for m in chosen if m != "cfv"]]
        bad = [m for m in chosen if m not in METHODS]
        if bad:
            raise UserError(f"--methods: unknown {', '.join(bad)}; choose from {', '.join(METHODS)}")
    bank = RelationBank.load(bank_path)
    if bank_sources:
        bank = select_sources(bank, [x.strip() for x in bank_sources.split(",") if x.strip()], bank_path)
    if exclude_trained:
        require_known(find_overlap(bank, []))  # before any scoring: a bank without records can leave nothing out
    if plan:
        return plan_instead("analogy", model, items=max(len(items), 1), bank_size=max(len(bank), 1),
                            choices=max([len(it.choices) for it in items] or [1]), batch_size=batch_size)
    ex = executor(remote)
    loaded = load_stage(model, ex)
    bank.check_model(loaded)
    comb = None
    if combiner:
        comb = Combiner.load(combiner)
        comb.meta["path"] = str(combiner)
    elif train_combiner:
        train_items = read_mc_analogies(train_combiner)
        with progress_bar("train combiner", combiner_steps) as update:
            comb = fit_combiner(loaded, bank, train_items, settings, steps=combiner_steps, lr=combiner_lr,
                                progress=update)
        if save_combiner:
            atomic_save(comb.save, save_combiner, "combiner")
            console.print(f"saved combiner to {save_combiner}")
        comb.meta["path"] = str(save_combiner or "(trained, not saved)")
    if comb is not None and combiner_unchanged(comb):
        comb.meta["unchanged"] = True
        console.print("[yellow]note: the combiner is its starting map (identity weight, zero bias): its CFV is the "
                      "plain softmax CFV" + (" (training kept its start: try a larger --combiner-lr or more "
                                             "--combiner-steps)" if train_combiner else "") + "[/]")
    with progress_bar(f"analogies ({mode})", 6) as update:
        result = run_analogies(loaded, bank, items, settings, comb, methods=chosen, progress=update)
    result.min_group = min_group
    if group_by is not None:
        result.group_by = group_by
    else:  # unasked: only when the items' relations form real groups (ARCHITECTURE.md, issue 26)
        result.group_by = "relation" if real_groups(result.items, "relation", min_group) else None
        relations = {it.relation for it in result.items if it.relation}
        if result.group_by is None and len(relations) > 1:
            small = sum(1 for r in relations if sum(it.relation == r for it in result.items) < min_group)
            console.print(f"no per-relation table: the items' relations (JSONL prefix) form {len(relations)} groups, "
                          f"{small} of them under {min_group} items; --group-by relation shows it (groups under "
                          "--min-group pooled as 'other')")
    for item, reason in result.skipped[:10]:
        console.print(f"[yellow]skipped {item.stem[0]}:{item.stem[1]}: {reason}[/]")
    if result.n_skipped > 10:
        console.print(f"[yellow]... and {result.n_skipped - 10} more skipped[/]")
    acc, ci = result.accuracy(), result.ci95()
    table = Table(title=f"{mode} analogies: {result.n} used, {result.n_skipped} skipped "
                        f"(not single-token-resolvable); chance {result.chance:.3f}", title_justify="left")
    for col in ("method", "accuracy", "95% CI"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for m in acc:
        table.add_row(m, f"{acc[m]:.3f}", f"[{ci[m][0]:.3f}, {ci[m][1]:.3f}]")
    out.print(table)
    gains = result.gains()
    for key, label in (("cfv_minus_no_vector", "CFV − no vector"), ("cfv_minus_icl_qa", "CFV − one-shot Q/A"),
                       ("icl_qa+cfv_minus_icl_qa", "one-shot Q/A + CFV − one-shot Q/A")):
        if key in gains:
            g = gains[key]
            out.print(f"{label}: {g['mean']:+.3f} (paired 95% CI [{g['ci95'][0]:+.3f}, {g['ci95'][1]:+.3f}])")
    if result.group_by:
        _group_table(result)
    overlap = analogy_overlap(bank, result)
    out.print(overlap.describe("items"))
    extra = {}
    if exclude_trained:
        with progress_bar("analogies without trained entries", 6) as update:
            excluded, n_empty = without_trained(loaded, bank, result, overlap, update)
        clean = subset(result, [i for i, hits in enumerate(overlap.hits) if not hits])
        _overlap_table(result, excluded, clean, n_empty)
        extra = {"excluded_trained": {**_figures(excluded), "n_no_entry_left": n_empty},
                 "no_overlap_items": _figures(clean)}
    if json_path:
        data = {**result.as_json(), "overlap": overlap.as_json(), **extra}
        if comb is not None:
            data["combiner_unchanged"] = bool(comb.meta.get("unchanged", False))
        _write_json(data, json_path)


def _figures(result) -> dict:
    return {"n": result.n, "accuracy": result.accuracy(), "ci95": result.ci95(), "gain": result.gains()}


def _overlap_table(result, excluded, clean, n_empty: int) -> None:
    """Accuracy with every entry, without each item's overlapping entries, and on the items without overlap."""
    table = Table(title=f"train/test overlap: all entries ({result.n} items) | each item's overlapping entries "
                        f"left out ({excluded.n}) | items without overlap only ({clean.n})", title_justify="left")
    for col in ("method", "all entries", "without overlapping", "no-overlap items"):
        table.add_column(col, justify="left" if col == "method" else "right")
    figures = [r.accuracy() for r in (result, excluded, clean)]
    cis = [r.ci95() for r in (result, excluded, clean)]
    for m in figures[0]:
        table.add_row(m, *[f"{acc[m]:.3f} [{ci[m][0]:.3f}, {ci[m][1]:.3f}]" if r.n else "—"
                           for acc, ci, r in zip(figures, cis, (result, excluded, clean))])
    out.print(table)
    if n_empty:
        out.print(f"{n_empty} items shared a pair with every entry: no bank left, so 'without overlapping' scores "
                  "them with no vector (cfv, best_ffv) and as icl_qa (icl_qa+cfv)")


def _ci(ci, signed: bool = False) -> str:
    if ci is None:
        return "—"
    return f"[{ci[0]:+.2f}, {ci[1]:+.2f}]" if signed else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def _group_table(result) -> None:
    from fv_remote.relational.analogy import OTHER

    groups = result.by_group(result.group_by, result.min_group)
    methods = list(result.correct)
    table = Table(title=f"accuracy by {result.group_by} (95% bootstrap CI)", title_justify="left")
    table.add_column(result.group_by)
    table.add_column("n", justify="right")
    for m in methods:
        table.add_column(m, justify="right")
    table.add_column("cfv − no vector", justify="right")
    for name, g in groups.items():
        gain = g["gain"].get("cfv_minus_no_vector")
        label = f"{OTHER} ({g['pooled']} groups under {result.min_group} items, pooled)" if "pooled" in g else name
        table.add_row(Text(label), str(g["n"]),
                      *[f"{g['accuracy'][m]:.3f} {_ci(g['ci95'] and g['ci95'][m])}" for m in methods],
                      f"{gain['mean']:+.3f} {_ci(gain['ci95'], True)}" if gain else "—")
    out.print(table)
    if any(g["n"] < 2 for g in groups.values()):
        out.print("— : no interval for a group of one item")
