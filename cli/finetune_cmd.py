"""`fv-remote finetune`: fine-tune a function vector (FFV) on one relation, then evaluate it."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from fv_remote.core.checks import (check_output_path, require_finite_vector)
from fv_remote.cli.root import app
from fv_remote.execution.jobs import register_reporter
from fv_remote.cli.common import (ALLOW_UNCHANGED_HELP, _layer_option, _pct, _remote_opt, _settings, _write_json,
                                  console, executor, load_stage, out, progress_bar, submits)
from fv_remote.cli.plan_cmd import PLAN_HELP, plan_instead
from fv_remote.core.errors import UserError, require_positive
from fv_remote.models.loading import DEFAULT_MODEL



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


register_reporter("finetune", show_finetune)  # `jobs fetch` prints what the blocking `finetune` prints
