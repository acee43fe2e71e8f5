"""`fv-remote bank build|info|map`: banks of fine-tuned FVs, one per relation, in one file."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table
from rich.text import Text

from fv_remote.core.checks import (MAX_BOOT, check_output_path, require_count)
from fv_remote.cli.root import app
from fv_remote.cli.common import (DEFAULT_BANK, _pct, _remote_opt, _settings, _write_json, console,
                                  executor, load_stage, out, progress_bar, submits)
from fv_remote.cli.plan_cmd import PLAN_HELP, plan_instead
from fv_remote.core.errors import UserError, require_positive
from fv_remote.models.loading import DEFAULT_MODEL


bank_app = typer.Typer(help="Relation banks: many fine-tuned FVs in one file.", no_args_is_help=True)
app.add_typer(bank_app, name="bank")



@bank_app.command("build")
def bank_build(
    out_path: Path = typer.Option(Path(DEFAULT_BANK), "--out", "-o", help="bank file (.safetensors); an existing "
                                                                          "one is resumed"),
    tasks: Optional[str] = typer.Option(None, help="comma-separated task names (default: every bundled relation); "
                                                   "with public sources, SOURCE:ID names (e.g. semeval2012:1a,"
                                                   "todd:antonym) pick those relations only"),
    data: Optional[list[Path]] = typer.Option(None, "--data", help="dataset .json files to add (repeatable)"),
    data_dir: Optional[Path] = typer.Option(None, help="folder of TASK.json files for --tasks"),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m"),
    layer: Optional[int] = typer.Option(None, help="common layer for every vector (default 0.4 x the number of "
                                                   "layers: 12 of 30 on smollm2-135m, best on validation there; with "
                                                   "--init fv, each FV's own layer)"),
    init: str = typer.Option("zero", help="zero, random, or fv (from FV-DIR/TASK.fv.safetensors)"),
    fv_dir: Optional[Path] = typer.Option(None, help="folder of TASK.fv.safetensors for --init fv"),
    n_train: int = typer.Option(20, help="training pairs per relation"),
    n_valid: int = typer.Option(20, help="validation pairs per relation"),
    steps: int = typer.Option(40, help="optimiser steps per relation"),
    lr: float = typer.Option(0.2, help="peak Adam learning rate"),
    l2: float = typer.Option(0.0, help="weight of ||v - v0||^2"),
    patience: int = typer.Option(15, help="early-stopping patience (steps)"),
    batch_size: int = typer.Option(32, help="prompts per step"),
    seed: int = typer.Option(0),
    fresh: bool = typer.Option(False, help="ignore an existing bank file instead of resuming it"),
    preset: Optional[str] = typer.Option(None, help="'public': SemEval-2012 + Todd et al. + BATS from --data-root "
                                                    "(folders laid out as ../shared/data; read in place)"),
    data_root: Optional[Path] = typer.Option(None, help="folder with semeval2012_task2/, todd_fv/abstractive/, "
                                                        "bats/ for --preset public"),
    semeval: Optional[Path] = typer.Option(None, help="SemEval-2012 Task 2 folder: its 79 subcategories"),
    todd: Optional[Path] = typer.Option(None, help="folder of Todd et al. task files (word-level ones are used)"),
    bats: Optional[Path] = typer.Option(None, help="BATS pairs_by_relation.json: its 40 relations"),
    min_train: int = typer.Option(10, help="with public sources: relations with fewer training pairs are reported "
                                           "unusable (others train on min(--n-train, their training split))"),
    remote: bool = _remote_opt("every missing relation is fine-tuned in one request; the bank is written when it "
                               "is back"),
    no_wait: bool = typer.Option(False, "--no-wait", help="with --remote: submit, print the job id and return; "
                                 "`fv-remote jobs fetch ID` writes the bank later"),
    plan: bool = typer.Option(False, "--plan", help=PLAN_HELP),
    allow_unchanged: bool = typer.Option(False, "--allow-unchanged", help="keep an entry equal to its starting "
                                         "vector; without it such a relation is reported and left out"),
) -> None:
    """Fine-tune an FFV for every relation and store them in one bank file (resumable)."""
    from fv_remote.relational.bank_build import build_bank
    from fv_remote.data import list_tasks, load_task

    ex = executor(remote, no_wait)
    check_output_path(out_path, "--out", "bank")
    settings = _settings(steps, lr, l2, patience, batch_size, seed, allow_unchanged)
    if preset or data_root or semeval or todd or bats:
        if remote or data or init != "zero":
            raise UserError("public sources (--preset/--semeval/--todd/--bats) build locally with --init zero, "
                            "without --data or --remote")
        _build_public(out_path, preset, data_root, semeval, todd, bats, model, layer, n_train, min_train, n_valid,
                      settings, seed, fresh, tasks)
        return
    names = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else ([] if data else list_tasks())
    relations = [load_task(n, data_dir=data_dir) for n in names] + [load_task(str(p)) for p in (data or [])]
    if not relations:
        raise UserError("no relations given: use --tasks, --data, or neither for every bundled relation")
    if plan:
        return plan_instead("bank", model, n_train=n_train, n_valid=n_valid, steps=steps, batch_size=batch_size,
                            layer=layer, relations=len(relations))
    loaded = load_stage(model, ex)
    if layer is None and init != "fv":
        layer = round(0.4 * loaded.adapter.n_layers)
        console.print(f"common layer {layer} of {loaded.adapter.n_layers} (set it with --layer)")
    skipped = []

    def report(name: str, status: str) -> None:
        if status.startswith("skipped"):
            skipped.append(name)
            console.print(f"[yellow]{name}: {status}[/]")

    with submits({}), \
            progress_bar("bank build", len(relations)) as update:
        bank = build_bank(loaded, relations, out_path, layer=layer, init=init, fv_dir=fv_dir, n_train=n_train,
                          n_valid=n_valid, settings=settings, seed=seed, resume=not fresh, on_task=report,
                          progress=update)
    if no_wait:
        console.print(f"every relation is already in {out_path}; nothing submitted")
    out.print(f"bank {out_path}: {len(bank)} relations for {bank.model}"
              + (f"; {len(skipped)} skipped ({', '.join(skipped)})" if skipped else "")
              + f"\nsee `fv-remote bank info {out_path}`")


def _build_public(out_path, preset, data_root, semeval, todd, bats, model, layer, n_train, min_train, n_valid,
                  settings, seed, fresh, tasks=None) -> None:
    from fv_remote.relational.bank_sources import build_from_sources, report_path
    from fv_remote.data.sources import pick, preset_paths, public_collection

    require_positive("--n-train", n_train)
    require_positive("--min-train", min_train)
    if preset:
        if data_root is None:
            raise UserError("--preset public needs --data-root DIR (the folder holding semeval2012_task2/, "
                            "todd_fv/abstractive/ and bats/)")
        paths = preset_paths(preset, data_root)
        semeval, todd, bats = semeval or paths["semeval"], todd or paths["todd"], bats or paths["bats"]
    elif data_root:
        raise UserError("--data-root goes with --preset public")
    collection = public_collection(semeval=semeval, todd=todd, bats=bats)
    if tasks:
        collection = pick(collection, [t.strip() for t in tasks.split(",") if t.strip()])
    loaded = load_stage(model, executor(False))
    if layer is None:
        layer = round(0.4 * loaded.adapter.n_layers)
        console.print(f"common layer {layer} of {loaded.adapter.n_layers} (set it with --layer)")

    def report(name: str, status: str) -> None:
        if status.startswith("skipped"):
            console.print(f"[yellow]{name}: {status}[/]")

    with progress_bar("bank build", len(collection.tasks)) as update:
        bank, rep = build_from_sources(loaded, collection, out_path, layer, n_train, min_train, n_valid, settings,
                                       seed, resume=not fresh, on_task=report, progress=update)
    table = Table(title=f"bank {out_path}: {len(bank)} relations for {bank.model}", title_justify="left")
    for col in ("source", "offered", "built", "unusable", "train s"):
        table.add_column(col, justify="left" if col == "source" else "right")
    for src, row in rep["per_source"].items():
        table.add_row(src, str(row["offered"]), str(row["built"]), str(row["unusable"]), f"{row['train_s']:.0f}")
    out.print(table)
    for u in rep["unusable"]:
        console.print(f"[yellow]unusable {u['name']} ({u['n_pairs'] if u['n_pairs'] is not None else '?'} pairs): "
                      f"{u['reason']}[/]")
    out.print(f"build report {report_path(out_path)}; see `fv-remote bank info {out_path}`")


@bank_app.command("info")
def bank_info(
    path: Path = typer.Argument(Path(DEFAULT_BANK), help="bank file"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write the summary as JSON"),
) -> None:
    """List the relations in a bank: layer, norm, validation accuracy with and without the vector, and how many
    training/validation pairs each records (for `align`/`analogy`'s train/test overlap; "unknown" in older banks)."""
    from fv_remote.relational.bank import RelationBank, info

    check_output_path(json_path, "--json")
    bank = RelationBank.load(path)
    summary = info(bank)
    table = Table(title=Text(f"{path}: {summary['n']} relations, model {bank.model}, d_model {summary['d_model']}"),
                  title_justify="left")
    for col in ("relation", "category", "layer", "norm", "n train", "valid acc", "zero-shot acc", "init",
                "pairs recorded"):
        table.add_column(col, justify="left" if col in ("relation", "category", "init") else "right")
    for r in summary["entries"]:
        table.add_row(Text(r["name"]), Text(str(r["category"])), str(r["layer"]), f"{r['norm']:.1f}",
                      str(r["n_train"] or "—"), _pct(r["valid_acc"]), _pct(r["zero_shot_valid_acc"]),
                      str(r["init"] or "—"), "unknown" if r["trained_pairs"] is None else str(r["trained_pairs"]))
    out.print(table)
    if json_path:
        _write_json(summary, json_path)


@bank_app.command("map")
def bank_map_cmd(
    path: Path = typer.Argument(Path(DEFAULT_BANK), help="bank file"),
    out_png: Path = typer.Option(Path("out/bank_map.png"), "--out", "-o", help="dendrogram + heatmap PNG; the "
                                 "class-recovery figure goes next to it (NAME_recovery.png)"),
    label: str = typer.Option("class", help="entry label whose classes the clusters should recover"),
    linkage: str = typer.Option("ward", help="ward (on the unit vectors; balanced clusters), average, complete or "
                                         "single (average and single peel outliers off as clusters of their own)"),
    center: bool = typer.Option(False, help="subtract the bank's mean vector before the cosines"),
    n_perm: int = typer.Option(1000, help="label shufflings for the permutation baseline"),
    seed: int = typer.Option(0),
    json_path: Optional[Path] = typer.Option(None, "--json", help="matrix, order, clusters and ARIs as JSON"),
) -> None:
    """Cosine-similarity matrix of the bank ordered by hierarchical clustering, and how well the clusters recover
    the sources' own classes (adjusted Rand index with a permutation baseline)."""
    from fv_remote.relational.bank import RelationBank
    from fv_remote.relational.bank_map import bank_map, plot_map, plot_recovery

    check_output_path(out_png, "--out", "png")
    check_output_path(json_path, "--json")
    require_count("--n-perm", n_perm, MAX_BOOT, "label shufflings; 1000 give a stable p-value")
    bank = RelationBank.load(path)
    result = bank_map(bank, label=label, center=center, method=linkage, n_perm=n_perm, seed=seed)
    plot_map(result, out_png)
    table = Table(title=f"{path}: {len(bank)} relations, {linkage} linkage"
                        + (", centred" if center else "") + "; class recovery", title_justify="left")
    for col in ("relations", "classes", "n", "k", "ARI", "shuffled mean", "shuffled 95%", "p"):
        table.add_column(col, justify="left" if col in ("relations", "classes") else "right")
    for r in result.recoveries:
        table.add_row(r.source or "all", r.label, str(r.n), str(r.n_classes), f"{r.ari:.3f}", f"{r.perm_mean:+.3f}",
                      f"{r.perm_q95:.3f}", f"{r.p_value:.3g}")
    out.print(table)
    written = [str(out_png)]
    if result.recoveries:
        rec = out_png.with_name(out_png.stem + "_recovery.png")
        plot_recovery(result, rec)
        written.append(str(rec))
    else:
        console.print(f"[yellow]no class recovery: no source's entries carry two or more {label!r} values[/]")
    out.print(f"wrote {' and '.join(written)}")
    if json_path:
        _write_json(result.as_json(), json_path)
