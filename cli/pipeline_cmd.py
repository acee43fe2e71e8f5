"""The FV stages: `cma`, `fit`, `steer`, `generate`, `evaluate`, and `run` (all of them in one go)."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from fv_remote.core.checks import (atomic_save, check_output_path, check_prompt_lengths, check_scale,
                                   require_finite_option, require_finite_vector)
from fv_remote.cli.root import app
from fv_remote.execution.jobs import register_reporter
from fv_remote.cli.common import load_vector as _load_vector, console, executor, load_stage, out, progress_bar, submits
from fv_remote.cli.plan_cmd import PLAN_HELP, plan_instead
from fv_remote.core.errors import UserError, require_positive
from fv_remote.models.loading import DEFAULT_MODEL
from fv_remote.store.kind import require_store

MODEL_OPT = typer.Option(DEFAULT_MODEL, "--model", "-m", help="short name, repo id, folder or .gguf")
DATA_DIR_OPT = typer.Option(None, "--data-dir", help="folder of Todd-format TASK.json files instead of bundled data")
SCORE_COLUMNS = ("zero_shot", "zero_shot_fv", "shuffled", "shuffled_fv", "icl")
REMOTE_OPT = typer.Option(False, "--remote", help="run on NDIF as one request (--model is a Hub repo id; short "
                          "names map to their original repo)")
POSITIONS_HELP = ("last: add the vector at the prompt's last token (the FV papers); all: at every position of the "
                  "prompt and of generated tokens, as a llama.cpp control vector does. Default: all for an imported "
                  "control vector, else last")


def _positions(value: str | None, vec) -> str:
    from fv_remote.fv.steering import check_positions, default_positions

    return default_positions(vec) if value is None else check_positions(value)


def _parse_scales(text: str, flag: str = "--sweep-scale") -> list[float]:
    scales = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            scales.append(check_scale(require_finite_option(flag, float(part)), flag))
        except ValueError:
            raise UserError(f"{flag} takes numbers separated by commas (e.g. 1,2,4,8), got {part!r}") from None
    if not scales:
        raise UserError(f"{flag} is empty; give scales such as 1,2,4,8")
    return sorted(set(scales))


def _prepare(loaded, task: str, data_dir: str | None, seed: int, n_shots: int = 10):
    from fv_remote.data import load_task
    from fv_remote.data.tasks import prepare_task

    prepared = prepare_task(loaded.tokenizer, load_task(task, data_dir=data_dir), seed=seed, min_pairs=n_shots + 2)
    if prepared.problems:
        console.print(f"[yellow]{task}: {len(prepared.problems)} pairs skipped (answer has no usable first "
                      f"token), e.g. {prepared.problems[0][0]!r}: {prepared.problems[0][1]}[/]")
    return prepared


def _note(note: str | None) -> None:
    if note:
        console.print(f"[yellow]note: {note}[/]")


def scores_table(rows: list[dict], title: str = "") -> Table:
    """task | zero-shot | zero-shot+FV | shuffled | shuffled+FV | ICL (+ any extra vector columns), with a mean."""
    extra = [k for k in rows[0] if k.startswith(("zero_shot_", "shuffled_")) and k not in SCORE_COLUMNS] if rows else []
    columns = list(SCORE_COLUMNS) + extra
    headers = {"zero_shot": "zero-shot", "zero_shot_fv": "zero-shot+FV", "shuffled": "shuffled",
               "shuffled_fv": "shuffled+FV", "icl": "ICL"}
    table = Table("task", "n", "layer", *[headers.get(c, c.replace("_", "+").replace("zero+shot", "zero-shot"))
                                          for c in columns], title=title)
    for row in rows:
        table.add_row(row["task"], str(row["n_test"]), str(row.get("layer", "")),
                      *[f"{row[c]:.2f}" for c in columns])
    if len(rows) > 1:
        table.add_row("mean", "", "", *[f"{sum(r[c] for r in rows) / len(rows):.2f}" for c in columns],
                      style="bold")
    return table


def _top_heads_table(aie, k: int, method: str = "fast") -> Table:
    from fv_remote.fv.vectors import top_heads

    score = "relevance" if method.startswith("lrp") else "AIE"
    title = ("top heads by mean AttnLRP relevance" if method.startswith("lrp") else
             "top heads by average indirect effect")
    table = Table("rank", "layer", "head", score, title=title)
    for i, (layer, head, value) in enumerate(top_heads(aie, k=k), 1):
        table.add_row(str(i), str(layer), str(head), f"{value:+.4f}")
    return table


def _warn_if_flat(task: str, scores: dict[int, float] | None) -> None:
    from fv_remote.fv.evaluate import sweep_is_flat

    if scores and sweep_is_flat(scores):
        value = next(iter(scores.values()))
        console.print(f"[yellow]{task}: the validation sweep is flat (accuracy {value:.2f} at every layer): the FV "
                      f"does not move this task on validation pairs, so its layer (the middle one) is a guess[/]")


@app.command()
def cma(
    task: str = typer.Option(..., "--task", "-t"),
    store: str = typer.Option(..., "--store", "-s", help="store holding the task's extraction"),
    model: str = MODEL_OPT,
    n_prompts: int = typer.Option(25, help="shuffled-label prompts"),
    n_shots: int = typer.Option(10),
    seed: int = typer.Option(0),
    method: str = typer.Option("fast", help="fast (exact) | cached_batch | invoke_per_head | naive (exact references) "
                               "| attribution (gradient estimate, stored in <task>/attribution) | lrp (AttnLRP "
                               "relevance of each head's output, via lxt; clean prompts; local) | lrp_attention (the "
                               "Fast & Faithful FV paper's attention x gradient towards the demonstrations; local); "
                               "`fit --scores METHOD` ranks by a stored one"),
    plot: Path = typer.Option(None, help="heatmap PNG (default: out/<task>_aie.png)"),
    top: int = typer.Option(10, help="heads to list"),
    data_dir: str = DATA_DIR_OPT,
    remote: bool = typer.Option(False, "--remote", help="run on NDIF as one request (fast method only; --model is "
                                "a Hub repo id)"),
    no_wait: bool = typer.Option(False, "--no-wait", help="with --remote: submit, print the job id and return; "
                                 "`fv-remote jobs fetch ID` stores the AIE, prints the top heads and writes the "
                                 "heatmap later"),
    plan: bool = typer.Option(False, "--plan", help=PLAN_HELP),
) -> None:
    """Average indirect effect of every head (patched with its mean clean activation into shuffled prompts)."""
    from fv_remote.fv.cma import run_cma
    from fv_remote.core.errors import require_positive
    from fv_remote.fv.extract import mean_heads_tensor
    from fv_remote.store.activations import ActivationStore

    for name, value in (("--n-prompts", n_prompts), ("--n-shots", n_shots), ("--top", top)):
        require_positive(name, value)  # before the model loads: a typo should not cost a minute
    if plan:
        return plan_instead("cma", model, n_prompts=n_prompts, n_shots=n_shots)
    ex = executor(remote, no_wait)
    if remote and method in ("lrp", "lrp_attention"):
        from fv_remote.fv.lrp import REMOTE_REFUSAL

        raise UserError(REMOTE_REFUSAL.format(method=method))
    check_output_path(plot, "--plot")
    require_store(store)
    act_store = ActivationStore(store)
    loaded = load_stage(model, ex)
    prepared = _prepare(loaded, task, data_dir, seed, n_shots)
    _note(prepared.count_note("--n-prompts", n_prompts))
    means = mean_heads_tensor(act_store, prepared.name)  # says which command to run first if missing
    act_store.check_compatible(prepared.name, {"model": loaded.model_id})
    report = {"model": loaded.model_id, "task": prepared.name, "store": store, "top": top, "method": method,
              "plot": str(plot or Path("out") / f"{prepared.name}_aie.png")}
    with submits(report), progress_bar(f"mediation {prepared.name}", n_prompts) as update:
        result = run_cma(loaded, prepared, act_store, means, n_prompts=n_prompts, n_shots=n_shots,
                         method=method, progress=update, plot=report["plot"])
    if no_wait:
        console.print(f"all {n_prompts} corrupted prompts already in {store}; nothing submitted")
    report_cma(report, result)


def report_cma(report: dict, result) -> None:
    """The top-heads table, heatmap (drawn by the stage) and summary of `cma`."""
    show_cma(report, result)
    path = result.heatmap
    kind = "clean" if str(report.get("method", "")).startswith("lrp") else "corrupted"
    out.print(f"{result.n_prompts} {kind} prompts ({result.n_new} new) in {report['store']}; heatmap: {path}")


def show_cma(report: dict, result) -> None:
    """The top-heads table of a CMA result (also `jobs fetch`'s reporter for a cma job)."""
    out.print(_top_heads_table(result.aie, min(int(report["top"]), result.aie.size), report.get("method", "fast")))


@app.command()
def fit(
    task: str = typer.Option(..., "--task", "-t"),
    store: str = typer.Option(..., "--store", "-s"),
    model: str = MODEL_OPT,
    k: int = typer.Option(10, help="number of top heads"),
    share: float = typer.Option(None, help="instead of k: fewest heads carrying this share of positive AIE"),
    scores: str = typer.Option("auto", "--scores", help="head ranking to use: cma (exact) | attribution | lrp | "
                               "lrp_attention (each stored by `cma --method ...`) | auto (cma where stored, else "
                               "attribution)"),
    layer: int = typer.Option(None, help="layer to add the FV at (default: best on a validation sweep)"),
    sweep: bool = typer.Option(True, help="run the validation layer sweep to choose the layer"),
    seed: int = typer.Option(0),
    output: Path = typer.Option(None, "--out", "-o", help="FV file (default: out/<task>.fv.safetensors)"),
    plot: Path = typer.Option(None, help="layer-sweep PNG (default: out/<task>_sweep.png)"),
    data_dir: str = DATA_DIR_OPT,
    remote: bool = REMOTE_OPT,
    method: str = typer.Option("fv", "--method", help="fv (top heads, from extract + cma) | task-vector | icv | "
                               "mean-diff | pca (from `fv-remote residuals`; README: Other vectors)"),
    scales: str = typer.Option(None, help="with --method icv|mean-diff|pca: scales to try on validation, e.g. "
                               "0.5,1,2,4 (default per method)"),
    every_layer: bool = typer.Option(None, "--every-layer/--one-layer", help="with --method icv: add it at every "
                                     "layer (default) or at one (--layer, or the best on validation)"),
    n_prompts: int = typer.Option(None, help="with --method other than fv: paired prompts of the store to use "
                                  "(default: all)"),
) -> None:
    """Build a vector from the store: the function vector (means + AIE; only the output projection needs the model),
    or with --method a task vector, ICV, mean-difference or PCA vector from the residual reads, placed on
    validation pairs."""
    if method != "fv":
        return _fit_other(task, store, model, method, layer, scales, every_layer, n_prompts, seed, output, plot,
                          data_dir, remote)
    for flag, value in (("--scales", scales), ("--every-layer/--one-layer", every_layer), ("--n-prompts", n_prompts)):
        if value is not None:
            raise UserError(f"{flag} applies to --method task-vector|icv|mean-diff|pca, not fv")
    from fv_remote.fv.cma import load_aie
    from fv_remote.fv.evaluate import fit_function_vector
    from fv_remote.fv.extract import mean_heads_tensor
    from fv_remote.core.plots import layer_sweep_plot
    from fv_remote.store.activations import ActivationStore

    check_output_path(output, "--out", "fv")
    check_output_path(plot, "--plot")
    require_finite_option("--share", share)
    require_store(store)
    act_store = ActivationStore(store)
    ex = executor(remote)
    loaded = load_stage(model, ex)
    prepared = _prepare(loaded, task, data_dir, seed)
    act_store.check_compatible(prepared.name, {"model": loaded.model_id})
    aie = load_aie(act_store, prepared.name, source=scores)
    means = mean_heads_tensor(act_store, prepared.name)
    if layer is not None:
        loaded.adapter.check_layer(layer)
    swept = layer is None and sweep
    with (progress_bar(f"layer sweep {prepared.name}", loaded.adapter.n_layers) if swept else nullcontext()) as update:
        fv, curve = fit_function_vector(loaded, prepared, means, aie, k=None if share else k, share=share,
                                         layer=layer, sweep=sweep, meta={"store": store, "scores": scores},
                                         progress=update)
    if curve is not None:
        png = layer_sweep_plot({prepared.name: curve}, plot or Path("out") / f"{prepared.name}_sweep.png")
        out.print(f"validation sweep: best layer {fv.layer} (accuracy {curve[fv.layer]:.2f}); plot: {png}")
        _warn_if_flat(prepared.name, curve)
    require_finite_vector(fv, "the fitted FV")  # never save a vector of norm nan
    path = atomic_save(fv.save, output or Path("out") / f"{prepared.name}.fv.safetensors", "FV")
    heads = ", ".join(f"({a},{b})" for a, b in fv.heads)
    out.print(f"FV for {prepared.name}: {len(fv.heads)} heads [{heads}], layer {fv.layer}, "
              f"norm {float(fv.vector.norm()):.3f} -> {path}")


def _fit_other(task: str, store: str, model: str, method: str, layer: int | None, scales: str | None,
               every_layer: bool | None, n_prompts: int | None, seed: int, output: Path | None, plot: Path | None,
               data_dir: str | None, remote: bool) -> None:
    """`fit --method task-vector|icv|mean-diff|pca`: the vector from the residual reads and its validation grid."""
    from fv_remote.baselines.builders import check_method
    from fv_remote.baselines.fit import fit_vector
    from fv_remote.baselines.residuals import load_residuals
    from fv_remote.core.plots import layer_sweep_plot
    from fv_remote.store.activations import ActivationStore

    check_method(method)
    check_output_path(output, "--out", "fv")
    check_output_path(plot, "--plot")
    tried = _parse_scales(scales, "--scales") if scales is not None else None
    act_store = ActivationStore(store)
    if not act_store.exists():
        raise UserError(f"no activation store at {store}; create it with `fv-remote residuals --task {task} --store "
                        f"{store}`")
    require_store(store)
    ex = executor(remote)
    loaded = load_stage(model, ex)
    prepared = _prepare(loaded, task, data_dir, seed)
    act_store.check_compatible(f"{prepared.name}/residual", {"model": loaded.model_id})
    reads = load_residuals(act_store, prepared.name, n_prompts)
    if layer is not None:
        loaded.adapter.check_layer(layer)
    # the grid's size is fit_vector's to decide: the bar learns its total from the first update
    with progress_bar(f"{method} sweep {prepared.name}", None) as update:
        vec, sweep = fit_vector(loaded, prepared, reads, method, layer=layer, scales=tried, every_layer=every_layer,
                                progress=update)
    vec.meta["store"] = store
    by_scale: dict[str, dict[int, float]] = {}
    for key, acc in sweep.items():
        where, scale = key.split("@")
        if where != "all":
            by_scale.setdefault(f"{prepared.name} x{scale}", {})[int(where)] = acc
    if by_scale and len(next(iter(by_scale.values()))) > 1:
        png = layer_sweep_plot(by_scale, plot or Path("out") / f"{prepared.name}_{method}_sweep.png")
        out.print(f"validation sweep plot: {png}")
    where = f"layers {vec.layer}-{loaded.adapter.n_layers - 1}" if "directions" in vec.meta else f"layer {vec.layer}"
    scale = vec.meta.get("scale", 1.0)
    out.print(f"validation: best {where}, scale {scale:g} (zero-shot accuracy {vec.meta['validation_accuracy']:.2f}"
              f" on {vec.meta['validation_prompts']} pairs; {len(sweep)} candidates)")
    require_finite_vector(vec, f"the fitted {method} vector")
    path = atomic_save(vec.save, output or Path("out") / f"{prepared.name}.{method}.safetensors", method)
    how = "patched in (replaces the last token's residual)" if vec.apply == "replace" else "added"
    out.print(f"{method} for {prepared.name} from {reads.n_prompts} paired prompts: {where}, {how}, norm "
              f"{float(vec.vector.norm()):.3f} -> {path}")


@app.command()
def steer(
    fv_path: Path = typer.Option(..., "--fv", help="FV/FFV file"),
    prompt: str = typer.Option(None, help="score the next token of this prompt"),
    task: str = typer.Option(None, help="or: zero-shot accuracy on this task's test pairs"),
    model: str = MODEL_OPT,
    layer: int = typer.Option(None, help="default: the layer stored in the FV file"),
    scale: float = typer.Option(1.0),
    distributed: bool = typer.Option(False, help="add each head's mean at its own layer instead"),
    seed: int = typer.Option(0),
    positions: str = typer.Option(None, "--positions", help=POSITIONS_HELP),
    top: int = typer.Option(5, help="next tokens to show for --prompt"),
    data_dir: str = DATA_DIR_OPT,
    remote: bool = REMOTE_OPT,
) -> None:
    """Add an FV to the residual stream and score: top next tokens of a prompt, or a task's zero-shot accuracy."""
    from fv_remote.fv.steering import Condition, Steer, score_conditions, top_tokens_conditions

    if (prompt is None) == (task is None):
        raise UserError("give exactly one of --prompt or --task")
    check_scale(scale)
    if prompt is not None and not prompt.strip():
        raise UserError("--prompt is empty; give the text whose next token to score, e.g. 'Q: hot\\nA:'")
    require_positive("--top", top)
    ex = executor(remote)
    loaded = load_stage(model, ex)
    vec = _load_vector(fv_path, loaded)
    if prompt is not None:
        check_prompt_lengths(loaded, [prompt], "--prompt")
        top = min(top, loaded.adapter.vocab_size)
    st = Steer(vec, layer=layer, scale=scale, distributed=distributed, positions=_positions(positions, vec))
    where = st.describe(loaded)
    if prompt is not None:
        table = Table("rank", "without", "p", f"with {vec.kind.upper()} ({where})", "p")
        (b_p, b_ids), (s_p, s_ids) = top_tokens_conditions(loaded, [Condition([prompt]), Condition([prompt], st)],
                                                           top)
        import torch

        if not (torch.isfinite(b_p).all() and torch.isfinite(s_p).all()):
            raise UserError(f"the forward pass {'with' if torch.isfinite(b_p).all() else 'without'} the vector "
                            f"gave NaN/inf probabilities (the model overflowed); try a smaller --scale")
        dec = loaded.tokenizer.decode
        for i in range(b_p.shape[1]):
            table.add_row(str(i + 1), repr(dec([int(b_ids[0, i])])), f"{float(b_p[0, i]):.3f}",
                          repr(dec([int(s_ids[0, i])])), f"{float(s_p[0, i]):.3f}")
        out.print(table)
        return
    prepared = _prepare(loaded, task, data_dir, seed)
    prompts = prepared.prompts("test", len(prepared.splits.test), kind="zero_shot", n_shots=0, seed_offset=2)
    texts, ids = [p.text for p in prompts], prepared.ids(prompts)
    before, after = score_conditions(loaded, [Condition(texts, None, ids), Condition(texts, st, ids)])
    out.print(f"{prepared.name}: zero-shot accuracy {before:.2f} -> {after:.2f} with the {vec.kind.upper()} "
              f"({where}) on {len(texts)} test pairs")


@app.command()
def generate(
    fv_path: Path = typer.Option(..., "--fv", help="FV/FFV file"),
    prompt: str = typer.Option(..., help="text to continue, e.g. 'Q: hot\\nA:' (\\n is understood)"),
    model: str = MODEL_OPT,
    layer: int = typer.Option(None),
    scale: float = typer.Option(1.0),
    distributed: bool = typer.Option(False),
    positions: str = typer.Option(None, "--positions", help=POSITIONS_HELP),
    max_new_tokens: int = typer.Option(12),
    remote: bool = REMOTE_OPT,
) -> None:
    """Greedy generation with and without the vector (at the prompt's last token, or with --positions all at every
    position of the prompt and of each generated token)."""
    from fv_remote.fv.steering import Steer, generate_many

    text = prompt.replace("\\n", "\n")
    if not text.strip():
        raise UserError("--prompt is empty; give the text to continue, e.g. 'Q: hot\\nA:'")
    require_positive("--max-new-tokens", max_new_tokens)
    check_scale(scale)
    ex = executor(remote)
    loaded = load_stage(model, ex)
    vec = _load_vector(fv_path, loaded)
    check_prompt_lengths(loaded, [text], "--prompt", reserve=max_new_tokens)
    st = Steer(vec, layer=layer, scale=scale, distributed=distributed, positions=_positions(positions, vec))
    without, steered = generate_many(loaded, [(text, None), (text, st)], max_new_tokens)
    out.print(f"[bold]prompt[/]: {text!r}")
    out.print(f"[bold]without[/]: {without!r}")
    out.print(f"[bold]with {vec.kind.upper()}[/] ({vec.task}; {st.describe(loaded)}): {steered!r}")


@app.command()
def evaluate(
    fv_path: Path = typer.Option(..., "--fv", help="FV (or FFV) file; its task is evaluated unless --task"),
    ffv_path: Path = typer.Option(None, "--ffv", help="also evaluate a fine-tuned vector (zero_shot_ffv column)"),
    task: str = typer.Option(None, "--task", "-t"),
    model: str = MODEL_OPT,
    layer: int = typer.Option(None, help="default: the layer stored in the FV file"),
    scale: float = typer.Option(1.0),
    distributed: bool = typer.Option(False),
    positions: str = typer.Option(None, "--positions", help=POSITIONS_HELP),
    sweep_scale: str = typer.Option(None, "--sweep-scale", help="scales to try on validation pairs, e.g. 1,2,4,8: "
                                    "the test columns use the best (replaces --scale; the JSON keeps the sweep)"),
    n_test: int = typer.Option(None, help="test queries (default: the test split, at most 200)"),
    n_shots: int = typer.Option(10),
    seed: int = typer.Option(0),
    sweep: bool = typer.Option(False, help="also sweep all layers on validation pairs (PNG)"),
    plot: Path = typer.Option(None, help="sweep PNG (default: out/<task>_sweep.png)"),
    json_path: Path = typer.Option(None, "--json", help="write results as JSON"),
    data_dir: str = DATA_DIR_OPT,
    remote: bool = REMOTE_OPT,
    no_wait: bool = typer.Option(False, "--no-wait", help="with --remote: submit, print the job id and return; "
                                 "`fv-remote jobs fetch ID` prints the table and writes --json/the plot later"),
) -> None:
    """Zero-shot and shuffled n-shot accuracy with and without the vector, plus n-shot ICL, on test pairs."""
    from fv_remote.fv.evaluate import best_scale, evaluate, scale_sweep
    from fv_remote.fv.steering import check_positions

    if n_test is not None and n_test <= 0:
        raise UserError(f"--n-test must be a positive integer, got {n_test}")
    ex = executor(remote, no_wait)
    check_output_path(json_path, "--json")
    check_output_path(plot, "--plot")
    check_scale(scale)
    if positions is not None:
        check_positions(positions)
    scales = _parse_scales(sweep_scale) if sweep_scale is not None else None
    if scales and no_wait:
        raise UserError("--sweep-scale cannot be combined with --no-wait: the test columns need the scale the "
                        "validation sweep chooses; run the sweep first (it is one request), then --no-wait with "
                        "--scale")
    loaded = load_stage(model, ex)
    vec = _load_vector(fv_path, loaded)
    positions = _positions(positions, vec)
    extra = {"ffv": _load_vector(ffv_path, loaded)} if ffv_path else None
    if layer is not None:
        loaded.adapter.check_layer(layer)
    prepared = _prepare(loaded, task or vec.task, data_dir, seed, n_shots)
    if n_test is not None:
        require_positive("--n-test", n_test)
        _note(prepared.count_note("--n-test", n_test, "test"))
    scale_scores = None
    if scales:
        with progress_bar(f"scale sweep ({positions})", len(scales)) as update:
            scale_scores = scale_sweep(loaded, prepared, vec, scales, layer=layer, positions=positions,
                                       distributed=distributed, progress=update)
        scale = best_scale(scale_scores)
        console.print("validation accuracy by scale (positions " + positions + "): " +
                      ", ".join(f"{s:g}: {a:.2f}" for s, a in scale_scores.items()) + f"; using {scale:g}")
    settings: dict[str, Any] = {"fv": str(fv_path), "ffv": str(ffv_path) if ffv_path else None, "scale": scale,
                "positions": positions, "distributed": distributed, "n_shots": n_shots, "seed": seed}
    if scale_scores is not None:
        settings["scale_sweep"] = {f"{s:g}": a for s, a in scale_scores.items()}
    report = {"model": loaded.model_id, "kind": vec.kind, "task": prepared.name, "settings": settings,
              "plot": str(plot or Path("out") / f"{prepared.name}_sweep.png") if sweep else None,
              "json": str(json_path) if json_path else None}
    with submits(report), progress_bar("evaluate" + (" + layer sweep" if sweep else ""), 1) as update:
        result = evaluate(loaded, prepared, vec, layer=layer, n_test=n_test, n_shots=n_shots, scale=scale,
                          distributed=distributed, extra_vectors=extra, sweep=sweep, positions=positions,
                          report=report, progress=update)
    show_evaluation(report, (result.scores, result.curve))
    for line in result.written:
        out.print(line)


def show_evaluation(report: dict, result: tuple) -> None:
    """The accuracy table of an evaluation (also `jobs fetch`'s reporter for an evaluate job)."""
    scores = result[0]
    how = report["settings"]
    chosen = " (best on validation)" if how.get("scale_sweep") else ""
    out.print(scores_table([scores.as_json()], title=f"{report['model']}: {report['kind'].upper()} at layer "
                                                     f"{scores.layer}, positions {how.get('positions', 'last')}, "
                                                     f"scale {how.get('scale', 1.0):g}{chosen}"))


@app.command()
def run(
    tasks_args: list[str] = typer.Argument(None, metavar="[TASK]...", help="tasks (or use --task)"),
    task: list[str] = typer.Option(None, "--task", "-t", help="task(s); repeat or comma-separate"),
    model: str = MODEL_OPT,
    data_dir: str = DATA_DIR_OPT,
    store: str = typer.Option(None, "--store", "-s", help="activation store (default: <out>/store.zarr)"),
    out_dir: Path = typer.Option(Path("out/run"), "--out", "-o", help="folder for FVs, plots and results"),
    n_prompts: int = typer.Option(100, help="clean prompts for mean activations"),
    n_cma_prompts: int = typer.Option(25, help="corrupted prompts for the AIE"),
    n_shots: int = typer.Option(10),
    k: int = typer.Option(10, help="top heads in the FV"),
    n_test: int = typer.Option(None, help="test queries per task (default: the test split, at most 200)"),
    seed: int = typer.Option(0),
    json_path: Path = typer.Option(None, "--json", help="write results as JSON"),
    remote: bool = typer.Option(False, "--remote", help="run on NDIF (--model is a Hub repo id): one request per "
                                "stage and task — extract, CMA, fit + layer sweep, evaluate (4 per task; a stage "
                                "with nothing left to compute sends none)"),
) -> None:
    """The whole pipeline per task: extract -> CMA -> FV -> layer sweep -> evaluation table."""
    from fv_remote.data import load_task
    from fv_remote.core.errors import require_positive
    from fv_remote.fv.pipeline import PipelineSettings, results_json, run_task, write_json
    from fv_remote.core.plots import layer_sweep_plot
    from fv_remote.store.activations import ActivationStore

    names = [t for entry in [*(task or []), *(tasks_args or [])] for t in entry.split(",") if t]
    if not names:
        raise UserError("give at least one task: fv-remote run --task antonym (see `fv-remote data list`)")
    for name, value in (("--n-prompts", n_prompts), ("--n-cma-prompts", n_cma_prompts), ("--k", k)):
        require_positive(name, value)
    check_output_path(json_path, "--json")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file; give a folder for the FVs, plots and results")
    check_output_path(out_dir / "results.json", "--out", "json")
    relations = [load_task(name, data_dir=data_dir) for name in names]  # fail fast on a bad name
    if n_test is not None:
        require_positive("--n-test", n_test)
    ex = executor(remote)
    loaded = load_stage(model, ex)
    from fv_remote.data.tasks import prepare_task

    for relation in relations:  # before any work: counts the data cannot supply (prompts would repeat)
        prepared = prepare_task(loaded.tokenizer, relation, seed=seed, min_pairs=n_shots + 2)
        for flag, n, split in (("--n-prompts", n_prompts, "train"), ("--n-cma-prompts", n_cma_prompts, "train"),
                               ("--n-test", n_test, "test")):
            if n is not None:
                _note(prepared.count_note(flag, n, split))

    settings = PipelineSettings(n_prompts=n_prompts, n_cma_prompts=n_cma_prompts, n_shots=n_shots, k=k, seed=seed,
                                n_test=n_test)
    require_store(store or str(out_dir / "store.zarr"), writing=True)
    act_store = ActivationStore(store or str(out_dir / "store.zarr"))
    runs = []
    for relation in relations:
        result = run_task(loaded, relation, act_store, out_dir, settings, progress=progress_bar)
        runs.append(result)
        r = result.scores
        console.print(f"[green]{r.task}[/]: zero-shot {r.zero_shot:.2f} -> {r.zero_shot_fv:.2f} with FV at layer "
                      f"{r.layer}; FV saved to {result.fv_path}")
        _warn_if_flat(r.task, result.sweep)
    data = results_json(loaded, runs, settings)
    out.print(scores_table(data["results"], title=f"{loaded.model_id}: function vectors ({k} heads)"))
    png = layer_sweep_plot({r.scores.task: r.sweep for r in runs}, out_dir / "layer_sweep.png",
                           baselines={r.scores.task: r.scores.zero_shot for r in runs})
    write_json(data, json_path or out_dir / "results.json")
    out.print(f"results: {json_path or out_dir / 'results.json'}; layer sweep: {png}; AIE heatmaps: "
              f"{out_dir}/<task>_aie.png")


# `jobs fetch` prints what the blocking commands print (storing the results is the stage's commit).
register_reporter("cma", show_cma)
register_reporter("evaluate", lambda report, result: show_evaluation(report, (result.scores, result.curve)))
