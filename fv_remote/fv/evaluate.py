"""Evaluation: top-1 accuracy on held-out pairs with and without a vector, and the layer sweep that places it.

On a session executor (NDIF, dry run) each function is ONE request however many conditions, layers and batches it
scores (the conditions are gathered first, then scored in one session); only top-1 token ids come back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fv_remote.core.errors import UserError
from fv_remote.execution import executor_of, run_stage, stage_session
from fv_remote.execution.stage import Stage, in_process
from fv_remote.models.loading import LoadedModel
from fv_remote.core.progress import Progress
from fv_remote.fv.steering import (Condition, Steer, accuracies, answer_ids_of, condition_work, last_token_body,
                                   score_conditions)
from fv_remote.data.tasks import PreparedTask
from fv_remote.fv.vectors import (FunctionVector, assemble_function_vector, head_vectors, probe_ids, projection_plan,
                                  top_heads)

# Big tasks (antonym: 2398 pairs) would make a 30-layer sweep and a 5-condition test slow for little extra
# precision; these caps keep the standard error near 0.03-0.07 and can be raised per call.
SWEEP_PROMPTS = 50
MAX_TEST = 200


@dataclass
class TaskScores:
    """One row of the evaluation table (accuracies in 0..1). `extra` holds e.g. zero_shot_ffv."""

    task: str
    n_test: int
    zero_shot: float
    zero_shot_fv: float
    shuffled: float
    shuffled_fv: float
    icl: float
    layer: int
    extra: dict = field(default_factory=dict)

    def as_json(self) -> dict:
        row = asdict(self)
        row.update(row.pop("extra"))
        return row


def sweep_prompts(model: LoadedModel, prepared: PreparedTask, split: str, layers: list[int] | None,
                   n_prompts: int | None) -> tuple[list[int], list[str], list[int]]:
    """(the layers, checked; all when None), zero-shot prompt texts of `split` (at most 50 by default), answer ids."""
    layers = list(range(model.adapter.n_layers)) if layers is None else [model.adapter.check_layer(x) for x in layers]
    pairs = getattr(prepared.splits, split)
    prompts = prepared.prompts(split, n_prompts or min(len(pairs), SWEEP_PROMPTS), kind="zero_shot", n_shots=0)
    return layers, [p.text for p in prompts], prepared.ids(prompts)


def sweep_conditions(model: LoadedModel, prepared: PreparedTask, fv: FunctionVector, split: str = "valid",
                     layers: list[int] | None = None, n_prompts: int | None = None, scale: float = 1.0,
                     batch_size: int = 32, positions: str = "last") -> dict[int, Condition]:
    """The layer sweep's scoring conditions, {layer: Condition} (to score together with others in one request)."""
    layers, texts, ids = sweep_prompts(model, prepared, split, layers, n_prompts)
    return {layer: Condition(texts, Steer(fv, layer=layer, scale=scale, positions=positions), ids, batch_size)
            for layer in layers}


def layer_sweep(model: LoadedModel, prepared: PreparedTask, fv: FunctionVector, split: str = "valid",
                layers: list[int] | None = None, n_prompts: int | None = None, scale: float = 1.0,
                batch_size: int = 32, progress: Progress | None = None,
                positions: str = "last") -> dict[int, float]:
    """Zero-shot accuracy with the FV added at each layer, on `split` pairs (validation; at most 50 by default).

    Remotely all layers are one request, so `progress` is called once, at the end.
    """
    return _accuracies(model, sweep_conditions(model, prepared, fv, split, layers, n_prompts, scale, batch_size,
                                               positions), progress)


def _accuracies(model: LoadedModel, conditions: dict, progress: Progress | None) -> dict:
    """Accuracy per condition: one request with a session executor (`progress` once, at the end), else condition
    by condition so that a progress bar moves."""
    conds = list(conditions.values())
    acc = score_conditions(model, conds) if executor_of(model).session else []
    if progress and acc:
        progress(len(acc), len(conds))
    for condition in conds[len(acc):]:
        acc += score_conditions(model, [condition])
        if progress:
            progress(len(acc), len(conds))
    return dict(zip(conditions, acc))


def scale_sweep_conditions(model: LoadedModel, prepared: PreparedTask, fv: FunctionVector, scales: list[float],
                           layer: int | None = None, positions: str = "last", distributed: bool = False,
                           split: str = "valid", n_prompts: int | None = None,
                           batch_size: int = 32) -> dict[float, Condition]:
    """{scale: Condition}: zero-shot prompts of `split` with the vector at each scale (at its layer, `positions`)."""
    if not scales:
        raise UserError("no scales to sweep")
    _, texts, ids = sweep_prompts(model, prepared, split, [], n_prompts)
    return {float(s): Condition(texts, Steer(fv, layer=layer, scale=float(s), distributed=distributed,
                                             positions=positions), ids, batch_size) for s in scales}


def scale_sweep(model: LoadedModel, prepared: PreparedTask, fv: FunctionVector, scales: list[float],
                layer: int | None = None, positions: str = "last", distributed: bool = False, split: str = "valid",
                n_prompts: int | None = None, batch_size: int = 32,
                progress: Progress | None = None) -> dict[float, float]:
    """Zero-shot accuracy on validation pairs (at most 50 by default) at each scale; one request on NDIF.

    An FV added at every position (`positions="all"`, what a llama.cpp control vector does) usually needs another
    scale than at the last token: this finds it without touching the test split."""
    return _accuracies(model, scale_sweep_conditions(model, prepared, fv, scales, layer, positions, distributed,
                                                     split, n_prompts, batch_size), progress)


def best_scale(scores: dict[float, float]) -> float:
    """Highest validation accuracy; among ties the smallest |scale| (the least intervention that does as well)."""
    top = max(scores.values())
    return min((s for s, v in scores.items() if v == top), key=lambda s: (abs(s), s))


def best_layer(scores: dict[int, float]) -> int:
    """Highest accuracy; among tied layers the middle one (lower middle), so a flat sweep does not pick layer 0."""
    top = max(scores.values())
    tied = sorted(layer for layer, value in scores.items() if value == top)
    return tied[(len(tied) - 1) // 2]


def sweep_is_flat(scores: dict[int, float]) -> bool:
    """Every layer scored the same: the sweep carries no information about where the FV works."""
    return len(set(scores.values())) <= 1


def evaluation_conditions(model: LoadedModel, prepared: PreparedTask, fv: FunctionVector, layer: int | None = None,
                          n_test: int | None = None, n_shots: int = 10, scale: float = 1.0, distributed: bool = False,
                          extra_vectors: dict[str, FunctionVector] | None = None,
                          batch_size: int = 16, positions: str = "last") -> tuple[int, int, dict[str, Condition]]:
    """`evaluate_task`'s conditions: (n_test, layer, {column: Condition})."""
    n = n_test or min(len(prepared.splits.test), MAX_TEST)
    zero = prepared.prompts("test", n, kind="zero_shot", n_shots=0, seed_offset=2)
    shuffled = prepared.prompts("test", n, kind="shuffled", n_shots=n_shots, seed_offset=2)
    clean = prepared.prompts("test", n, kind="clean", n_shots=n_shots, seed_offset=2)
    ids = prepared.ids(zero)  # same queries in all three (one seed)
    layer = fv.layer if layer is None else layer
    texts = {"zero": [p.text for p in zero], "shuffled": [p.text for p in shuffled],
             "clean": [p.text for p in clean]}

    def cond(kind: str, vec: FunctionVector | None) -> Condition:
        steer = None if vec is None else Steer(vec, layer=None if vec is not fv else layer, scale=scale,
                                              distributed=distributed and vec is fv, positions=positions)
        return Condition(texts[kind], steer, ids, batch_size)

    conditions = {}
    for name, vec in (extra_vectors or {}).items():
        conditions[f"zero_shot_{name}"] = cond("zero", vec)
        conditions[f"shuffled_{name}"] = cond("shuffled", vec)
    conditions.update(zero_shot=cond("zero", None), zero_shot_fv=cond("zero", fv), shuffled=cond("shuffled", None),
                      shuffled_fv=cond("shuffled", fv), icl=cond("clean", None))
    return n, layer, conditions


def _scores(task: str, n: int, layer: int, acc: dict[str, float], positions: str | None = None,
                  scale: float | None = None) -> TaskScores:
    """The row; `positions` and `scale` (how the vectors were added) go into it unless None (older no-wait jobs)."""
    main = ("zero_shot", "zero_shot_fv", "shuffled", "shuffled_fv", "icl")
    how = {k: v for k, v in (("positions", positions), ("scale", scale)) if v is not None}
    return TaskScores(task=task, n_test=n, **{k: acc[k] for k in main}, layer=layer,
                      extra={**{k: v for k, v in acc.items() if k not in main}, **how})


def score_batches(model: LoadedModel, work: list, owners: list[int], n_conditions: int,
                  progress: Progress | None = None) -> list:
    """Top-1 ids per batch of `work` (`condition_work`): one session on a session executor; locally condition by
    condition, so that `progress` moves."""
    if executor_of(model).session or progress is None:
        return last_token_body(model, work, top1=True)
    outs: list = []
    for index in range(n_conditions):
        outs += last_token_body(model, [w for w, i in zip(work, owners) if i == index], top1=True)
        progress(index + 1, n_conditions)
    return outs


@dataclass
class EvaluatePlan:
    """The scoring conditions of an evaluation (test columns, then the optional validation layer sweep) as batches,
    and where its files go (`report`: model, kind, settings, plot, json; None = no files)."""

    task: str
    n_test: int
    layer: int
    names: list[str]  # the test columns, in the order of the first conditions
    sweep_layers: list[int] | None
    positions: str
    scale: float
    owners: list[int]  # the condition of each batch
    answer_ids: list[list[int]]  # per condition
    report: dict | None = None
    work: Any = in_process()  # (texts, edits) per batch
    progress_total: int = 0  # conditions, for a local progress bar
    progress: Any = in_process()


@dataclass
class Evaluation:
    scores: TaskScores
    curve: dict[int, float] | None
    written: list[str]  # one line per file written


class Evaluate(Stage[EvaluatePlan, Evaluation]):
    """Accuracy with and without the vectors on test pairs (and the validation layer sweep): all conditions scored
    in one session; the table row, the sweep plot and the JSON file."""

    name = "evaluate"
    plan_type = EvaluatePlan
    result_key = "outs"

    def body(self, model: LoadedModel, plan: EvaluatePlan) -> list:
        return score_batches(model, plan.work, plan.owners, len(plan.answer_ids), plan.progress)

    def commit(self, plan: EvaluatePlan, outputs: list, progress: Progress | None = None) -> Evaluation:
        acc = accuracies(outputs, plan.owners, plan.answer_ids)
        scores = _scores(plan.task, plan.n_test, plan.layer, dict(zip(plan.names, acc)), plan.positions, plan.scale)
        curve = None if plan.sweep_layers is None else \
            {int(x): a for x, a in zip(plan.sweep_layers, acc[len(plan.names):])}
        written = save_evaluation(plan.report, scores, curve) if plan.report else []
        return Evaluation(scores, curve, written)

    def summary(self, plan: EvaluatePlan, result: Evaluation) -> str:
        kind = str((plan.report or {}).get("kind", "fv")).upper()
        s = result.scores
        return "\n".join([f"{s.task}: zero-shot {s.zero_shot:.2f} -> {s.zero_shot_fv:.2f} with the {kind} at layer "
                          f"{s.layer} ({s.n_test} test pairs)", *result.written])


EVALUATE = Evaluate()


def evaluate(model: LoadedModel, prepared: PreparedTask, fv: FunctionVector, layer: int | None = None,
             n_test: int | None = None, n_shots: int = 10, scale: float = 1.0, distributed: bool = False,
             extra_vectors: dict[str, FunctionVector] | None = None, batch_size: int = 16, sweep: bool = False,
             sweep_batch_size: int = 32, positions: str = "last", report: dict | None = None,
             progress: Progress | None = None) -> Evaluation:
    """The `evaluate` stage: `evaluate_task`'s columns and, with `sweep`, the validation layer sweep (same scale and
    positions), scored together (one request on NDIF; locally condition by condition with `progress`). With
    `report` (model, kind, task, settings, plot, json) the sweep plot and the JSON file are written too."""
    n, layer, conditions = evaluation_conditions(model, prepared, fv, layer, n_test, n_shots, scale, distributed,
                                                 extra_vectors, batch_size, positions)
    swept = sweep_conditions(model, prepared, fv, scale=scale, batch_size=sweep_batch_size,
                             positions=positions) if sweep else {}
    every = [*conditions.values(), *swept.values()]
    work, owners = condition_work(model, every)
    plan = EvaluatePlan(prepared.name, n, layer, list(conditions), list(swept) if sweep else None, positions, scale,
                        owners, answer_ids_of(every), report, work, len(every), progress)
    return run_stage(EVALUATE, model, plan)


def evaluate_task(model: LoadedModel, prepared: PreparedTask, fv: FunctionVector, layer: int | None = None,
                  n_test: int | None = None, n_shots: int = 10, scale: float = 1.0, distributed: bool = False,
                  extra_vectors: dict[str, FunctionVector] | None = None, batch_size: int = 16,
                  positions: str = "last") -> TaskScores:
    """Accuracy on test queries (the test split, at most 200 by default): zero-shot and shuffled n-shot, each
    with/without the FV, and clean n-shot ICL.

    `extra_vectors` (e.g. {"ffv": ...}) add `zero_shot_<name>` and `shuffled_<name>` columns. On NDIF all
    conditions are one request. `positions` ("last" or "all") and `scale` apply to every vector; the row records
    both.
    """
    return evaluate(model, prepared, fv, layer, n_test, n_shots, scale, distributed, extra_vectors, batch_size,
                    positions=positions).scores


def evaluate_and_sweep(model: LoadedModel, prepared: PreparedTask, fv: FunctionVector, layer: int | None = None,
                       n_test: int | None = None, n_shots: int = 10, scale: float = 1.0, distributed: bool = False,
                       extra_vectors: dict[str, FunctionVector] | None = None, batch_size: int = 16,
                       sweep_batch_size: int = 32,
                       positions: str = "last") -> tuple[TaskScores, dict[int, float]]:
    """`evaluate_task` plus the validation `layer_sweep` (same scale and positions), scored together: one request
    on NDIF."""
    result = evaluate(model, prepared, fv, layer, n_test, n_shots, scale, distributed, extra_vectors, batch_size,
                      sweep=True, sweep_batch_size=sweep_batch_size, positions=positions)
    assert result.curve is not None
    return result.scores, result.curve


def save_evaluation(report: dict, scores: TaskScores, curve: dict[int, float] | None) -> list[str]:
    """The files of the `evaluate` stage (the blocking command and `jobs fetch` write the same ones): the sweep plot
    (`report["plot"]`, when there is a sweep) and the JSON results (`report["json"]`). Returns a line per file."""
    from fv_remote.core.checks import json_text, write_output
    from fv_remote.core.plots import layer_sweep_plot

    data = {"model": report["model"], "layer": scores.layer,
            "settings": {**report["settings"], "n_test": scores.n_test}, "results": [scores.as_json()]}
    lines = []
    if curve is not None:
        data["sweep"] = {str(x): v for x, v in curve.items()}
        if report.get("plot"):
            lines.append(f"sweep plot: {layer_sweep_plot({report['task']: curve}, Path(report['plot']))}")
    if report.get("json"):
        lines.append(f"results: {write_output(report['json'], json_text(data))}")
    return lines


@dataclass
class FitPlan:
    """The top heads to project and sum, and (with `sweep_layers`) the validation prompts the layer sweep scores
    with that sum at every layer; the vector is placed at the sweep's best layer, else at `layer`."""

    task: str
    ranked: list[tuple[int, int, float]]  # (layer, head, score) from `top_heads`
    layer: int | None
    sweep_layers: list[int] | None
    batch_size: int
    texts: list[str]
    answer_ids: list[int]
    meta: dict | None = None
    means: Any = in_process()  # mean head outputs [layer, head, d_head]
    model: Any = in_process()  # the sizes and id the vector records (a fit is never fetched later)


class Fit(Stage[FitPlan, tuple[FunctionVector, dict[int, float] | None]]):
    """The FV of the top heads, and the validation layer sweep that places it, in one session: only the projected
    head vectors and top-1 ids come back (the vector never leaves the server in between)."""

    name = "fit"
    plan_type = FitPlan
    can_submit = False  # the CLI saves the vector the blocking run returns

    def body(self, model: LoadedModel, plan: FitPlan) -> tuple[torch.Tensor, list[torch.Tensor]]:
        heads = [(a, b) for a, b, _ in plan.ranked]
        if plan.sweep_layers is None:
            return head_vectors(model, plan.means, heads), []
        return _fit_sweep_session(model, plan.means, heads, plan.sweep_layers, plan.texts, plan.batch_size)

    def commit(self, plan: FitPlan, outputs: tuple, progress: Progress | None = None
               ) -> tuple[FunctionVector, dict[int, float] | None]:
        vecs, tops = outputs
        fv = assemble_function_vector(plan.model, plan.task, plan.means, plan.ranked, vecs, plan.layer, plan.meta)
        if plan.sweep_layers is None:
            return fv, None
        answer, n_chunks = torch.tensor(plan.answer_ids), -(-len(plan.texts) // plan.batch_size)
        scores = {layer: float((torch.cat(tops[i * n_chunks:(i + 1) * n_chunks]) == answer).float().mean())
                  for i, layer in enumerate(plan.sweep_layers)}
        if progress:
            progress(len(scores), len(scores))
        fv.layer = best_layer(scores)
        fv.meta["sweep"] = {str(x): v for x, v in scores.items()}
        fv.meta["sweep_flat"] = sweep_is_flat(scores)
        return fv, scores


FIT = Fit()


def fit_function_vector(model: LoadedModel, prepared: PreparedTask, means: torch.Tensor, aie: Any,
                        k: int | None = 10, share: float | None = None, layer: int | None = None,
                        sweep: bool = True, meta: dict | None = None, n_prompts: int | None = None,
                        batch_size: int = 32, progress: Progress | None = None,
                        ) -> tuple[FunctionVector, dict[int, float] | None]:
    """The `fit` stage: the FV of the top heads and, when `layer` is None and `sweep`, the validation layer sweep
    that places it (fv.layer = best layer, fv.meta["sweep"]). Returns (fv, sweep scores or None).

    One stage body wherever it runs (one NDIF request on NDIF): the heads' means are projected by the model's
    output projections and the resulting vector steers the sweep in the same session; only the k projected vectors
    and top-1 ids come back. `progress` is called once, at the end.
    """
    from fv_remote.core.errors import require_positive

    require_positive("batch_size", batch_size)
    ranked = top_heads(aie, k=k, share=share)
    if not ranked:
        raise UserError("no heads to project")
    layers: list[int] | None = None
    texts: list[str] = []
    ids: list[int] = []
    if layer is None and sweep:
        layers, texts, ids = sweep_prompts(model, prepared, "valid", None, n_prompts)
    plan = FitPlan(prepared.name, [(int(a), int(b), float(s)) for a, b, s in ranked], layer, layers, batch_size,
                   texts, ids, meta, means, model)
    return run_stage(FIT, model, plan, progress)


def _fit_sweep_session(model: LoadedModel, means: torch.Tensor, heads: list[tuple[int, int]], layers: list[int],
                       texts: list[str], batch_size: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Project the heads and sweep `layers` with their sum, in one session (the vector never leaves the server):
    the projected vectors and each batch's top-1 ids, layer by layer."""
    import nnsight

    from fv_remote.traces.patching import add_to_residual
    from fv_remote.traces.projection import project_heads

    ad, lm = model.adapter, model.lm
    chunks = [texts[i:i + batch_size] for i in range(0, len(texts), batch_size)]
    work = [(ad.layer(lm, layer), chunk) for layer in layers for chunk in chunks]
    plan = projection_plan(model, means, heads)
    is_tuple = ad.layer_output_is_tuple
    unembed, probe = ad.unembed(lm), probe_ids()
    tops: list[torch.Tensor] = []
    session = executor_of(model).session
    with stage_session(model):
        with lm.trace(input_ids=probe):
            vecs = project_heads(**plan).save()
        vector = vecs.sum(0)
        for layer_envoy, batch in work:
            with lm.trace(batch):
                add_to_residual(layer_envoy, is_tuple, vector)
                top = unembed.output[:, -1].argmax(dim=-1).save()
            tops.append(top.cpu())
        # Nothing else may travel back: unbind the body's other values (typed as they were bound).
        top = vector = layer_envoy = batch = None  # type: ignore[assignment]
        vecs = vecs.cpu()
        if session:
            vecs, tops = nnsight.save(vecs), nnsight.save(tops)
    return vecs, tops
