"""`fv-remote residuals`: the residual-stream reads behind task vectors, ICV, mean-difference and PCA vectors."""

from __future__ import annotations

import typer

from fv_remote.cli.common import console, executor, load_stage, out, progress_bar, submits
from fv_remote.cli.extract_cmd import _note_counts
from fv_remote.cli.plan_cmd import PLAN_HELP, plan_instead
from fv_remote.cli.root import app
from fv_remote.models.loading import DEFAULT_MODEL


@app.command()
def residuals(
    task: str = typer.Option(..., "--task", "-t", help="bundled task name or a dataset .json"),
    store: str = typer.Option(..., "--store", "-s", help="Zarr store path or fsspec URL"),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="short name, repo id, folder or .gguf"),
    n_prompts: int = typer.Option(100, help="paired prompts (an n-shot prompt and the zero-shot prompt of its query)"),
    n_shots: int = typer.Option(10, help="demonstrations per n-shot prompt"),
    seed: int = typer.Option(0, help="seed for splits and prompts"),
    batch_size: int = typer.Option(16, help="prompts per forward pass"),
    data_dir: str = typer.Option(None, help="folder of Todd-format TASK.json files instead of bundled data"),
    remote: bool = typer.Option(False, "--remote", help="run on NDIF (one request; --model is a Hub repo id)"),
    no_wait: bool = typer.Option(False, "--no-wait", help="with --remote: submit, print the job id and return; "
                                 "`fv-remote jobs fetch ID` stores the results later"),
    plan: bool = typer.Option(False, "--plan", help=PLAN_HELP),
) -> None:
    """Store the last-token residual stream at every layer of n-shot prompts and of the zero-shot prompts of the same
    queries (resumable): what `fit --method task-vector|icv|mean-diff|pca` builds its vector from."""
    from fv_remote.baselines.residuals import read_residual_stream, residual_group
    from fv_remote.core.errors import require_positive
    from fv_remote.data import load_task
    from fv_remote.store.activations import ActivationStore
    from fv_remote.store.kind import require_store

    require_positive("--n-prompts", n_prompts)
    require_positive("--batch-size", batch_size)
    require_positive("--n-shots", n_shots)
    ex = executor(remote, no_wait)
    if plan:
        return plan_instead("residuals", model, n_prompts=n_prompts, n_shots=n_shots, batch_size=batch_size)
    require_store(store, writing=True)
    relation = load_task(task, data_dir=data_dir)
    loaded = load_stage(model, ex)
    _note_counts(loaded, relation, n_prompts, n_shots, seed)
    act_store = ActivationStore(store)
    done = act_store.n_complete(residual_group(relation.name))
    if done:
        console.print(f"resuming: {done} paired prompts already stored")
    with submits({}), progress_bar(f"residuals {relation.name}", n_prompts) as update:
        update(min(done, n_prompts), n_prompts)
        result = read_residual_stream(loaded, relation, act_store, n_prompts=n_prompts, n_shots=n_shots, seed=seed,
                                      batch_size=batch_size, progress=update)
    if no_wait:
        out.print(f"{relation.name}: all {result.n_complete} paired prompts already in {store}; nothing submitted")
        return
    ad = loaded.adapter
    out.print(f"{relation.name}: {result.n_complete} paired prompts in {store} ({result.n_new} new); {ad.n_layers} "
              f"layers x d_model {ad.d_model}; {n_shots}-shot accuracy {result.icl_accuracy:.2f}, zero-shot "
              f"{result.zero_shot_accuracy:.2f}")
