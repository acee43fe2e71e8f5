"""Head extraction: trace clean ICL prompts, store every head's output at chosen positions, and the model's answer.

The store then holds everything the offline fitting needs (means over correctly answered prompts).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import nnsight
import numpy as np
import torch
import xarray as xr

from fv_remote.data import PromptTemplate, RelationTask
from fv_remote.core.errors import UserError, require_positive
from fv_remote.execution import Target, job_details, resolve, stage_session
from fv_remote.models.loading import LoadedModel
from fv_remote.core.progress import Progress
from fv_remote.store.activations import PROMPT_DIM, ActivationStore
from fv_remote.data.tasks import prepare_task
from fv_remote.traces.heads import answer_stats, read_heads


@dataclass
class ExtractionResult:
    task: str
    n_complete: int
    n_new: int
    accuracy: float
    skipped_pairs: list = field(default_factory=list)  # (pair, reason) for answers without a usable first token


def pairs_digest(pairs) -> str:
    """Identity of a dataset's content, so two different files called `antonym` never mix in one store."""
    return hashlib.sha256(json.dumps([list(p) for p in pairs]).encode()).hexdigest()[:16]


def trace_heads(model: LoadedModel, texts: list[str], answer_ids: list[int],
                positions: tuple[int, ...] = (-1,), remote: Target = False) -> dict[str, torch.Tensor]:
    """One forward over a batch: head outputs [B, P, L, H, Dh] and answer statistics at the last token.

    The one-batch case of `trace_heads_batches` (locally; `remote=True`: one NDIF request; `"local"`: a dry run).
    """
    return trace_heads_batches(model, [(texts, answer_ids)], positions, remote)[0]


def trace_heads_batches(model: LoadedModel, batches: list[tuple[list[str], list[int]]],
                        positions: tuple[int, ...] = (-1,), remote: Target = True,
                        half: bool = False) -> list[dict[str, torch.Tensor]]:
    """The extract stage's body: head outputs and answer statistics for many (texts, answer_ids) batches, in one
    session (a single NDIF request when remote; plain local traces with `remote=False`).

    The session body is shipped as source: it reads only plain values, envoys and `fv_remote.traces` helpers.
    `half`: the head outputs are rounded to float16 on the server (half the bytes of float32 to bring back).
    """
    ad, lm = model.adapter, model.lm
    sites = [ad.head_site(lm, layer) for layer in range(ad.n_layers)]
    unembed = ad.unembed(lm)
    n_heads, head_dim, pos = ad.n_heads, ad.head_dim, list(positions)
    jobs = [(list(texts), torch.tensor(ids, dtype=torch.long)) for texts, ids in batches]
    outs: list[dict[str, torch.Tensor]] = []
    session = resolve(remote).session
    with stage_session(model, remote):
        for texts, ids in jobs:
            with lm.trace(texts):
                heads = read_heads(sites, pos, n_heads, head_dim)
                heads = heads.to(torch.float16).save() if half else heads.save()
                logits = unembed.output[:, -1]
                prob, top1, _ = answer_stats(logits, ids.to(logits.device))
                prob, top1 = prob.save(), top1.save()
            outs.append({"heads": heads.cpu(), "answer_prob": prob.cpu(), "top1": top1.cpu()})
        # Nothing else may travel back: unbind the body's other values (typed as they were bound).
        heads = prob = top1 = logits = _ = texts = ids = None  # type: ignore[assignment]
        if session:
            outs = nnsight.save(outs)
    return outs


def _batch_dataset(start: int, prompts, answer_ids, out, positions, ad) -> xr.Dataset:
    heads = out["heads"].float().numpy()
    n = heads.shape[0]
    head_var: tuple[tuple[str, ...], Any]
    if tuple(positions) == (-1,):
        head_var = ((PROMPT_DIM, "layer", "head", "d_head"), heads[:, 0])
    else:
        head_var = ((PROMPT_DIM, "position", "layer", "head", "d_head"), heads)
    top1 = out["top1"].numpy()
    ids = np.asarray(answer_ids, dtype=np.int64)
    coords: dict[str, Any] = {
        PROMPT_DIM: np.arange(start, start + n),
        "layer": np.arange(ad.n_layers),
        "head": np.arange(ad.n_heads),
    }
    if tuple(positions) != (-1,):
        coords["position"] = np.asarray(positions)
    return xr.Dataset(
        {
            "head_out": head_var,
            "answer_prob": ((PROMPT_DIM,), out["answer_prob"].float().numpy()),
            "top1_token": ((PROMPT_DIM,), top1.astype(np.int64)),
            "answer_token": ((PROMPT_DIM,), ids),
            "correct": ((PROMPT_DIM,), top1 == ids),
            "query": ((PROMPT_DIM,), np.array([p.query for p in prompts], dtype=object)),
            "answer": ((PROMPT_DIM,), np.array([p.answer for p in prompts], dtype=object)),
            "text": ((PROMPT_DIM,), np.array([p.text for p in prompts], dtype=object)),
        },
        coords=coords,
    )


def check_positions(model: LoadedModel, texts: list[str], positions: tuple[int, ...]) -> None:
    """Before any forward pass: every prompt fits the model's context, and every position (counted from the end,
    -1 = the last token) lies inside the shortest prompt."""
    from fv_remote.core.checks import check_prompt_lengths

    if not positions:
        raise UserError("--positions is empty; give token positions from the end such as -1 or -3,-2,-1")
    lengths = check_prompt_lengths(model, texts, "prompt")
    shortest = min(lengths) if lengths else 0
    for p in positions:
        if p >= 0:
            raise UserError(f"--positions counts from the end of the prompt (-1 = the last token), got {p}; "
                            "positions from the start differ between padded prompts")
        if -p > shortest:
            raise UserError(f"--positions {p} reaches before the start of the shortest prompt ({shortest} tokens); "
                            f"use positions between -{shortest} and -1")


@dataclass
class _Plan:
    prompts: list
    answer_token: dict
    problems: list
    identity: dict
    starts: list[int]


REDUCTIONS = ("none", "float16")


def check_reduce(reduce: str, remote: Target) -> None:
    if reduce not in REDUCTIONS:
        raise UserError(f"unknown reduction {reduce!r}; use one of {', '.join(REDUCTIONS)}")
    if reduce != "none" and not resolve(remote).session:
        raise UserError("--reduce shrinks what a remote extraction brings back: use it with --remote")


def _plan(model: LoadedModel, task: RelationTask, store: ActivationStore, n_prompts: int, n_shots: int, seed: int,
          batch_size: int, positions: tuple[int, ...], template: PromptTemplate | None,
          reduce: str = "none") -> _Plan:
    """Prompts, store identity and the batches still missing (after checking and repairing the store)."""
    require_positive("n_prompts", n_prompts)
    require_positive("batch_size", batch_size)
    if n_shots < 0:
        raise UserError(f"n_shots must be >= 0, got {n_shots}")
    ad = model.adapter
    prepared = prepare_task(model.tokenizer, task, seed=seed, template=template, min_pairs=n_shots + 1)
    template = prepared.template
    prompts = prepared.prompts("train", n_prompts, kind="clean", n_shots=n_shots)
    check_positions(model, [p.text for p in prompts], positions)
    identity = {
        "model": model.model_id, "model_source": model.source, "revision": model.revision,
        "family": ad.family, "n_layers": ad.n_layers, "n_heads": ad.n_heads, "head_dim": ad.head_dim,
        "d_model": ad.d_model, "task": task.name, "task_source": task.source,
        "pairs_sha256": pairs_digest(task.pairs), "n_shots": n_shots,
        "seed": seed, "template": [template.query, template.answer, template.separator, template.prefix],
        "positions": list(positions), "kind": "clean",
    }
    if reduce != "none":  # only then: stores written before reductions existed keep their identity
        identity["remote_reduce"] = reduce
    store.check_compatible(task.name, identity)
    stored_reduce = store.attrs(task.name).get("remote_reduce", "none") if store.has_task(task.name) else reduce
    if stored_reduce != reduce:  # never half rounded: the values' precision is part of the task's identity
        raise UserError(f"store {store.url} task {task.name!r} was written with --reduce {stored_reduce}, not "
                        f"{reduce}; use another --store or the same settings")
    start = store.trim(task.name)
    return _Plan(prompts, prepared.answer_token, prepared.problems, identity,
                 list(range(start, n_prompts, batch_size)))


def _store_batches(model: LoadedModel, task: RelationTask, store: ActivationStore, plan: _Plan, n_prompts: int,
                   batch_size: int, positions: tuple[int, ...], outs: list[dict] | None,
                   progress: Progress | None) -> ExtractionResult:
    """Trace (when `outs` is None) or take the remote results, and append each batch (its own commit point)."""
    ad = model.adapter
    n_new = 0
    for i, lo in enumerate(plan.starts):
        batch = plan.prompts[lo:lo + batch_size]
        ids = [plan.answer_token[p.answer] for p in batch]
        out = outs[i] if outs is not None else trace_heads(model, [p.text for p in batch], ids, positions)
        store.append(task.name, _batch_dataset(lo, batch, ids, out, positions, ad), plan.identity)
        n_new += len(batch)
        if progress:
            progress(lo + len(batch), n_prompts)
    ds = store.require(store.open(task.name), task.name, "correct")
    accuracy = float(store.finite_values(task.name, ds["correct"])[:n_prompts].mean()) if n_prompts else 0.0
    return ExtractionResult(task.name, store.n_complete(task.name), n_new, accuracy, plan.problems)


def _remote_batches(model: LoadedModel, plan: _Plan, batch_size: int) -> list[tuple[list[str], list[int]]]:
    return [([p.text for p in plan.prompts[lo:lo + batch_size]],
             [plan.answer_token[p.answer] for p in plan.prompts[lo:lo + batch_size]]) for lo in plan.starts]


def extract(model: LoadedModel, task: RelationTask, store: ActivationStore, n_prompts: int = 100,
            n_shots: int = 10, seed: int = 0, batch_size: int = 16, positions: tuple[int, ...] = (-1,),
            template: PromptTemplate | None = None, progress: Progress | None = None,
            remote: Target = False, reduce: str = "none") -> ExtractionResult:
    """Trace `n_prompts` clean n-shot prompts built from the task's training split; resume where a run stopped.

    With `remote` all missing batches go in one NDIF request; they are stored once its results are back, so a
    failed request leaves the store as it was. Under `fv_remote.execution.no_wait()` the request is submitted and
    `JobSubmitted` raised, its `details` saying how `store_remote_extraction` stores the results later.
    `reduce="float16"` (remote only) rounds the head outputs to float16 on the server before they travel; the store
    records it (`remote_reduce` in the task's identity, so a store is never half rounded).
    """
    check_reduce(reduce, remote)
    with store.writing():  # one writer per store for the whole run
        plan = _plan(model, task, store, n_prompts, n_shots, seed, batch_size, positions, template, reduce)
        remote_outs = None
        if resolve(remote).session and plan.starts:
            with job_details(stage="extract", task=task.name, store=store.url, n_prompts=n_prompts,
                             n_shots=n_shots, seed=seed, batch_size=batch_size, positions=list(positions),
                             template=plan.identity["template"], identity=plan.identity,
                             starts=plan.starts, result_key="outs", reduce=reduce):
                remote_outs = trace_heads_batches(model, _remote_batches(model, plan, batch_size), positions,
                                                  remote, half=reduce == "float16")
        return _store_batches(model, task, store, plan, n_prompts, batch_size, positions, remote_outs, progress)


def store_remote_extraction(model: LoadedModel, task: RelationTask, store: ActivationStore, outs: list[dict],
                            details: dict, progress: Progress | None = None) -> ExtractionResult:
    """Store a no-wait extraction's results (`outs`, from the job's saved values) exactly as `extract` would have.

    `details` are the ones `extract` put on `JobSubmitted`. Storing twice is a no-op; a store that moved on since
    the job was submitted (another run appended prompts) is refused rather than mixed.
    """
    with store.writing():
        n_prompts, batch_size = int(details["n_prompts"]), int(details["batch_size"])
        positions = tuple(details["positions"])
        template = PromptTemplate(*details["template"])
        starts = [int(x) for x in details["starts"]]
        if store.has_task(task.name) and store.n_complete(task.name) >= n_prompts and \
                store.n_complete(task.name) > starts[0]:
            ds = store.open(task.name)
            accuracy = float(ds["correct"].values[:n_prompts].mean())
            return ExtractionResult(task.name, store.n_complete(task.name), 0, accuracy, [])
        plan = _plan(model, task, store, n_prompts, int(details["n_shots"]), int(details["seed"]), batch_size,
                     positions, template, details.get("reduce", "none"))
        if plan.identity != details["identity"]:
            changed = sorted(k for k in plan.identity if plan.identity[k] != details["identity"].get(k))
            raise UserError(f"the job was submitted for other settings than these ({', '.join(changed)} differ); "
                            "nothing stored")
        if plan.starts != starts:
            raise UserError(f"store {store.url} has {store.n_complete(task.name)} {task.name!r} prompts but the job "
                            f"starts at prompt {starts[0]}: the store changed since it was submitted; nothing stored")
        if len(outs) != len(starts):
            raise UserError(f"the job returned {len(outs)} batches, expected {len(starts)}; nothing stored")
        return _store_batches(model, task, store, plan, n_prompts, batch_size, positions, outs, progress)


def mean_head_activations(store: ActivationStore, task: str, only_correct: bool = True) -> xr.DataArray:
    """Mean last-token head output over the stored prompts (by default only those the model answered right)."""
    ds = store.require(store.open(task), task, "head_out", "correct")
    heads = ds["head_out"]
    if "position" in heads.dims:
        heads = heads.isel(position=-1)
    if only_correct:
        mask = store.finite_values(task, ds["correct"]).astype(bool)
        if not mask.any():
            raise UserError(f"the model answered none of the {ds.sizes[PROMPT_DIM]} stored {task!r} prompts "
                            "correctly; extract more prompts or use all prompts (only_correct=False)")
        heads = heads.isel({PROMPT_DIM: np.flatnonzero(mask)})
    # Read once, checked: a damaged chunk or a NaN must be an error naming the prompts, not a NaN mean.
    values = store.finite_values(task, heads)
    return heads.copy(data=values).mean(PROMPT_DIM)


def mean_heads_tensor(store: ActivationStore, task: str, only_correct: bool = True) -> torch.Tensor:
    """`mean_head_activations` as a float32 tensor [layer, head, d_head]."""
    return torch.from_numpy(np.asarray(mean_head_activations(store, task, only_correct).values, dtype=np.float32))
