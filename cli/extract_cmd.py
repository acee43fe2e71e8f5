"""`fv-remote extract`: trace every head on clean ICL prompts into the activation store."""

from __future__ import annotations

import typer

from fv_remote.cli.root import app
from fv_remote.cli.common import console, executor, load_stage, out, progress_bar, submits
from fv_remote.cli.plan_cmd import PLAN_HELP, plan_instead
from fv_remote.models.loading import DEFAULT_MODEL


def _positions(text: str) -> tuple[int, ...]:
    from fv_remote.core.errors import UserError

    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--positions takes comma-separated integers such as -1 or -3,-2,-1, got {text!r}") from None
    if any(v >= 0 for v in values):
        raise UserError(f"--positions counts from the end of the prompt (-1 = the last token), got {text!r}")
    if len(set(values)) != len(values):
        raise UserError(f"--positions lists a position twice: {text!r}")
    return values


def _note_counts(loaded, relation, n_prompts: int, n_shots: int, seed: int) -> None:
    from fv_remote.data.tasks import MAX_PROMPTS, prepare_task

    if n_prompts > MAX_PROMPTS:
        from fv_remote.core.errors import UserError

        raise UserError(f"--n-prompts {n_prompts}: at most {MAX_PROMPTS} prompts per run (each prompt is a forward "
                        f"pass and a row of every head's output); ask for fewer")
    note = prepare_task(loaded.tokenizer, relation, seed=seed, min_pairs=n_shots + 1).count_note("--n-prompts",
                                                                                                 n_prompts)
    if note:
        console.print(f"[yellow]note: {note}[/]")


@app.command()
def extract(
    task: str = typer.Option(..., "--task", "-t", help="bundled task name or a dataset .json"),
    store: str = typer.Option(..., "--store", "-s", help="Zarr store path or fsspec URL"),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="short name, repo id, folder or .gguf"),
    n_prompts: int = typer.Option(100, help="clean prompts to trace"),
    n_shots: int = typer.Option(10, help="demonstrations per prompt"),
    seed: int = typer.Option(0, help="seed for splits and prompts"),
    batch_size: int = typer.Option(16, help="prompts per forward pass"),
    positions: str = typer.Option("-1", help="token positions from the end, comma-separated"),
    data_dir: str = typer.Option(None, help="folder of Todd-format TASK.json files instead of bundled data"),
    remote: bool = typer.Option(False, "--remote", help="run on NDIF (one request; --model is a Hub repo id)"),
    no_wait: bool = typer.Option(False, "--no-wait", help="with --remote: submit, print the job id and return; "
                                 "`fv-remote jobs fetch ID` stores the results later"),
    reduce: str = typer.Option("none", help="with --remote: none, or float16 (head outputs rounded on the server: "
                               "half the bytes of float32 come back; recorded in the store)"),
    plan: bool = typer.Option(False, "--plan", help=PLAN_HELP),
) -> None:
    """Trace every attention head's output on clean n-shot prompts into the store (resumable)."""
    from fv_remote.data import load_task
    from fv_remote.core.errors import require_positive
    from fv_remote.fv.extract import extract as run_extract
    from fv_remote.store.activations import ActivationStore

    require_positive("--n-prompts", n_prompts)
    require_positive("--batch-size", batch_size)
    ex = executor(remote, no_wait)
    pos = _positions(positions)
    if plan:
        return plan_instead("extract", model, n_prompts=n_prompts, n_shots=n_shots, batch_size=batch_size,
                            positions=len(pos), reduce=reduce)
    from fv_remote.fv.extract import check_reduce

    check_reduce(reduce, ex.session)
    from fv_remote.store.kind import require_store

    require_store(store, writing=True)
    relation = load_task(task, data_dir=data_dir)
    loaded = load_stage(model, ex)
    _note_counts(loaded, relation, n_prompts, n_shots, seed)
    act_store = ActivationStore(store)
    done = act_store.n_complete(relation.name)
    if done:
        console.print(f"resuming: {done} prompts already stored")
    with submits({}), progress_bar(f"extract {relation.name}", n_prompts) as update:
        update(min(done, n_prompts), n_prompts)
        result = run_extract(loaded, relation, act_store, n_prompts=n_prompts, n_shots=n_shots, seed=seed,
                             batch_size=batch_size, positions=pos, progress=update, reduce=reduce)
    if no_wait:
        out.print(f"{relation.name}: all {result.n_complete} prompts already in {store}; nothing submitted")
        return
    for pair, reason in result.skipped_pairs:
        console.print(f"[yellow]skipped pair {pair[0]!r} -> {pair[1]!r}: {reason}[/]")
    ad = loaded.adapter
    out.print(f"{relation.name}: {result.n_complete} prompts in {store} ({result.n_new} new); "
              f"{ad.n_layers} layers x {ad.n_heads} heads x {ad.head_dim}; "
              f"{n_shots}-shot accuracy {result.accuracy:.2f}"
              + (f"; {len(result.skipped_pairs)} pairs skipped (no usable first answer token)"
                 if result.skipped_pairs else "")
              + ("; head outputs rounded to float16 on the server" if reduce == "float16" else ""))
