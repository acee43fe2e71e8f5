"""The CMA stage: the average indirect effect (AIE) of each head on shuffled-label prompts, appended per prompt
to the store's `<task>/cma` group (resumable), and read back as the AIE. The per-prompt algorithms (fast exact
mediation as one session body, and the references) are in `fv_remote.fv.cma_methods`; `run_cma(..., method=
"attribution")` stores the first-order gradient estimate instead (fv_remote.fv.attribution), and `method="lrp"` /
`"lrp_attention"` AttnLRP relevances on clean prompts (fv_remote.fv.lrp).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import xarray as xr

from fv_remote.fv.cma_methods import (CMA_FUNCTIONS, FAST_MAX_COPIES, METHODS, Heads, _copies_supported, all_heads,
                                   cma_fast_session, cma_prompt_cached_batch, cma_prompt_fast,
                                   cma_prompt_invoke_per_head, cma_prompt_naive, fast_groups, plan_groups,
                                   session_effects)
from fv_remote.core.errors import UserError, require_positive
from fv_remote.execution import Target, job_details, resolve, saved_result
from fv_remote.models.loading import LoadedModel
from fv_remote.core.progress import Progress
from fv_remote.store.activations import PROMPT_DIM, ActivationStore
from fv_remote.data.tasks import PreparedTask

# The per-prompt methods are part of this stage's API (`cma.cma_prompt_fast`, `cma.plan_groups`, ...).
__all__ = ["CMA_FUNCTIONS", "FAST_MAX_COPIES", "METHODS", "SOURCES", "CMAResult", "Heads", "PromptScorer",
           "_copies_supported", "all_heads", "cma_fast_session", "cma_group", "cma_prompt_cached_batch",
           "cma_prompt_fast", "cma_prompt_invoke_per_head", "cma_prompt_naive", "fast_groups", "load_aie",
           "plan_groups", "run_cma", "run_head_scores", "session_effects", "store_remote_cma"]


SOURCES = ("cma", "attribution", "lrp", "lrp_attention")


def cma_group(task: str, source: str = "cma") -> str:
    """Store group of a task's per-prompt head scores: `<task>/cma` (exact), `<task>/attribution`, `<task>/lrp`..."""
    if source not in SOURCES:
        raise UserError(f"unknown head-score source {source!r}; use one of {', '.join(SOURCES)}")
    return f"{task}/{source}"


@dataclass
class CMAResult:
    task: str
    aie: xr.DataArray  # (layer, head)
    n_prompts: int
    n_new: int


PromptScorer = Callable[[LoadedModel, str, int, torch.Tensor], tuple[float, torch.Tensor]]


def run_cma(model: LoadedModel, prepared: PreparedTask, store: ActivationStore, means: torch.Tensor,
            n_prompts: int = 25, n_shots: int = 10, method: str = "fast",
            progress: Progress | None = None, remote: Target = False) -> CMAResult:
    """Indirect effects of every head on `n_prompts` shuffled-label prompts, appended to `<task>/cma` (resumable).

    `method="attribution"` stores the gradient estimate instead, in `<task>/attribution` (see fv_remote.fv.attribution).
    `remote=True` (NDIF) or `"local"` (dry run) computes all missing prompts in one request (`cma_fast_session`;
    method "fast" only) and stores them once the results are back. Under `fv_remote.execution.no_wait()` the request
    is submitted and `JobSubmitted` raised, its `details` saying how `store_remote_cma` stores the results later.
    """
    from fv_remote.fv import lrp

    batch = None
    if resolve(remote).session:
        if method in lrp.METHODS:
            raise UserError(lrp.REMOTE_REFUSAL.format(method=method))
        if method != "fast":
            raise UserError(f"remote CMA runs the fast method only, not {method!r}")

        def batch(jobs: list[tuple[str, int]]) -> list[tuple[float, torch.Tensor]]:
            with job_details(stage="cma", result_key="results", n_heads=len(all_heads(model)),
                             groups=fast_groups(model, all_heads(model))):
                return cma_fast_session(model, jobs, means, remote=remote)
    if method == "attribution":
        from fv_remote.fv.attribution import attribution_prompt

        return run_head_scores(model, prepared, store, means, attribution_prompt, "attribution", method,
                               n_prompts, n_shots, progress)
    if method in lrp.METHODS:
        return run_head_scores(model, prepared, store, means, lrp.prompt_scorer(model, prepared, method), method,
                               method, n_prompts, n_shots, progress, kind="clean")
    if method not in CMA_FUNCTIONS:
        raise UserError(f"unknown CMA method {method!r}; use one of "
                        f"{', '.join([*CMA_FUNCTIONS, 'attribution', *lrp.METHODS])}")
    return run_head_scores(model, prepared, store, means, CMA_FUNCTIONS[method], "cma", method, n_prompts, n_shots,
                           progress, batch=batch)


def run_head_scores(model: LoadedModel, prepared: PreparedTask, store: ActivationStore, means: torch.Tensor,
                    fn: PromptScorer, source: str, method: str, n_prompts: int = 25, n_shots: int = 10,
                    progress: Progress | None = None,
                    batch: Callable[[list[tuple[str, int]]], list[tuple[float, torch.Tensor]]] | None = None,
                    kind: str = "shuffled") -> CMAResult:
    """Score every head on each shuffled-label prompt (or `kind` prompt) with `fn`; append per prompt to
    `<task>/<source>`. With `batch`, all missing prompts are scored by one call (one remote request) before anything
    is stored. For "clean" prompts the stored `p_corrupted` is what `fn` returns first (LRP: the answer logit).
    """
    require_positive("n_prompts", n_prompts)
    ad = model.adapter
    group = cma_group(prepared.name, source)
    # Corrupted queries come from the training split, like the clean prompts that gave the means.
    prompts = prepared.prompts("train", n_prompts, kind=kind, n_shots=n_shots, seed_offset=1)
    identity = {"model": model.model_id, "task": prepared.name, "n_layers": ad.n_layers, "n_heads": ad.n_heads,
                "head_dim": ad.head_dim, "n_shots": n_shots, "seed": prepared.seed, "kind": kind,
                "template": [prepared.template.query, prepared.template.answer, prepared.template.separator,
                             prepared.template.prefix]}
    from fv_remote.core.checks import check_prompt_lengths

    check_prompt_lengths(model, [p.text for p in prompts], "corrupted prompt")
    with store.writing():  # one writer per store for the whole run
        store.check_compatible(group, identity)
        start = store.trim(group)
        jobs = [(p.text, prepared.answer_token[p.answer]) for p in prompts]
        rows = [(p.query, p.answer, p.text) for p in prompts]
        with job_details(task=prepared.name, store=store.url, source=source, method=method,
                         n_prompts=n_prompts, n_shots=n_shots, start=start, identity=identity,
                         rows=[list(r) for r in rows[start:]]):
            done = batch(jobs[start:]) if batch is not None and start < n_prompts else None
        for i in range(start, n_prompts):
            scored = done[i - start] if done is not None else fn(model, *jobs[i], means)
            _append_scores(store, group, identity, method, i, rows[i], scored)
            if progress:
                progress(i + 1, n_prompts)
        return CMAResult(prepared.name, load_aie(store, prepared.name, n_prompts, source=source), n_prompts,
                         n_prompts - start)


def _append_scores(store: ActivationStore, group: str, identity: dict, method: str, i: int,
                   row: tuple[str, str, str], scored: tuple[float, torch.Tensor]) -> None:
    """Append prompt `i` (query, answer, text) and its head scores to `<task>/<source>`."""
    base, effects = scored
    n_layers, n_heads = int(identity["n_layers"]), int(identity["n_heads"])
    query, answer, text = row
    ds = xr.Dataset(
        {
            "indirect_effect": ((PROMPT_DIM, "layer", "head"),
                                effects.reshape(1, n_layers, n_heads).float().numpy()),
            "p_corrupted": ((PROMPT_DIM,), np.array([base], dtype=np.float32)),
            "query": ((PROMPT_DIM,), np.array([query], dtype=object)),
            "answer": ((PROMPT_DIM,), np.array([answer], dtype=object)),
            "text": ((PROMPT_DIM,), np.array([text], dtype=object)),
        },
        coords={PROMPT_DIM: [i], "layer": np.arange(n_layers), "head": np.arange(n_heads)},
    )
    store.append(group, ds, {**identity, "method": method})


def store_remote_cma(store: ActivationStore, saved: dict, details: dict,
                     progress: Progress | None = None) -> CMAResult:
    """Store a no-wait CMA's results (the job's saved values) exactly as `run_cma` would have.

    `details` are the ones `run_cma` put on `JobSubmitted` (prompts, identity, where the store stood). Storing
    twice is a no-op; a store that moved on since the job was submitted (another run appended prompts) is refused
    rather than mixed. Needs no model: the job file says everything.
    """
    task, source, method = details["task"], details.get("source", "cma"), details.get("method", "fast")
    n_prompts, start = int(details["n_prompts"]), int(details["start"])
    identity, rows = details["identity"], [tuple(r) for r in details["rows"]]
    group = cma_group(task, source)
    with store.writing():
        store.check_compatible(group, identity)
        now = store.trim(group)
        if now >= n_prompts and now > start:  # already stored (by this job, or a run that caught up)
            return CMAResult(task, load_aie(store, task, n_prompts, source=source), n_prompts, 0)
        if now != start:
            raise UserError(f"store {store.url} has {now} {group!r} prompts but the job starts at prompt {start}: "
                            "the store changed since it was submitted; nothing stored")
        results = saved_result(saved, details, "results", "the CMA job's")
        done = session_effects(results, [list(g) for g in details["groups"]], int(details["n_heads"]))
        if len(done) != len(rows) or len(rows) != n_prompts - start:
            raise UserError(f"the job returned {len(done)} prompts, expected {n_prompts - start}; nothing stored")
        for i in range(start, n_prompts):
            _append_scores(store, group, identity, method, i, rows[i - start], done[i - start])
            if progress:
                progress(i + 1, n_prompts)
        return CMAResult(task, load_aie(store, task, n_prompts, source=source), n_prompts, n_prompts - start)


def load_aie(store: ActivationStore, task: str, n_prompts: int | None = None, source: str = "auto") -> xr.DataArray:
    """AIE per (layer, head): the mean indirect effect over the stored corrupted prompts.

    `source`: "cma" (exact), "attribution" (gradient estimate), "lrp" / "lrp_attention" (AttnLRP relevance, not
    an effect on P(answer): only its ranking compares) or "auto" (exact where stored, else attribution).
    """
    if source == "auto":
        source = "attribution" if (not store.has_task(cma_group(task))
                                   and store.has_task(cma_group(task, "attribution"))) else "cma"
    ds = store.open(cma_group(task, source), hint=f"fv-remote cma --task {task} --store {store.url}"
                    + (f" --method {source}" if source != "cma" else ""))
    if n_prompts is not None:
        ds = ds.isel({PROMPT_DIM: slice(0, n_prompts)})
    effects = store.require(ds, cma_group(task, source), "indirect_effect")["indirect_effect"]
    # Read once, checked: a damaged chunk or a NaN must be an error naming the prompts, not a NaN AIE.
    values = store.finite_values(cma_group(task, source), effects)
    return effects.copy(data=values).mean(PROMPT_DIM)
