"""Relational commands: `finetune`, `bank build`, `bank info`, `decode`, `align`, `analogy`."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.table import Table
from rich.text import Text

from fv_remote.core.checks import (MAX_BOOT, MAX_STEPS, atomic_save, check_output_path, check_scale, json_text,
                              require_count, require_finite, require_finite_option, require_finite_vector, write_output)
from fv_remote.cli.app import app
from fv_remote.cli.common import console, executor, load_stage, out, progress_bar, submits
from fv_remote.cli.plan_cmd import PLAN_HELP, plan_instead
from fv_remote.core.errors import UserError, require_positive
from fv_remote.models.loading import DEFAULT_MODEL

bank_app = typer.Typer(help="Relation banks: many fine-tuned FVs in one file.", no_args_is_help=True)
app.add_typer(bank_app, name="bank")

DEFAULT_BANK = "out/bank.safetensors"


def _remote_opt(what: str):
    return typer.Option(False, "--remote", help=f"run on NDIF: {what} (--model is a Hub repo id; short names map "
                        "to their original repo)")


def _layer_option(text: Optional[str]):
    if text is None or text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise UserError(f"--layer takes a layer index or 'auto', got {text!r}") from None


def _write_json(data: dict, path: Path) -> None:
    """Atomically; a failed write puts the results in a fallback file and the error says where."""
    write_output(path, json_text(data))
    console.print(f"wrote {path}")


def _pct(x) -> str:
    return "—" if x is None else f"{x:.2f}"


ALLOW_UNCHANGED_HELP = ("keep a result equal to its starting vector (e.g. --init zero as a baseline on purpose); "
                       "without it such a run is refused and nothing is saved")


def _settings(steps, lr, l2, patience, batch_size, seed, allow_unchanged=False):
    from fv_remote.relational.ffv import FinetuneSettings

    require_finite_option("--lr", lr)
    require_finite_option("--l2", l2)
    require_count("--steps", steps, MAX_STEPS, "optimiser steps")
    require_count("--batch-size", batch_size, MAX_BOOT, "prompts per step")
    return FinetuneSettings(steps=steps, lr=lr, l2=l2, patience=patience, batch_size=batch_size, seed=seed,
                            allow_unchanged=allow_unchanged).check()


# --- finetune ---------------------------------------------------------------------------------------------------


@app.command()
def finetune(
    task: str = typer.Option(..., "--task", "-t", help="bundled task name, a task in --data-dir, or a .json file"),
    fv: Optional[Path] = typer.Option(None, "--fv", help="the task's FV (.fv.safetensors): the starting point "
                                                         "and the baseline in the table"),
    init: str = typer.Option("fv", help="start from the FV, zeros or a random direction (fv, zero, random)"),
    layer: Optional[str] = typer.Option(None, help="layer index, or 'auto' (short runs on a few layers, best on "
                                                   "validation); default: the FV's layer"),
    out_path: Optional[Path] = typer.Option(None, "--out", "-o", help="where to save the FFV "
                                                                      "(default out/ffv/TASK.ffv.safetensors)"),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m"),
    data_dir: Optional[Path] = typer.Option(None, help="folder of TASK.json files (e.g. Todd et al.'s)"),
    n_train: int = typer.Option(20, help="training pairs (zero-shot prompts)"),
    n_valid: int = typer.Option(30, help="validation pairs for early stopping (0: none)"),
    steps: int = typer.Option(40, help="optimiser steps at most"),
    lr: float = typer.Option(0.2, help="peak Adam learning rate (cosine schedule)"),
    l2: float = typer.Option(0.0, help="weight of ||v - v0||^2"),
    patience: int = typer.Option(15, help="steps without a better validation loss before stopping"),
    batch_size: int = typer.Option(32, help="prompts per optimiser step"),
    n_test: Optional[int] = typer.Option(None, help="test pairs to evaluate on (default: the whole test split)"),
    n_shots: int = typer.Option(10, help="demonstrations for the ICL and shuffled columns"),
    seed: int = typer.Option(0, help="seed for splits, prompts and random inits"),
    plot: Optional[Path] = typer.Option(None, help="loss-curve PNG (default next to --out)"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write the evaluation JSON (as `evaluate`)"),
    evaluate: bool = typer.Option(True, help="evaluate FV / FFV / ICL on the test split afterwards"),
    remote: bool = _remote_opt("the whole optimisation (layer search, Adam steps, validation, early stopping) is "
                               "one request; the evaluation afterwards is a second"),
    no_wait: bool = typer.Option(False, "--no-wait", help="with --remote: submit the fine-tuning, print the job id "
                                 "and return; `fv-remote jobs fetch ID` saves the FFV and loss curve later and "
                                 "prints the `fv-remote evaluate` command that evaluates it (instead of evaluating)"),
    plan: bool = typer.Option(False, "--plan", help=PLAN_HELP + " (the fine-tuning request)"),
    allow_unchanged: bool = typer.Option(False, "--allow-unchanged", help=ALLOW_UNCHANGED_HELP),
) -> None:
    """Fine-tune a function vector (model frozen): FFV = argmin NLL of the answer on zero-shot prompts."""
    from fv_remote.data import load_task
    from fv_remote.fv.evaluate import evaluate_task
    from fv_remote.relational.ffv import train_ffv
    from fv_remote.data.tasks import prepare_task
    from fv_remote.fv.vectors import FunctionVector

    require_positive("--n-train", n_train)
    ex = executor(remote, no_wait)
    for flag, path in (("--out", out_path), ("--plot", plot), ("--json", json_path)):
        check_output_path(path, flag, "fv" if flag == "--out" else None)
    settings = _settings(steps, lr, l2, patience, batch_size, seed, allow_unchanged)
    layer_opt = _layer_option(layer)
    source = FunctionVector.load(fv) if fv is not None else None
    if fv is not None:
        require_finite_vector(source, fv)
    if init == "fv" and source is None:
        raise UserError("--init fv needs --fv FILE (make one with `fv-remote run` or `fv-remote fit`); "
                        "or use --init zero --layer N")
    if plan:
        at = source.layer if layer_opt is None and source is not None else layer_opt  # None / "auto": the search
        return plan_instead("finetune", model, n_train=n_train, n_valid=n_valid, steps=steps, batch_size=batch_size,
                            layer=None if at == "auto" else at)
    relation = load_task(task, data_dir=data_dir)
    loaded = load_stage(model, ex)
    if source is not None:
        source.check_model(loaded)
    prepared = prepare_task(loaded.tokenizer, relation, seed=seed, min_pairs=n_train + 2)
    for pair, reason in prepared.problems:
        console.print(f"[yellow]skipped pair {pair[0]!r} -> {pair[1]!r}: {reason}[/]")
    if len(prepared.splits.train) < n_train:
        raise UserError(f"task {relation.name!r} has {len(prepared.splits.train)} training pairs, fewer than "
                        f"--n-train {n_train}")
    out_path = out_path or Path("out/ffv") / f"{relation.name}.ffv.safetensors"
    plot = plot or out_path.with_name(out_path.name.replace(".safetensors", "") + "_loss.png")
    evaluate_cmd = None  # what a --no-wait run prints instead of evaluating
    if evaluate and prepared.splits.test:
        vectors = ["--fv", str(fv), "--ffv", str(out_path)] if fv is not None else ["--fv", str(out_path)]
        evaluate_cmd = shlex.join(
            ["fv-remote", "evaluate", *vectors, "--task", task, "--model", loaded.model_id, "--n-shots",
             str(n_shots), "--seed", str(seed), *(["--data-dir", str(data_dir)] if data_dir else []),
             *(["--n-test", str(n_test)] if n_test else []), *(["--json", str(json_path)] if json_path else []),
             "--remote"])
    with submits({"task": relation.name, "init": init}), progress_bar(f"finetune {relation.name}", steps) as update:
        run = train_ffv(loaded, prepared, source, init=init, layer=layer_opt, n_train=n_train, n_valid=n_valid,
                        settings=settings, progress=update, out=out_path, plot=plot, next_step=evaluate_cmd)
    report_finetune(run, relation.name, init, out_path, plot)
    if not evaluate:
        return
    ffv = run.result.ffv
    if not prepared.splits.test:
        raise UserError(f"task {relation.name!r} has no test pairs to evaluate on (use --no-evaluate)")
    base = source if source is not None else ffv
    scores = evaluate_task(loaded, prepared, base, n_test=n_test, n_shots=n_shots,
                           extra_vectors={"ffv": ffv} if source is not None else None)
    row = scores.as_json()
    if source is None:  # no FV: the FFV sat in the FV's place
        row["zero_shot_ffv"], row["shuffled_ffv"] = row["zero_shot_fv"], row["shuffled_fv"]
        row["zero_shot_fv"] = row["shuffled_fv"] = None
    row["ffv_layer"] = ffv.layer
    table = Table(title=f"{relation.name}: top-1 accuracy on {scores.n_test} test queries", title_justify="left")
    cols = ["zero_shot", "zero_shot_fv", "zero_shot_ffv", "shuffled", "shuffled_fv", "shuffled_ffv", "icl"]
    for col in cols:
        table.add_column(col.replace("_", " "), justify="right")
    table.add_row(*[_pct(row.get(c)) for c in cols])
    out.print(table)
    if json_path:
        _write_json({"model": loaded.model_id, "layer": ffv.layer, "layers": {relation.name: ffv.layer},
                     "settings": {"n_train": n_train, "n_valid": n_valid, "n_shots": n_shots, "seed": seed,
                                  "init": init, "fv": str(fv) if fv else None, "finetune": settings.as_dict()},
                     "results": [row]}, json_path)


SMALL_MOVE = 0.02  # smollm2-135m FFVs move 35-65% of the FV's norm, gemma3-270m's at --lr 10 22-38%


def report_finetune(run, name: str, init: str, out_path: Path, plot: Path) -> None:
    """The layer search and a summary of the blocking `finetune` (the stage saved the FFV and its loss curve)."""
    show_finetune({"task": name, "init": init}, run)
    out.print(f"saved {out_path} and {plot}")


def show_finetune(settings: dict, run) -> None:
    """The layer search and summary of a fine-tuning run (also `jobs fetch`'s reporter for a finetune job)."""
    res = run.result
    ffv = res.ffv
    if run.layer_search:
        table = Table(title="layer search (short runs)", title_justify="left")
        for col in ("layer", "valid acc", "valid NLL"):
            table.add_column(col, justify="right")
        for lay, r in sorted(run.layer_search.items()):
            table.add_row(str(lay), _pct(r["valid_acc"]), f"{r['valid_loss']:.3f}")
        out.print(table)
    out.print(f"{settings['task']}: FFV at layer {ffv.layer}, init {settings['init']}, {run.n_train} training / "
              f"{run.n_valid} validation pairs; kept step {res.best_step}"
              + (f" (valid acc {res.best_valid_acc:.2f}, NLL {res.best_valid_loss:.3f})" if run.n_valid else "")
              + ("; stopped early" if res.stopped_early else ""))
    if ffv.meta.get("unchanged"):
        out.print("[yellow]note:[/] the kept vector is its starting vector (kept on purpose: --allow-unchanged)")
    moved, start, lr = ffv.meta.get("moved"), ffv.meta.get("init_norm") or 0.0, ffv.meta["settings"]["lr"]
    if moved is not None and start > 0 and moved < SMALL_MOVE * start:
        # Adam steps ~lr per coordinate, so lr is in the residual stream's units, which differ ~60x between models
        out.print(f"[yellow]note:[/] the vector moved by {moved / start:.1%} of its initial norm ({start:,.0f}): "
                  f"--lr {lr:g} may be small for this model's residual stream (gemma3-270m needs ~10)")


# --- bank -------------------------------------------------------------------------------------------------------


@bank_app.command("build")
def bank_build(
    out_path: Path = typer.Option(Path(DEFAULT_BANK), "--out", "-o", help="bank file (.safetensors); an existing "
                                                                          "one is resumed"),
    tasks: Optional[str] = typer.Option(None, help="comma-separated task names (default: every bundled relation)"),
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
    from fv_remote.relational.bank import build_bank
    from fv_remote.data import list_tasks, load_task

    ex = executor(remote, no_wait)
    check_output_path(out_path, "--out", "bank")
    settings = _settings(steps, lr, l2, patience, batch_size, seed, allow_unchanged)
    if preset or data_root or semeval or todd or bats:
        if remote or tasks or data or init != "zero":
            raise UserError("public sources (--preset/--semeval/--todd/--bats) build locally with --init zero, "
                            "without --tasks, --data or --remote")
        _build_public(out_path, preset, data_root, semeval, todd, bats, model, layer, n_train, min_train, n_valid,
                      settings, seed, fresh)
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
                  settings, seed, fresh) -> None:
    from fv_remote.relational.bank_sources import build_from_sources, report_path
    from fv_remote.data.sources import preset_paths, public_collection

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
    """List the relations in a bank: layer, norm, validation accuracy with and without the vector."""
    from fv_remote.relational.bank import RelationBank, info

    check_output_path(json_path, "--json")
    bank = RelationBank.load(path)
    summary = info(bank)
    table = Table(title=Text(f"{path}: {summary['n']} relations, model {bank.model}, d_model {summary['d_model']}"),
                  title_justify="left")
    for col in ("relation", "category", "layer", "norm", "n train", "valid acc", "zero-shot acc", "init"):
        table.add_column(col, justify="left" if col in ("relation", "category", "init") else "right")
    for r in summary["entries"]:
        table.add_row(Text(r["name"]), Text(str(r["category"])), str(r["layer"]), f"{r['norm']:.1f}",
                      str(r["n_train"] or "—"), _pct(r["valid_acc"]), _pct(r["zero_shot_valid_acc"]),
                      str(r["init"] or "—"))
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


# --- decode -----------------------------------------------------------------------------------------------------


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


# --- align ------------------------------------------------------------------------------------------------------


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
) -> None:
    """Spearman ρ (bootstrap 95% CI) between the model's relation similarity and human ratings."""
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
                           AnalogySettings(temperature=temperature), update)
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
    if json_path:
        _write_json(result.as_json(), json_path)


# --- analogy ----------------------------------------------------------------------------------------------------


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
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m"),
    json_path: Optional[Path] = typer.Option(None, "--json"),
    remote: bool = _remote_opt("relation profiles, CFV weights and every method's scores in one request (with "
                               "--combiner; --train-combiner runs locally only)"),
    plan: bool = typer.Option(False, "--plan", help=PLAN_HELP),
) -> None:
    """Analogies (A is to B as C is to ?) with composite FVs, against no vector, the best single FFV and ICL."""
    import random

    from fv_remote.core.unchanged import combiner_unchanged
    from fv_remote.relational.analogy import METHODS, AnalogySettings, Combiner, group_keys, real_groups, run_analogies
    from fv_remote.relational.analogy import train_combiner as fit_combiner
    from fv_remote.relational.bank_sources import select_sources
    from fv_remote.relational.bank import RelationBank
    from fv_remote.data import read_analogy_csv, read_mc_analogies

    if (mc is None) == (csv_path is None):
        raise UserError("give exactly one of --mc FILE.jsonl or --csv FILE.csv")
    if combiner and train_combiner:
        raise UserError("use --combiner (apply a saved one) or --train-combiner (fit one), not both")
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
    if json_path:
        data = result.as_json()
        if comb is not None:
            data["combiner_unchanged"] = bool(comb.meta.get("unchanged", False))
        _write_json(data, json_path)


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
