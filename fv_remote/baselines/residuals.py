"""The residuals stage: the residual stream at the last token, at every layer, of paired prompts (a clean n-shot
prompt and the zero-shot prompt of the same query), appended batch by batch to the store's `<task>/residual` group
(resumable like head outputs). Every vector in `fv_remote.baselines.builders` is computed from these reads.

"Residual at layer L" is block L's output, exactly where steering adds or patches a vector (`traces.patching`), so a
vector built here is used at the same place it was read. Values are stored as float32: a bfloat16/float16 model's
activations are exact in float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any

import nnsight
import numpy as np
import torch
import xarray as xr

from fv_remote.core.errors import UserError, require_positive
from fv_remote.core.progress import Progress
from fv_remote.data import PromptTemplate, RelationTask
from fv_remote.data.tasks import prepare_task
from fv_remote.execution import executor_of, run_stage, stage_session
from fv_remote.execution.stage import Stage, in_process
from fv_remote.fv.extract import check_positions, pairs_digest
from fv_remote.models.loading import LoadedModel
from fv_remote.plan.cost import (RESULT_OVERHEAD, Dims, Plan, StageOptions, Trace, _batches, _prompt_tokens,
                                  sent_bytes, session_bytes, tensor_bytes)
from fv_remote.store.activations import PROMPT_DIM, ActivationStore
from fv_remote.traces.patching import read_residuals


def residual_group(task: str) -> str:
    """Store group of a task's residual reads."""
    return f"{task}/residual"


def trace_residual_batches(model: LoadedModel, batches: list[tuple[list[str], list[str]]]) -> list[dict]:
    """The stage's body: per (n-shot texts, zero-shot texts) batch, the last-token residual at every layer of each
    [B, L, d_model] (float32) and each prompt's top-1 next token; all batches in one session on NDIF.

    Reads only plain values, envoys and `fv_remote.traces` helpers (it travels as source)."""
    ad, lm = model.adapter, model.lm
    layers = [ad.layer(lm, layer) for layer in range(ad.n_layers)]
    is_tuple, unembed = ad.layer_output_is_tuple, ad.unembed(lm)
    outs: list[dict] = []
    session = executor_of(model).session
    with stage_session(model):
        for icl_texts, zero_texts in batches:
            with lm.trace(icl_texts):
                icl = read_residuals(layers, is_tuple).save()
                icl_top = unembed.output[:, -1].argmax(dim=-1).save()
            with lm.trace(zero_texts):
                zero = read_residuals(layers, is_tuple).save()
                zero_top = unembed.output[:, -1].argmax(dim=-1).save()
            outs.append({"icl": icl.cpu(), "zero_shot": zero.cpu(), "icl_top1": icl_top.cpu(),
                         "zero_top1": zero_top.cpu()})
        # Nothing else may travel back: unbind the body's other values (typed as they were bound).
        icl = zero = icl_top = zero_top = icl_texts = zero_texts = None  # type: ignore[assignment]
        if session:
            outs = nnsight.save(outs)
    return outs


@dataclass
class ResidualResult:
    task: str
    n_complete: int
    n_new: int
    icl_accuracy: float
    zero_shot_accuracy: float


@dataclass
class ResidualPlan:
    """The paired prompts still missing from `<task>/residual`, batched, and the group's identity."""

    task: str
    store: str
    n_prompts: int
    n_shots: int
    batch_size: int
    identity: dict
    resumed_from: int
    starts: list[int]  # first prompt of each batch to compute (a local run's part: one batch)
    icl_texts: list[str]  # prompts resumed_from .. n_prompts - 1
    zero_texts: list[str]
    queries: list[str]
    answers: list[str]
    answer_ids: list[int]
    skipped: list = field(default_factory=list)
    open_store: Any = in_process()

    def rows(self, lo: int) -> range:
        first = lo - self.resumed_from
        return range(first, min(first + self.batch_size, self.n_prompts - self.resumed_from))


def plan_residuals(model: LoadedModel, task: RelationTask, store: ActivationStore, n_prompts: int = 100,
                   n_shots: int = 10, seed: int = 0, batch_size: int = 16,
                   template: PromptTemplate | None = None) -> ResidualPlan:
    """Paired prompts (same queries from the training split), the group's identity and the batches still missing."""
    require_positive("n_prompts", n_prompts)
    require_positive("batch_size", batch_size)
    require_positive("n_shots", n_shots)  # the vectors are differences between prompts with and without demos
    ad = model.adapter
    prepared = prepare_task(model.tokenizer, task, seed=seed, template=template, min_pairs=n_shots + 1)
    template = prepared.template
    icl = prepared.prompts("train", n_prompts, kind="clean", n_shots=n_shots)
    zero = prepared.prompts("train", n_prompts, kind="zero_shot", n_shots=0)
    if [p.query for p in icl] != [p.query for p in zero]:  # build_prompts draws queries from the seed alone
        raise UserError(f"task {task.name!r}: the n-shot and zero-shot prompts do not share their queries")
    check_positions(model, [p.text for p in icl], (-1,))
    identity = {
        "model": model.model_id, "model_source": model.source, "revision": model.revision, "family": ad.family,
        "n_layers": ad.n_layers, "d_model": ad.d_model, "task": task.name, "task_source": task.source,
        "pairs_sha256": pairs_digest(task.pairs), "n_shots": n_shots, "seed": seed,
        "template": [template.query, template.answer, template.separator, template.prefix], "kind": "residual",
    }
    group = residual_group(task.name)
    with store.writing():
        store.check_compatible(group, identity)
        start = store.trim(group)
    return ResidualPlan(task.name, store.url, n_prompts, n_shots, batch_size, identity, start,
                        list(range(start, n_prompts, batch_size)), [p.text for p in icl[start:]],
                        [p.text for p in zero[start:]], [p.query for p in icl[start:]],
                        [p.answer for p in icl[start:]], [int(prepared.answer_token[p.answer]) for p in icl[start:]],
                        [[list(pair), reason] for pair, reason in prepared.problems], store)


def _batch_dataset(start: int, plan: ResidualPlan, rows: range, out: dict, n_layers: int) -> xr.Dataset:
    ids = np.asarray([plan.answer_ids[i] for i in rows], dtype=np.int64)
    n = len(ids)
    dims = (PROMPT_DIM, "layer", "d_model")
    return xr.Dataset(
        {
            "icl": (dims, out["icl"].float().numpy()),
            "zero_shot": (dims, out["zero_shot"].float().numpy()),
            "answer_token": ((PROMPT_DIM,), ids),
            "icl_correct": ((PROMPT_DIM,), out["icl_top1"].numpy() == ids),
            "zero_shot_correct": ((PROMPT_DIM,), out["zero_top1"].numpy() == ids),
            "query": ((PROMPT_DIM,), np.array([plan.queries[i] for i in rows], dtype=object)),
            "answer": ((PROMPT_DIM,), np.array([plan.answers[i] for i in rows], dtype=object)),
        },
        coords={PROMPT_DIM: np.arange(start, start + n), "layer": np.arange(n_layers)},
    )


class Residuals(Stage[ResidualPlan, ResidualResult]):
    """Last-token residual streams of paired n-shot and zero-shot prompts into `<task>/residual` (resumable), the
    reads behind task vectors, ICV, mean-difference and PCA vectors."""

    name = "residuals"
    plan_type = ResidualPlan
    result_key = "outs"

    def parts(self, plan: ResidualPlan) -> list[ResidualPlan]:
        return [replace(plan, starts=[lo]) for lo in plan.starts] or [plan]

    def body(self, model: LoadedModel, plan: ResidualPlan) -> list[dict]:
        batches = [([plan.icl_texts[i] for i in plan.rows(lo)], [plan.zero_texts[i] for i in plan.rows(lo)])
                   for lo in plan.starts]
        return trace_residual_batches(model, batches) if batches else []

    def commit(self, plan: ResidualPlan, outputs: list, progress: Progress | None = None) -> ResidualResult:
        """Append each batch (its own commit point); storing twice is a no-op, a store that moved on is refused."""
        store = plan.open_store or ActivationStore(plan.store)
        group = residual_group(plan.task)
        with store.writing():
            if plan.starts:
                store.check_compatible(group, plan.identity)
                now = store.trim(group)
                if now >= plan.n_prompts and now > plan.starts[0]:
                    return self._result(plan, store, 0)
                if now != plan.starts[0]:
                    raise UserError(f"store {store.url} has {now} {group!r} prompts but the job starts at prompt "
                                    f"{plan.starts[0]}: the store changed since it was submitted; nothing stored")
                if len(outputs) != len(plan.starts):
                    raise UserError(f"the job returned {len(outputs)} batches, expected {len(plan.starts)}; "
                                    "nothing stored")
            ad = SimpleNamespace(n_layers=int(plan.identity["n_layers"]))
            for lo, out in zip(plan.starts, outputs):
                rows = plan.rows(lo)
                store.append(group, _batch_dataset(lo, plan, rows, out, ad.n_layers), plan.identity)
                if progress:
                    progress(lo + len(rows), plan.n_prompts)
            return self._result(plan, store, store.n_complete(group) - plan.resumed_from)

    @staticmethod
    def _result(plan: ResidualPlan, store: ActivationStore, n_new: int) -> ResidualResult:
        group = residual_group(plan.task)
        ds = store.require(store.open(group), group, "icl_correct", "zero_shot_correct")
        icl = store.finite_values(group, ds["icl_correct"])[:plan.n_prompts]
        zero = store.finite_values(group, ds["zero_shot_correct"])[:plan.n_prompts]
        return ResidualResult(plan.task, store.n_complete(group), max(n_new, 0), float(icl.mean()),
                              float(zero.mean()))

    def cost(self, dims: Dims, o: StageOptions) -> tuple[Plan, Any]:
        def make(n: int) -> Plan:
            return residuals_cost(dims, n, o.tokens(), o.batch_size or 16)
        return make(o.n_prompts), make

    def summary(self, plan: ResidualPlan, result: ResidualResult) -> str:
        return (f"{result.task}: {result.n_complete} paired prompts in {plan.store} ({result.n_new} new); "
                f"{plan.n_shots}-shot accuracy {result.icl_accuracy:.2f}, zero-shot {result.zero_shot_accuracy:.2f}")


RESIDUALS = Residuals()


def read_residual_stream(model: LoadedModel, task: RelationTask, store: ActivationStore, n_prompts: int = 100,
                         n_shots: int = 10, seed: int = 0, batch_size: int = 16,
                         template: PromptTemplate | None = None,
                         progress: Progress | None = None) -> ResidualResult:
    """Store the last-token residual stream at every layer of `n_prompts` n-shot prompts and of the zero-shot
    prompts of the same queries (training split); resume where a run stopped. Locally batch by batch (each stored
    as it comes); on NDIF one request; with `NDIF(wait=False)` submitted (`JobSubmitted`)."""
    with store.writing():
        plan = plan_residuals(model, task, store, n_prompts, n_shots, seed, batch_size, template)
        return run_stage(RESIDUALS, model, plan, progress)


@dataclass
class ResidualReads:
    """Paired residual reads of a task: `icl` and `zero_shot` [N, L, d_model] float32, same queries row by row."""

    task: str
    icl: torch.Tensor
    zero_shot: torch.Tensor
    icl_correct: np.ndarray
    n_shots: int

    @property
    def n_prompts(self) -> int:
        return int(self.icl.shape[0])


def load_residuals(store: ActivationStore, task: str, n_prompts: int | None = None) -> ResidualReads:
    """The stored reads of `task` (the first `n_prompts`, default all), checked for damage and NaN."""
    group = residual_group(task)
    hint = f"fv-remote residuals --task {task} --store {store.url}"
    ds = store.require(store.open(group, hint=hint), group, "icl", "zero_shot", "icl_correct")
    n = ds.sizes[PROMPT_DIM]
    if n < 2:
        raise UserError(f"store {store.url} has {n} paired prompt(s) of {task!r}; a vector needs at least 2 "
                        f"(run `{hint} --n-prompts 100`)")
    if n_prompts is not None:
        require_positive("n_prompts", n_prompts)
        if n_prompts > n:
            raise UserError(f"store {store.url} has {n} paired prompts of {task!r}, not {n_prompts}; run `{hint} "
                            f"--n-prompts {n_prompts}` first")
        ds = ds.isel({PROMPT_DIM: slice(0, n_prompts)})
    icl = torch.from_numpy(np.asarray(store.finite_values(group, ds["icl"]), dtype=np.float32))
    zero = torch.from_numpy(np.asarray(store.finite_values(group, ds["zero_shot"]), dtype=np.float32))
    correct = np.asarray(store.finite_values(group, ds["icl_correct"]), dtype=bool)
    return ResidualReads(task, icl, zero, correct, int(store.attrs(group).get("n_shots", 0)))


# -- the cost model ------------------------------------------------------------------------------------------------

def residuals_cost(dims: Dims, n_prompts: int, prompt_tokens: int | list[int], batch_size: int = 16) -> Plan:
    """`residuals --remote`: per batch one forward of the n-shot prompts and one of the (short) zero-shot prompts;
    back come [B, L, d_model] float32 twice and two top-1 ids per prompt."""
    lengths = _prompt_tokens(prompt_tokens, n_prompts)
    shots = [Trace(rows, t, t, t) for rows, t in _batches(lengths, batch_size)]
    zero_len = max(4, min(lengths) // 10) if lengths else 4  # a zero-shot prompt: one query, no demonstrations
    traces = shots + [Trace(t.rows, zero_len, zero_len, zero_len) for t in shots]
    reads = sum(tensor_bytes(t.rows * dims.n_layers * dims.d_model, 4) for t in traces)
    returned = reads + sum(tensor_bytes(t.rows, 8) for t in traces) + RESULT_OVERHEAD
    sent = session_bytes(trace_residual_batches, dims) + sum(sent_bytes(t.rows, 8) + t.rows * t.tokens * 4
                                                             for t in traces)
    return Plan("residuals", n_prompts, "prompts", traces, sent, returned, extra_memory={"saved_results": reads},
                settings={"n_prompts": n_prompts, "batch_size": batch_size})
