"""Head extraction: trace clean ICL prompts, store every head's output at chosen positions, and the model's answer.

The store then holds everything the offline fitting needs (means over correctly answered prompts).
"""

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace
from dataclasses import dataclass, field, replace
from typing import Any

import nnsight
import numpy as np
import torch
import xarray as xr

from fv_remote.data import PromptTemplate, RelationTask
from fv_remote.core.errors import UserError, require_positive
from fv_remote.execution import executor_of, run_stage, stage_session
from fv_remote.execution.stage import Stage, in_process
from fv_remote.plan.cost import (DTYPE_BYTES, RESULT_OVERHEAD, Dims, Plan, StageOptions, Trace, _batches,
                                  _prompt_tokens, sent_bytes, session_bytes, tensor_bytes)
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
                positions: tuple[int, ...] = (-1,)) -> dict[str, torch.Tensor]:
    """One forward over a batch: head outputs [B, P, L, H, Dh] and answer statistics at the last token, where the
    model's executor runs it (the one-batch case of `trace_heads_batches`)."""
    return trace_heads_batches(model, [(texts, answer_ids)], positions)[0]


def trace_heads_batches(model: LoadedModel, batches: list[tuple[list[str], list[int]]],
                        positions: tuple[int, ...] = (-1,), half: bool = False) -> list[dict[str, torch.Tensor]]:
    """The extract stage's body: head outputs and answer statistics for many (texts, answer_ids) batches, in one
    session (a single NDIF request on NDIF; plain local traces locally).

    The session body is shipped as source: it reads only plain values, envoys and `fv_remote.traces` helpers.
    `half`: the head outputs are rounded to float16 on the server (half the bytes of float32 to bring back).
    """
    ad, lm = model.adapter, model.lm
    sites = [ad.head_site(lm, layer) for layer in range(ad.n_layers)]
    unembed = ad.unembed(lm)
    n_heads, head_dim, pos = ad.n_heads, ad.head_dim, list(positions)
    jobs = [(list(texts), torch.tensor(ids, dtype=torch.long)) for texts, ids in batches]
    outs: list[dict[str, torch.Tensor]] = []
    session = executor_of(model).session
    with stage_session(model):
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


def _batch_dataset(start: int, prompts: list[tuple[str, str, str]], answer_ids, out, positions, ad) -> xr.Dataset:
    """One batch as a dataset; `prompts` are (text, query, answer) rows."""
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
            "query": ((PROMPT_DIM,), np.array([q for _, q, _ in prompts], dtype=object)),
            "answer": ((PROMPT_DIM,), np.array([a for _, _, a in prompts], dtype=object)),
            "text": ((PROMPT_DIM,), np.array([text for text, _, _ in prompts], dtype=object)),
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
class ExtractPlan:
    """What an extraction computes and where it goes: the prompts still missing, batched, and the store's identity
    of the task (checked again when the results are stored)."""

    task: str
    store: str  # the store's URL
    n_prompts: int
    n_shots: int
    batch_size: int
    positions: tuple[int, ...]
    identity: dict
    resumed_from: int  # prompts the store held when the run began
    starts: list[int]  # first prompt of each batch to compute (a local run's part: one batch)
    texts: list[str]  # prompts resumed_from .. n_prompts - 1
    queries: list[str]
    answers: list[str]
    answer_ids: list[int]
    reduce: str = "none"
    skipped: list = field(default_factory=list)  # (pair, reason) for answers without a usable first token
    open_store: Any = in_process()  # this run's ActivationStore (its writer lock); a fetched job reopens `store`

    def rows(self, lo: int) -> range:
        """Indices into texts/queries/answers of the batch that starts at prompt `lo`."""
        first = lo - self.resumed_from
        return range(first, min(first + self.batch_size, self.n_prompts - self.resumed_from))


REDUCTIONS = ("none", "float16")


def check_reduce(reduce: str, session: bool) -> None:
    """`reduce` is known, and asked for only where a session brings results back (`session`: the executor's)."""
    if reduce not in REDUCTIONS:
        raise UserError(f"unknown reduction {reduce!r}; use one of {', '.join(REDUCTIONS)}")
    if reduce != "none" and not session:
        raise UserError("--reduce shrinks what a remote extraction brings back: use it with --remote")


def plan_extract(model: LoadedModel, task: RelationTask, store: ActivationStore, n_prompts: int = 100,
                 n_shots: int = 10, seed: int = 0, batch_size: int = 16, positions: tuple[int, ...] = (-1,),
                 template: PromptTemplate | None = None, reduce: str = "none") -> ExtractPlan:
    """Prompts, store identity and the batches still missing (after checking and repairing the store)."""
    require_positive("n_prompts", n_prompts)
    require_positive("batch_size", batch_size)
    if n_shots < 0:
        raise UserError(f"n_shots must be >= 0, got {n_shots}")
    check_reduce(reduce, executor_of(model).session)
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
    with store.writing():
        store.check_compatible(task.name, identity)
        stored_reduce = store.attrs(task.name).get("remote_reduce", "none") if store.has_task(task.name) else reduce
        if stored_reduce != reduce:  # never half rounded: the values' precision is part of the task's identity
            raise UserError(f"store {store.url} task {task.name!r} was written with --reduce {stored_reduce}, not "
                            f"{reduce}; use another --store or the same settings")
        start = store.trim(task.name)
    todo = prompts[start:]
    return ExtractPlan(task.name, store.url, n_prompts, n_shots, batch_size, tuple(positions), identity, start,
                       list(range(start, n_prompts, batch_size)), [p.text for p in todo], [p.query for p in todo],
                       [p.answer for p in todo], [int(prepared.answer_token[p.answer]) for p in todo], reduce,
                       [[list(pair), reason] for pair, reason in prepared.problems], store)


class Extract(Stage[ExtractPlan, ExtractionResult]):
    """Head outputs of clean n-shot prompts into `<task>` of the store, batch by batch (each its commit point)."""

    name = "extract"
    plan_type = ExtractPlan
    result_key = "outs"

    def parts(self, plan: ExtractPlan) -> list[ExtractPlan]:
        return [replace(plan, starts=[lo]) for lo in plan.starts] or [plan]

    def body(self, model: LoadedModel, plan: ExtractPlan) -> list[dict[str, torch.Tensor]]:
        if not plan.starts:
            return []
        batches = [([plan.texts[i] for i in plan.rows(lo)], [plan.answer_ids[i] for i in plan.rows(lo)])
                   for lo in plan.starts]
        return trace_heads_batches(model, batches, plan.positions, half=plan.reduce == "float16")

    def commit(self, plan: ExtractPlan, outputs: list[dict], progress: Progress | None = None) -> ExtractionResult:
        """Append each batch (its own commit point). Storing twice is a no-op; a store that moved on since the plan
        was made (another run appended prompts) is refused rather than mixed."""
        store = plan.open_store or ActivationStore(plan.store)
        with store.writing():
            if plan.starts:
                store.check_compatible(plan.task, plan.identity)
                now = store.trim(plan.task)
                if now >= plan.n_prompts and now > plan.starts[0]:  # already stored (by this job, or a later run)
                    return self._result(plan, store, 0)
                if now != plan.starts[0]:
                    raise UserError(f"store {store.url} has {now} {plan.task!r} prompts but the job starts at prompt "
                                    f"{plan.starts[0]}: the store changed since it was submitted; nothing stored")
                if len(outputs) != len(plan.starts):
                    raise UserError(f"the job returned {len(outputs)} batches, expected {len(plan.starts)}; "
                                    "nothing stored")
            # the sizes a batch's dataset needs, from the identity (a fetched job has no model)
            ad = SimpleNamespace(n_layers=int(plan.identity["n_layers"]), n_heads=int(plan.identity["n_heads"]))
            for lo, out in zip(plan.starts, outputs):
                rows = plan.rows(lo)
                batch = [(plan.texts[i], plan.queries[i], plan.answers[i]) for i in rows]
                ids = [plan.answer_ids[i] for i in rows]
                store.append(plan.task, _batch_dataset(lo, batch, ids, out, plan.positions, ad), plan.identity)
                if progress:
                    progress(lo + len(batch), plan.n_prompts)
            return self._result(plan, store, store.n_complete(plan.task) - plan.resumed_from)

    @staticmethod
    def _result(plan: ExtractPlan, store: ActivationStore, n_new: int) -> ExtractionResult:
        ds = store.require(store.open(plan.task), plan.task, "correct")
        correct = store.finite_values(plan.task, ds["correct"])[:plan.n_prompts]
        accuracy = float(correct.mean()) if plan.n_prompts else 0.0
        skipped = [(tuple(pair), reason) for pair, reason in plan.skipped]
        return ExtractionResult(plan.task, store.n_complete(plan.task), max(n_new, 0), accuracy, skipped)

    def cost(self, dims: Dims, o: StageOptions) -> tuple[Plan, Any]:
        def make(n: int) -> Plan:
            return extract_cost(dims, n, o.tokens(), o.batch_size or 16, o.positions, DTYPE_BYTES[o.dtype], o.reduce)
        return make(o.n_prompts), make

    def summary(self, plan: ExtractPlan, result: ExtractionResult) -> str:
        return (f"{result.task}: {result.n_complete} prompts in {plan.store} ({result.n_new} new); "
                f"{plan.n_shots}-shot accuracy {result.accuracy:.2f}")


EXTRACT = Extract()


def extract(model: LoadedModel, task: RelationTask, store: ActivationStore, n_prompts: int = 100,
            n_shots: int = 10, seed: int = 0, batch_size: int = 16, positions: tuple[int, ...] = (-1,),
            template: PromptTemplate | None = None, progress: Progress | None = None,
            reduce: str = "none") -> ExtractionResult:
    """Trace `n_prompts` clean n-shot prompts built from the task's training split; resume where a run stopped.

    Runs where the model's executor says: locally batch by batch (each stored as it comes); on NDIF all missing
    batches in one request, stored once its results are back, so a failed request leaves the store as it was;
    with `NDIF(wait=False)` the request is submitted and `JobSubmitted` raised (its `job` stores the results later).
    `reduce="float16"` (remote only) rounds the head outputs to float16 on the server before they travel; the store
    records it (`remote_reduce` in the task's identity, so a store is never half rounded).
    """
    with store.writing():  # one writer per store for the whole run
        plan = plan_extract(model, task, store, n_prompts, n_shots, seed, batch_size, positions, template, reduce)
        return run_stage(EXTRACT, model, plan, progress)


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


# -- the cost model: what the body costs as one request (`fv-remote plan`) ------------------------------

def extract_cost(dims: Dims, n_prompts: int, prompt_tokens: int | list[int], batch_size: int = 16,
                 n_positions: int = 1, nbytes: int = 2, reduce: str = "none") -> Plan:
    """`extract --remote`: one forward per batch (all positions through the unembedding); per batch the head outputs
    [B, P, L, H, Dh] in the model's dtype, P(answer) (float32) and the top-1 token (int64) come back.

    `reduce`: what comes back instead with a server-side reduction: "float16" (`extract --remote --reduce
    float16`: the same values at 2 bytes) or "mean" (one [P, L, H, Dh] float32 mean: a what-if, not built)."""
    lengths = _prompt_tokens(prompt_tokens, n_prompts)
    traces = [Trace(rows, t, t, t) for rows, t in _batches(lengths, batch_size)]
    per_prompt = n_positions * dims.n_layers * dims.n_heads * dims.head_dim
    out_bytes = 2 if reduce == "float16" else nbytes
    if reduce == "mean":
        heads = tensor_bytes(per_prompt, 4)
    else:
        heads = sum(tensor_bytes(per_prompt * t.rows, out_bytes) for t in traces)
    returned = heads + sum(tensor_bytes(t.rows, 4) + tensor_bytes(t.rows, 8) for t in traces) + RESULT_OVERHEAD
    sent = session_bytes(trace_heads_batches, dims) + sum(sent_bytes(t.rows, 8) + t.rows * t.tokens * 4 for t in traces)
    return Plan("extract", n_prompts, "prompts", traces, sent, returned,
                extra_memory={"saved_results": heads},
                settings={"n_prompts": n_prompts, "batch_size": batch_size, "positions": n_positions,
                          "reduce": reduce})
