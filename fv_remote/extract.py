"""Head extraction: trace clean ICL prompts, store every head's output at chosen positions, and the model's answer.

The store then holds everything the offline fitting needs (means over correctly answered prompts).
"""

from __future__ import annotations

import hashlib
import json

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import nnsight
import numpy as np
import torch
import xarray as xr

from fv_remote.data import PromptTemplate, RelationTask
from fv_remote.errors import UserError, require_positive
from fv_remote.models import LoadedModel
from fv_remote.remote import remote_mode, stage_session
from fv_remote.store import PROMPT_DIM, ActivationStore
from fv_remote.tasks import prepare_task
from fv_remote.traces.heads import answer_stats, read_heads

Progress = Callable[[int, int], None]


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
                positions: tuple[int, ...] = (-1,), remote: Any = False) -> dict[str, torch.Tensor]:
    """One forward over a batch: head outputs [B, P, L, H, Dh] and answer statistics at the last token.

    `remote=True` runs it as one NDIF request, `remote="local"` as nnsight's in-process dry run of one.
    """
    if remote_mode(remote):
        return trace_heads_batches(model, [(texts, answer_ids)], positions, remote)[0]
    ad, lm = model.adapter, model.lm
    sites = [ad.head_site(lm, layer) for layer in range(ad.n_layers)]
    ids = torch.tensor(answer_ids, dtype=torch.long)
    with lm.trace(texts):
        heads = read_heads(sites, list(positions), ad.n_heads, ad.head_dim).save()
        logits = ad.unembed(lm).output[:, -1]
        prob, top1, _ = answer_stats(logits, ids.to(logits.device))
        prob, top1 = prob.save(), top1.save()
    return {"heads": heads.cpu(), "answer_prob": prob.cpu(), "top1": top1.cpu()}


def trace_heads_batches(model: LoadedModel, batches: list[tuple[list[str], list[int]]],
                        positions: tuple[int, ...] = (-1,), remote: Any = True) -> list[dict[str, torch.Tensor]]:
    """`trace_heads` for many (texts, answer_ids) batches in one session: a single NDIF request when remote.

    The session body is shipped as source: it reads only plain values, envoys and `fv_remote.traces` helpers.
    """
    ad, lm = model.adapter, model.lm
    sites = [ad.head_site(lm, layer) for layer in range(ad.n_layers)]
    unembed = ad.unembed(lm)
    n_heads, head_dim, pos = ad.n_heads, ad.head_dim, list(positions)
    jobs = [(list(texts), torch.tensor(ids, dtype=torch.long)) for texts, ids in batches]
    outs: list[dict[str, torch.Tensor]] = []
    session = bool(remote_mode(remote))
    with stage_session(model, remote):
        for texts, ids in jobs:
            with lm.trace(texts):
                heads = read_heads(sites, pos, n_heads, head_dim).save()
                logits = unembed.output[:, -1]
                prob, top1, _ = answer_stats(logits, ids.to(logits.device))
                prob, top1 = prob.save(), top1.save()
            outs.append({"heads": heads.cpu(), "answer_prob": prob.cpu(), "top1": top1.cpu()})
        if session:
            outs = nnsight.save(outs)
    return outs


def _batch_dataset(start: int, prompts, answer_ids, out, positions, ad) -> xr.Dataset:
    heads = out["heads"].float().numpy()
    n = heads.shape[0]
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


def extract(model: LoadedModel, task: RelationTask, store: ActivationStore, n_prompts: int = 100,
            n_shots: int = 10, seed: int = 0, batch_size: int = 16, positions: tuple[int, ...] = (-1,),
            template: PromptTemplate | None = None, progress: Progress | None = None,
            remote: Any = False) -> ExtractionResult:
    """Trace `n_prompts` clean n-shot prompts built from the task's training split; resume where a run stopped.

    With `remote` all missing batches go in one NDIF request; they are stored once its results are back, so a
    failed request leaves the store as it was.
    """
    require_positive("n_prompts", n_prompts)
    require_positive("batch_size", batch_size)
    if n_shots < 0:
        raise UserError(f"n_shots must be >= 0, got {n_shots}")
    ad = model.adapter
    prepared = prepare_task(model.tokenizer, task, seed=seed, template=template, min_pairs=n_shots + 1)
    template, answer_token, problems = prepared.template, prepared.answer_token, prepared.problems
    prompts = prepared.prompts("train", n_prompts, kind="clean", n_shots=n_shots)
    identity = {
        "model": model.model_id, "model_source": model.source, "revision": model.revision,
        "family": ad.family, "n_layers": ad.n_layers, "n_heads": ad.n_heads, "head_dim": ad.head_dim,
        "d_model": ad.d_model, "task": task.name, "task_source": task.source,
        "pairs_sha256": pairs_digest(task.pairs), "n_shots": n_shots,
        "seed": seed, "template": [template.query, template.answer, template.separator, template.prefix],
        "positions": list(positions), "kind": "clean",
    }
    store.check_compatible(task.name, identity)
    start = store.repair(task.name)
    n_new = 0
    starts = list(range(start, n_prompts, batch_size))
    remote_outs = None
    if remote_mode(remote) and starts:
        remote_outs = trace_heads_batches(
            model, [([p.text for p in prompts[lo:lo + batch_size]],
                     [answer_token[p.answer] for p in prompts[lo:lo + batch_size]]) for lo in starts],
            positions, remote)
    for i, lo in enumerate(starts):
        batch = prompts[lo:lo + batch_size]
        ids = [answer_token[p.answer] for p in batch]
        if remote_outs is not None:
            out = remote_outs[i]
        else:
            out = trace_heads(model, [p.text for p in batch], ids, positions)
        store.append(task.name, _batch_dataset(lo, batch, ids, out, positions, ad), identity)
        n_new += len(batch)
        if progress:
            progress(lo + len(batch), n_prompts)
    ds = store.open(task.name)
    accuracy = float(ds["correct"].values[:n_prompts].mean()) if n_prompts else 0.0
    return ExtractionResult(task.name, store.n_complete(task.name), n_new, accuracy, problems)


def mean_head_activations(store: ActivationStore, task: str, only_correct: bool = True) -> xr.DataArray:
    """Mean last-token head output over the stored prompts (by default only those the model answered right)."""
    ds = store.open(task)
    heads = ds["head_out"]
    if "position" in heads.dims:
        heads = heads.isel(position=-1)
    if only_correct:
        mask = ds["correct"].values.astype(bool)
        if not mask.any():
            raise UserError(f"the model answered none of the {ds.sizes[PROMPT_DIM]} stored {task!r} prompts "
                            "correctly; extract more prompts or use all prompts (only_correct=False)")
        heads = heads.isel({PROMPT_DIM: np.flatnonzero(mask)})
    return heads.mean(PROMPT_DIM).load()


def mean_heads_tensor(store: ActivationStore, task: str, only_correct: bool = True) -> torch.Tensor:
    """`mean_head_activations` as a float32 tensor [layer, head, d_head]."""
    return torch.from_numpy(np.asarray(mean_head_activations(store, task, only_correct).values, dtype=np.float32))
