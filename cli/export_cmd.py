"""`export` (a vector -> llama.cpp control-vector GGUF) and `import` (a control vector -> a steering vector)."""

from __future__ import annotations

from pathlib import Path

import typer

from fv_remote.core.checks import check_output_path, check_scale, require_finite_option
from fv_remote.cli.root import app
from fv_remote.cli.common import console, executor, load_stage, out
from fv_remote.core.errors import UserError
from fv_remote.models.loading import DEFAULT_MODEL


@app.command("export")
def export(
    output: Path = typer.Option(..., "--out", "-o", help="control-vector GGUF to write (a sidecar note goes to "
                                "OUT.json)"),
    fv_path: Path = typer.Option(None, "--fv", help="an FV or FFV file (or an imported control vector)"),
    bank_path: Path = typer.Option(None, "--bank", help="or: a relation bank, with --entry, --cfv or --weights"),
    entry: str = typer.Option(None, "--entry", help="with --bank: the relation whose FFV to export"),
    cfv: str = typer.Option(None, "--cfv", help="with --bank: A:B, the composite FV of this example pair "
                            "(weights from the model's relation profile, softmax with --temperature)"),
    weights: str = typer.Option(None, "--weights", help="with --bank: a composite FV with these weights, e.g. "
                                "antonym=0.5,synonym=0.5"),
    temperature: float = typer.Option(1.0, help="with --cfv: softmax temperature of the CFV weights"),
    layer: int = typer.Option(None, help="with --fv: export at this layer instead of the file's"),
    distributed: bool = typer.Option(False, help="with --fv: the per-head vectors (needs --per-layer-sum)"),
    per_layer_sum: bool = typer.Option(False, "--per-layer-sum", help="with --distributed: write each layer's sum of "
                                       "head vectors at that layer's output (an approximation)"),
    scale: float = typer.Option(None, help="the scale to use in llama.cpp (recorded in the note and the file; the "
                                "direction is written at scale 1)"),
    evaluation: Path = typer.Option(None, "--evaluation", help="take the scale from an `evaluate --positions all "
                                    "--sweep-scale ... --json FILE` of this vector"),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="the model the vector is for"),
    remote: bool = typer.Option(False, "--remote", help="--model is an NDIF-hosted repo: use its weightless copy "
                                "(sizes and model type only; --cfv needs local weights)"),
) -> None:
    """Write an FV / FFV / CFV / bank entry as a llama.cpp control vector (GGUF, `--control-vector-scaled`).

    fv-remote's layer L is the output of block L, which is where llama.cpp adds direction.L: the index is kept.
    llama.cpp adds it at every position; `fv-remote evaluate --positions all --sweep-scale` shows what that does
    and finds its scale.
    """
    from fv_remote.export import llamacpp as ex

    sources = [x for x in (fv_path, bank_path) if x is not None]
    if len(sources) != 1:
        raise UserError("give exactly one of --fv FILE or --bank FILE (with --entry, --cfv or --weights)")
    picks = [x for x in (entry, cfv, weights) if x is not None]
    if bank_path is not None and len(picks) != 1:
        raise UserError("with --bank give exactly one of --entry NAME, --cfv A:B or --weights NAME=W,...")
    if fv_path is not None and picks:
        raise UserError("--entry, --cfv and --weights go with --bank, not --fv")
    if fv_path is None and (layer is not None or distributed):
        raise UserError("--layer and --distributed go with --fv")
    if per_layer_sum and not distributed:
        raise UserError("--per-layer-sum goes with --distributed")
    if scale is not None and evaluation is not None:
        raise UserError("give --scale or --evaluation, not both")
    if cfv is not None and remote:
        raise UserError("--cfv computes the weights with the model's forward passes, which run locally only; use "
                        "--weights with --remote")
    if scale is not None:
        check_scale(scale)  # llama.cpp stores it as float32: 1e308 does not fit
    require_finite_option("--temperature", temperature)
    if not str(output).endswith(".gguf"):
        raise UserError(f"--out {output}: a control vector is a .gguf file; name it e.g. {output}.gguf")
    check_output_path(output, "--out", "gguf")
    check_output_path(ex.sidecar_path(output), "--out (its sidecar note)", "json")

    loaded = load_stage(model, executor(remote))
    if fv_path is not None:
        from fv_remote.cli.common import load_vector as _load_vector

        vec = _load_vector(fv_path, loaded)
        if layer is not None:
            loaded.adapter.check_layer(layer)
        exp = ex.from_vector(vec, str(fv_path), layer=layer, distributed=distributed, per_layer_sum=per_layer_sum)
        at_layer = layer if layer is not None else vec.layer
    else:
        from fv_remote.relational.bank import RelationBank

        bank = RelationBank.load(bank_path)
        bank.check_model(loaded)
        at_layer = None
        if entry is not None:
            exp = ex.from_bank_entry(bank, entry, str(bank_path))
        elif weights is not None:
            exp = ex.from_weights(bank, ex.parse_weights(bank, weights), f"weights {weights}", str(bank_path))
        else:
            exp = _cfv_export(loaded, bank, cfv, temperature, str(bank_path))
    if evaluation is not None:
        if at_layer is None:
            raise UserError("--evaluation goes with --fv (an evaluation of that file)")
        from fv_remote.core.kinds import kind_of, wrong_kind

        if kind_of(evaluation) not in ("json", "text"):
            raise wrong_kind(evaluation, "an `fv-remote evaluate --json` file")
        scale, scale_source = ex.scale_from_evaluation(evaluation, fv_path, at_layer)
        check_scale(scale, f"--evaluation {evaluation}: its scale")
    elif scale is not None:
        scale_source = "given with --scale"
    else:
        scale, scale_source = 1.0, ("none chosen (1.0 assumed): find one with `fv-remote evaluate --positions all "
                                    "--sweep-scale 1,2,4,8` and pass --scale or --evaluation")
    path = ex.write_control_vector(output, exp, loaded, scale, scale_source)
    layers = sorted(exp.directions)
    where = f"layer {layers[0]}" if len(layers) == 1 else f"{len(layers)} layers ({', '.join(map(str, layers))})"
    if exp.approximation:
        console.print(f"[yellow]note: an approximation: {exp.approximation}[/]")
    if scale_source.startswith("none"):
        console.print(f"[yellow]note: no scale chosen; {scale_source}[/]")
    out.print(f"{exp.kind.upper()} {exp.task} -> {path} (direction at {where}, added at every position; "
              f"scale {scale:g}); note: {ex.sidecar_path(path)}")
    out.print(f"llama.cpp: llama-cli -m MODEL.gguf --control-vector-scaled {path} {scale:g}")


def _cfv_export(loaded, bank, pair: str, temperature: float, source: str):
    from fv_remote.export import llamacpp as ex
    from fv_remote.relational.analogy import AnalogySettings, cfv_weights, relation_profile

    a, sep, b = pair.partition(":")
    if not sep or not a.strip() or not b.strip():
        raise UserError(f"--cfv takes an example pair A:B (e.g. hot:cold), got {pair!r}")
    settings = AnalogySettings(temperature=temperature).check()
    logp = relation_profile(loaded, bank, [(a.strip(), b.strip())], settings)
    weights = cfv_weights(logp, temperature)[0]
    return ex.from_weights(bank, weights, f"{a.strip()}:{b.strip()}", source)


@app.command("import")
def import_(
    path: Path = typer.Argument(..., help="a llama.cpp / repeng control vector (.gguf)"),
    output: Path = typer.Option(..., "--out", "-o", help="steering vector file to write (.fv.safetensors)"),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="the model to steer with it"),
    task: str = typer.Option(None, "--task", "-t", help="the task it is for (what `evaluate` scores by default)"),
    remote: bool = typer.Option(False, "--remote", help="--model is an NDIF-hosted repo (weightless copy)"),
) -> None:
    """Read a llama.cpp control vector as a steering vector: `steer`, `generate` and `evaluate` then add it at every
    position by default (llama.cpp's rule), each direction at its own layer."""
    from fv_remote.export import llamacpp as ex
    from fv_remote.core.checks import atomic_save

    check_output_path(output, "--out", "fv")
    loaded = load_stage(model, executor(remote))
    vec = ex.import_control_vector(path, loaded, task)
    saved = atomic_save(vec.save, output, "vector")
    layers = sorted(ex.directions(vec))
    where = f"layer {layers[0]}" if len(layers) == 1 else f"{len(layers)} layers ({layers[0]}-{layers[-1]})"
    hint = vec.meta.get("exported_scale")
    scale = f"; the file recommends scale {hint:g} (--scale {hint:g})" if isinstance(hint, (int, float)) else ""
    out.print(f"{vec.kind.upper()} {vec.task}: {where}, norm {float(vec.vector.norm()):.3f}, positions all{scale} "
              f"-> {saved}")
