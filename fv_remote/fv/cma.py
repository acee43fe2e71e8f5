"""The CMA stage: the average indirect effect (AIE) of each head on shuffled-label prompts, appended per prompt
to the store's `<task>/cma` group (resumable), and read back as the AIE. The per-prompt algorithms (fast exact
mediation as one session body, and the references) are in `fv_remote.fv.cma_methods`; `run_cma(..., method=
"attribution")` stores the first-order gradient estimate instead (fv_remote.fv.attribution), and `method="lrp"` /
`"lrp_attention"` AttnLRP relevances on clean prompts (fv_remote.fv.lrp).
"""

from __future__ import annotations

from collections.abc import Callable
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from fv_remote.fv.cma_methods import (CMA_FUNCTIONS, FAST_MAX_COPIES, METHODS, Heads, _copies_supported, all_heads,
                                   cma_fast_session, cma_prompt_cached_batch, cma_prompt_fast,
                                   cma_prompt_invoke_per_head, cma_prompt_naive, fast_groups, plan_groups,
                                   session_effects)
from fv_remote.core.errors import UserError, require_positive
from fv_remote.execution import executor_of, run_stage
from fv_remote.execution.stage import Stage, in_process
from fv_remote.plan.cost import (DTYPE_BYTES, RESULT_OVERHEAD, Dims, Plan, StageOptions, Trace, _merge, _prompt_tokens,
                                  sent_bytes, session_bytes, tensor_bytes)
from fv_remote.models.loading import LoadedModel
from fv_remote.core.progress import Progress
from fv_remote.store.activations import PROMPT_DIM, ActivationStore
from fv_remote.data.tasks import PreparedTask

# The per-prompt methods are part of this stage's API (`cma.cma_prompt_fast`, `cma.plan_groups`, ...).
__all__ = ["CMA_FUNCTIONS", "FAST_MAX_COPIES", "METHODS", "SOURCES", "CMAResult", "Heads", "PromptScorer",
           "_copies_supported", "all_heads", "cma_fast_session", "cma_group", "cma_prompt_cached_batch",
           "cma_prompt_fast", "cma_prompt_invoke_per_head", "cma_prompt_naive", "fast_groups", "load_aie",
           "plan_groups", "run_cma", "run_head_scores", "session_effects", "CMA_STAGE", "CMAPlan"]


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
    heatmap: Path | None = None  # the AIE heatmap the stage drew (when asked to)


PromptScorer = Callable[[LoadedModel, str, int, torch.Tensor], tuple[float, torch.Tensor]]


@dataclass
class CMAPlan:
    """Which prompts to score, how, and where the scores go: `<task>/<source>` of the store, from prompt `start`."""

    task: str
    store: str  # the store's URL
    source: str  # the group: cma (exact), attribution, lrp, lrp_attention
    method: str
    n_prompts: int
    n_shots: int
    start: int  # prompts the group held when the run began
    identity: dict
    rows: list[list[str]]  # (query, answer, text) of prompts start .. n_prompts - 1
    answer_ids: list[int]
    groups: list[list[int]]  # the fast method's grouping of heads (how a session's results are laid out)
    n_heads: int  # heads scored per prompt
    first: int = -1  # a local run's part: the one prompt it scores (-1: all from `start`)
    plot: str | None = None  # where to draw the AIE heatmap once every prompt is stored (None: nowhere)
    means: Any = in_process()  # mean head outputs [layer, head, d_head] (what the body patches in)
    scorer: Any = in_process()  # a local method's per-prompt scorer (`PromptScorer`)
    open_store: Any = in_process()  # this run's ActivationStore (its writer lock); a fetched job reopens `store`

    def todo(self) -> range:
        return range(self.start, self.n_prompts) if self.first < 0 else range(self.first, self.first + 1)


class CMA(Stage[CMAPlan, "CMAResult"]):
    """Per-prompt head scores appended to `<task>/<source>` (resumable): on a session (NDIF, dry run) the fast
    exact mediation of all missing prompts in one request; locally prompt by prompt with the plan's method."""

    name = "cma"
    plan_type = CMAPlan
    result_key = "results"

    def parts(self, plan: CMAPlan) -> list[CMAPlan]:
        return [replace(plan, first=i) for i in range(plan.start, plan.n_prompts)] or [plan]

    def body(self, model: LoadedModel, plan: CMAPlan) -> list[tuple[float, torch.Tensor]]:
        jobs = [(plan.rows[i - plan.start][2], plan.answer_ids[i - plan.start]) for i in plan.todo()]
        if not jobs:
            return []
        if executor_of(model).session:
            return cma_fast_session(model, jobs, plan.means)
        return [plan.scorer(model, text, answer_id, plan.means) for text, answer_id in jobs]

    def outputs_from_saved(self, plan: CMAPlan, saved: dict) -> list[tuple[float, torch.Tensor]]:
        return session_effects(super().outputs_from_saved(plan, saved), plan.groups, plan.n_heads)

    def commit(self, plan: CMAPlan, outputs: list, progress: Progress | None = None) -> CMAResult:
        """Append each prompt's scores. Storing twice is a no-op; a store that moved on since the plan was made
        (another run appended prompts) is refused rather than mixed."""
        store = plan.open_store or ActivationStore(plan.store)
        group = cma_group(plan.task, plan.source)
        todo = plan.todo()
        with store.writing():
            store.check_compatible(group, plan.identity)
            now = store.trim(group)
            if len(todo) and now >= plan.n_prompts and now > todo[0]:  # already stored (this job, or a later run)
                return self._result(plan, store, 0)
            if len(todo) and now != todo[0]:
                raise UserError(f"store {store.url} has {now} {group!r} prompts but the job starts at prompt "
                                f"{todo[0]}: the store changed since it was submitted; nothing stored")
            if len(outputs) != len(todo):
                raise UserError(f"the job returned {len(outputs)} prompts, expected {len(todo)}; nothing stored")
            for i, scored in zip(todo, outputs):
                row = plan.rows[i - plan.start]
                _append_scores(store, group, plan.identity, plan.method, i, (row[0], row[1], row[2]), scored)
                if progress:
                    progress(i + 1, plan.n_prompts)
            return self._result(plan, store, store.n_complete(group) - plan.start)

    @staticmethod
    def _result(plan: CMAPlan, store: ActivationStore, n_new: int) -> CMAResult:
        result = CMAResult(plan.task, load_aie(store, plan.task, plan.n_prompts, source=plan.source), plan.n_prompts,
                           max(n_new, 0))
        todo = plan.todo()
        if plan.plot and (not len(todo) or todo[-1] == plan.n_prompts - 1):  # the run's last part
            from fv_remote.core.plots import cma_heatmap

            result.heatmap = cma_heatmap(result, plan.plot, str(plan.identity.get("model", "")))
        return result

    def cost(self, dims: Dims, o: StageOptions) -> tuple[Plan, Any]:
        def make(n: int) -> Plan:
            return cma_cost(dims, n, o.tokens(), DTYPE_BYTES[o.dtype], o.max_copies)
        return make(o.n_prompts), make

    def summary(self, plan: CMAPlan, result: CMAResult) -> str:
        return f"{result.task}: {result.n_prompts} corrupted prompts ({result.n_new} new) in {plan.store}" + \
            (f"; heatmap: {result.heatmap}" if result.heatmap else "")


CMA_STAGE = CMA()


def run_cma(model: LoadedModel, prepared: PreparedTask, store: ActivationStore, means: torch.Tensor,
            n_prompts: int = 25, n_shots: int = 10, method: str = "fast",
            progress: Progress | None = None, plot: str | Path | None = None) -> CMAResult:
    """Indirect effects of every head on `n_prompts` shuffled-label prompts, appended to `<task>/cma` (resumable).

    `method="attribution"` stores the gradient estimate instead, in `<task>/attribution` (see fv_remote.fv.attribution);
    "lrp"/"lrp_attention" AttnLRP relevances on clean prompts (local only). Where the model's executor is a session
    (NDIF, dry run) all missing prompts are one request (method "fast" only), stored once the results are back;
    with `NDIF(wait=False)` the request is submitted and `JobSubmitted` raised (its `job` stores them later).
    `plot`: where to draw the AIE heatmap once every prompt is stored.
    """
    from fv_remote.fv import lrp

    if executor_of(model).session:
        if method in lrp.METHODS:
            raise UserError(lrp.REMOTE_REFUSAL.format(method=method))
        if method != "fast":
            raise UserError(f"remote CMA runs the fast method only, not {method!r}")
    if method == "attribution":
        from fv_remote.fv.attribution import attribution_prompt

        return run_head_scores(model, prepared, store, means, attribution_prompt, "attribution", method,
                               n_prompts, n_shots, progress, plot=plot)
    if method in lrp.METHODS:
        return run_head_scores(model, prepared, store, means, lrp.prompt_scorer(model, prepared, method), method,
                               method, n_prompts, n_shots, progress, kind="clean", plot=plot)
    if method not in CMA_FUNCTIONS:
        raise UserError(f"unknown CMA method {method!r}; use one of "
                        f"{', '.join([*CMA_FUNCTIONS, 'attribution', *lrp.METHODS])}")
    return run_head_scores(model, prepared, store, means, CMA_FUNCTIONS[method], "cma", method, n_prompts, n_shots,
                           progress, plot=plot)


def run_head_scores(model: LoadedModel, prepared: PreparedTask, store: ActivationStore, means: torch.Tensor,
                    fn: PromptScorer, source: str, method: str, n_prompts: int = 25, n_shots: int = 10,
                    progress: Progress | None = None, kind: str = "shuffled",
                    plot: str | Path | None = None) -> CMAResult:
    """Score every head on each shuffled-label prompt (or `kind` prompt) with `fn` (locally; a session runs the fast
    mediation); append per prompt to `<task>/<source>`. For "clean" prompts the stored `p_corrupted` is what `fn`
    returns first (LRP: the answer logit).
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
        todo = prompts[start:]
        session = executor_of(model).session
        plan = CMAPlan(prepared.name, store.url, source, method, n_prompts, n_shots, start, identity,
                       [[p.query, p.answer, p.text] for p in todo],
                       [int(prepared.answer_token[p.answer]) for p in todo],
                       fast_groups(model, all_heads(model)) if session else [], len(all_heads(model)),
                       plot=str(plot) if plot else None, means=means, scorer=fn, open_store=store)
        return run_stage(CMA_STAGE, model, plan, progress)


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


# -- the cost model: what the body costs as one request (`fv-remote plan`) ------------------------------

def cma_groups(dims: Dims, max_copies: int = 256) -> list[list[tuple[int, int]]]:
    """The copies forwards `cma_methods.cma_fast_session` makes per prompt: `fast_groups`' grouping of all heads
    (by the cost model when one prompt forward serves every group; as few groups as possible with sliding windows)."""
    from fv_remote.fv.cma_methods import plan_groups

    heads = [(layer, head) for layer in range(dims.n_layers) for head in range(dims.n_heads)]
    head_cost = dims.vocab * dims.d_model / max(dims.layer_params, 1)
    costs = {"fixed": 1e12, "weights": 0.0} if dims.sliding else {}
    return [[heads[i] for i in g] for g in plan_groups(heads, dims.n_layers, head_cost, max_copies=max_copies,
                                                       **costs)]


def cma_cost(dims: Dims, n_prompts: int, prompt_tokens: int | list[int], nbytes: int = 2, max_copies: int = 256,
             mask_bytes: int = 1) -> Plan:
    """`cma --remote` (fast exact CMA, one session): per prompt and group of R patched heads, one forward of the
    prompt (logits at its last token only) and one of R last-token copies that attend to the prompt's cached keys
    and values, from the group's lowest patched layer up (logits at every copy). Sent per group: the copies' ids,
    position ids, mask [R, T + R] (`mask_bytes`: 1 for SDPA's boolean mask, the dtype's size for eager) and each
    patched head's float32 mean; back: P(answer) per copy and the unpatched P(answer) per prompt. The body shares
    what does not depend on the prompt (a pickle writes an object once): the means once per group, a mask and
    position ids once per (prompt length, R), the copies' ids once per prompt and R (counted as if no two prompts
    ended on the same token)."""
    lengths = _prompt_tokens(prompt_tokens, n_prompts)
    groups = cma_groups(dims, max_copies)
    sizes = sorted({len(g) for g in groups})
    traces, sent, returned = [], session_bytes(cma_fast_session, dims), RESULT_OVERHEAD
    for g in groups:
        n_layers = len({layer for layer, _ in g})
        sent += sent_bytes(2 * len(g), 8, 2 * n_layers) + sent_bytes(len(g) * dims.head_dim, 4, n_layers)
    for t, n in Counter(lengths).items():  # prompts of one length cost the same
        sent += n * (sent_bytes(t, 8) + sum(sent_bytes(r, 8) for r in sizes))
        sent += sum(sent_bytes(r * (t + r), mask_bytes) + sent_bytes(r, 8) for r in sizes)
        returned += n * tensor_bytes(1, 4)
        for i, g in enumerate(groups):
            r, first = len(g), min(layer for layer, _ in g)
            if i == 0 or dims.sliding:  # the prompt forward: once per prompt, or per group with sliding windows
                traces.append(Trace(1, t, t, 1, count=n))
            traces.append(Trace(1, r, t + r, r, first=first, count=n))
            returned += n * tensor_bytes(r, 4)
    t_max, r_max = max(lengths), max(len(g) for g in groups)
    kv_prompt = 2 * dims.n_layers * dims.n_kv_heads * dims.head_dim * t_max * nbytes
    return Plan("cma", n_prompts, "prompts", _merge(traces), sent, returned,
                extra_memory={"kv_cache": kv_prompt},
                settings={"n_prompts": n_prompts, "heads": dims.n_layers * dims.n_heads, "groups": len(groups),
                          "max_copies": max_copies, "largest_group": r_max},
                note="one prompt forward per prompt; each group's copies are cropped off its KV cache again (with "
                     "sliding-window layers the prompt is recomputed per group instead)")
