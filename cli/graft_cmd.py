"""`fv-remote graft ...`: fine-tune on invented facts, graft fine-tuned weights into the pretrained model, sweep.

Local only: grafting needs the pretrained and the fine-tuned weights in one forward pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table
from rich.text import Text

from fv_remote.cli.root import app
from fv_remote.cli.common import console, offline_if_local, out, placement, progress_bar
from fv_remote.models.loading import DEFAULT_MODEL

graft_app = typer.Typer(
    help="Weight grafting: where does fine-tuned relational knowledge live? (train, run, sweep; local only)",
    no_args_is_help=True,
)
app.add_typer(graft_app, name="graft")


def _default_out(model: str) -> Path:
    return Path("out") / "graft" / Path(model.rstrip("/")).name.replace(".gguf", "")


def _summary_row(table: Table, label: str, metrics) -> None:
    s = metrics.summary()
    table.add_row(Text(label), f"{s[f'top{metrics.k}']:.2f}", f"{s['top1']:.2f}", f"{s['mean_prob']:.3f}",
                  f"{s['median_rank']:.0f}", str(s["n"]))


def _metrics_table(title: str, k: int) -> Table:
    table = Table(title=Text(title), title_justify="left")
    for col in ("model / configuration", f"top-{k}", "top-1", "mean p(target)", "median rank", "n"):
        table.add_column(col, justify="left" if col == "model / configuration" else "right")
    return table


@graft_app.command("train")
def train_cmd(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="base model: short name, repo id, folder, .gguf"),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="folder for the fine-tuned model "
                                           "(default out/graft/MODEL)"),
    n_subjects: int = typer.Option(32, "--n-subjects", help="invented people"),
    relations: str = typer.Option("film", "--relations", help="comma-separated: film, hometown"),
    epochs: int = typer.Option(8, "--epochs"),
    lr: float = typer.Option(2e-4, "--lr"),
    batch_size: int = typer.Option(16, "--batch-size"),
    loss_on: str = typer.Option("all", "--loss-on", help="all tokens of a sentence, or only the object's"),
    freeze_embeddings: bool = typer.Option(False, "--freeze-embeddings",
                                           help="keep (tied) embeddings / unembedding at their pretrained values"),
    seed: int = typer.Option(0, "--seed"),
    k: int = typer.Option(5, "--k", help="top-k for accuracy"),
    allow_unchanged: bool = typer.Option(False, "--allow-unchanged", help="save the model even if training left "
                                         "its weights unchanged"),
) -> None:
    """Invent facts, fully fine-tune MODEL on them, save the result; report pretrained vs fine-tuned accuracy."""
    from fv_remote.core.errors import require_positive
    from fv_remote.grafting.finetune import TrainSettings, finetune, save_finetuned
    from fv_remote.grafting.graft import evaluate_model
    from fv_remote.grafting.synthetic import make_dataset
    from fv_remote.models.loading import load_model

    for name, value in (("--n-subjects", n_subjects), ("--epochs", epochs), ("--batch-size", batch_size),
                        ("--k", k)):
        require_positive(name, value)
    from fv_remote.core.checks import require_finite_option
    from fv_remote.core.unchanged import check_model_trained, weight_norms

    require_finite_option("--lr", lr)
    if not lr > 0:
        from fv_remote.core.errors import UserError

        raise UserError(f"--lr must be positive, got {lr:g}")
    offline_if_local(model)
    target = out_dir or _default_out(model)
    loaded = load_model(model, placement())
    dataset = make_dataset(n_subjects, [r.strip() for r in relations.split(",") if r.strip()], seed=seed,
                           tokenizer=loaded.tokenizer)
    heldout, seen = dataset.eval_prompts("heldout"), dataset.eval_prompts("train")
    console.print(f"{len(dataset.facts)} facts, {len(dataset.train_sentences())} training sentences, "
                  f"{len(heldout)} held-out prompts")
    before = {"heldout": evaluate_model(loaded.hf, loaded.tokenizer, heldout, k),
              "train_phrasings": evaluate_model(loaded.hf, loaded.tokenizer, seen, k)}
    settings = TrainSettings(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, loss_on=loss_on,
                             freeze_embeddings=freeze_embeddings)
    steps = -(-len(dataset.train_sentences()) // batch_size) * epochs
    start = weight_norms(loaded.hf)
    with progress_bar("fine-tuning", steps) as update:
        report = finetune(loaded.hf, loaded.tokenizer, dataset, settings, progress=update)
    check_model_trained(start, weight_norms(loaded.hf), report.step_losses, lr, allow_unchanged)
    after = {"heldout": evaluate_model(loaded.hf, loaded.tokenizer, heldout, k),
             "train_phrasings": evaluate_model(loaded.hf, loaded.tokenizer, seen, k)}
    evaluation = {f"{which}_{split}": m.summary() for which, res in (("pretrained", before), ("finetuned", after))
                  for split, m in res.items()}
    folder = save_finetuned(loaded.hf, loaded.tokenizer, dataset, target, base_model=model, report=report,
                            evaluation=evaluation)
    table = _metrics_table(f"{model}: {len(dataset.facts)} invented facts, {report.steps} steps in "
                           f"{report.seconds:.0f} s ({report.threads} threads)", k)
    _summary_row(table, "pretrained, held-out phrasings", before["heldout"])
    _summary_row(table, "fine-tuned, held-out phrasings", after["heldout"])
    _summary_row(table, "pretrained, training phrasings", before["train_phrasings"])
    _summary_row(table, "fine-tuned, training phrasings", after["train_phrasings"])
    out.print(table)
    out.print(f"loss per epoch: {', '.join(f'{x:.3f}' for x in report.losses)}")
    out.print(f"saved to {folder}")


def _load(model_dir: Path, base: Optional[str]):
    from fv_remote.grafting.finetune import load_pair
    from fv_remote.grafting.graft import Grafter

    offline_if_local(str(model_dir))
    if base:
        offline_if_local(base)
    else:
        from fv_remote.grafting.finetune import read_manifest

        offline_if_local(str(read_manifest(model_dir).get("base_model", "")))
    pretrained, finetuned, dataset, manifest = load_pair(model_dir, base)
    return Grafter(pretrained.hf, finetuned.hf, pretrained.tokenizer), dataset, manifest


def _prompts(dataset, split: str, limit: Optional[int], prompt: Optional[str], entity: Optional[str],
             target: Optional[str]):
    from fv_remote.core.errors import UserError
    from fv_remote.grafting.synthetic import GraftPrompt

    if prompt is not None:
        if not entity or not target:
            raise UserError("--prompt needs --entity (a substring of the prompt) and --target")
        start = prompt.find(entity)
        if start < 0:
            raise UserError(f"--entity {entity!r} does not occur in --prompt")
        return [GraftPrompt(prompt, target, start, start + len(entity))]
    prompts = dataset.eval_prompts(split)
    return prompts[:limit] if limit else prompts


@graft_app.command("run")
def run_cmd(
    model_dir: Path = typer.Option(..., "--model-dir", "-d", help="folder made by `graft train`"),
    positions: str = typer.Option("last", "--positions", "-p",
                                  help="entity, last, other, all, none; join with +, negate with not- / not(...)"),
    layers: str = typer.Option("all", "--layers", "-l", help="all, q1..q4, h1/h2, 5, 0-7, 0-3,10"),
    components: str = typer.Option("block", "--components", "-c",
                                   help="q,k,v,o,mlp,norms (attn = q,k,v,o; block = all of them)"),
    embed: bool = typer.Option(False, "--embed", help="also graft the input embeddings at --positions"),
    unembed: Optional[str] = typer.Option(None, "--unembed", help="graft final norm + LM head at these positions "
                                          "(e.g. last)"),
    base: Optional[str] = typer.Option(None, "--base", help="pretrained model (default: from graft.json)"),
    split: str = typer.Option("heldout", "--split", help="heldout or train phrasings"),
    limit: Optional[int] = typer.Option(None, "--limit", help="first N prompts only"),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="a custom prompt instead of the dataset"),
    entity: Optional[str] = typer.Option(None, "--entity", help="with --prompt: the first entity"),
    target: Optional[str] = typer.Option(None, "--target", help="with --prompt: the expected continuation"),
    k: int = typer.Option(5, "--k"),
    show: int = typer.Option(5, "--show", help="per-prompt rows to print"),
) -> None:
    """Run held-out prompts through the pretrained model with fine-tuned weights grafted in; compare."""
    from fv_remote.core.errors import require_positive
    from fv_remote.grafting.graft import GraftConfig, encode, parse_components, parse_layers

    require_positive("--k", k)
    grafter, dataset, _ = _load(model_dir, base)
    prompts = _prompts(dataset, split, limit, prompt, entity, target)
    config = GraftConfig(positions=positions, layers=layers, components=parse_components(components), embed=embed,
                         unembed=unembed)
    parse_layers(layers, grafter.adapter.n_layers)  # fail early on a bad expression
    results = {name: grafter.evaluate(prompts, cfg, k=k)
               for name, cfg in (("pretrained", "pretrained"), ("fine-tuned", "finetuned"), ("grafted", config))}
    table = _metrics_table(f"grafting {config.describe()}", k)
    for name, m in results.items():
        _summary_row(table, name, m)
    out.print(table)
    if show > 0:
        tok = grafter.tokenizer
        detail = Table(title="first prompts (grafted)", title_justify="left")
        for col in ("prompt", "entity tokens", "target", "rank", "p", "top-1"):
            detail.add_column(col)
        enc = encode(tok, prompts[:show])
        m = results["grafted"]
        for i, p in enumerate(prompts[:show]):
            ent = [tok.decode([int(t)]) for t, e in zip(enc.input_ids[i], enc.spans["entity"][i]) if e]
            detail.add_row(Text(p.text.replace("\n", "\\n")), Text("|".join(ent)), Text(p.target),
                           str(int(m.ranks[i])), f"{float(m.probs[i]):.3f}", Text(tok.decode([int(m.top_tokens[i])])))
        out.print(detail)


@graft_app.command("sweep")
def sweep_cmd(
    model_dir: Path = typer.Option(..., "--model-dir", "-d", help="folder made by `graft train`"),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="where to write sweep.{md,csv,json,png} "
                                           "(default MODEL_DIR/sweep)"),
    base: Optional[str] = typer.Option(None, "--base", help="pretrained model (default: from graft.json)"),
    groups: str = typer.Option("all,q1,q2,q3,q4", "--groups", help="layer-group columns"),
    split: str = typer.Option("heldout", "--split", help="heldout or train phrasings"),
    limit: Optional[int] = typer.Option(None, "--limit", help="first N prompts only"),
    k: int = typer.Option(5, "--k"),
    batch_size: int = typer.Option(32, "--batch-size"),
) -> None:
    """The pathway table: accuracy for the standard grafting configurations per layer group (+ PNG)."""
    from fv_remote.core.errors import UserError, require_positive
    from fv_remote.grafting.graft import layer_groups
    from fv_remote.grafting.sweep import STANDARD_PATHWAYS, layer_span, run_sweep

    require_positive("--k", k)
    require_positive("--batch-size", batch_size)
    grafter, dataset, manifest = _load(model_dir, base)
    names = [g.strip() for g in groups.split(",") if g.strip()]
    known = layer_groups(grafter.adapter.n_layers)
    bad = [g for g in names if g not in known]
    if bad or not names:
        raise UserError(f"unknown layer groups {bad}; use {', '.join(known)}")
    prompts = _prompts(dataset, split, limit, None, None, None)
    jobs = sum(len(names) if p.per_group else 1 for p in STANDARD_PATHWAYS)
    with progress_bar("sweeping", jobs) as update:
        result = run_sweep(grafter, prompts, groups=names, k=k, batch_size=batch_size,
                           progress=update)
    paths = result.save(out_dir or Path(model_dir) / "sweep")
    table = Table(title=Text(f"top-{k} accuracy, {len(prompts)} {split} prompts (mean p(target) below each)"),
                  title_justify="left")
    table.add_column("configuration")
    for col in result.columns:
        table.add_column(f"{col}\n{layer_span(result.column_layers[col])}", justify="right")
    for row in result.rows:
        table.add_row(Text(row), *[f"{result.metric(row, c):.2f} ({result.metric(row, c, 'mean_prob'):.2f})"
                                   for c in result.columns])
    out.print(table)
    train = manifest.get("train") or {}
    if train:
        out.print(f"fine-tuning took {train.get('seconds', 0):.0f} s ({train.get('steps')} steps)")
    out.print("wrote " + ", ".join(str(p) for p in paths.values()))

