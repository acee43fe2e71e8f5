"""Evaluation: top-1 accuracy on held-out pairs with and without a vector, and the layer sweep that places it.

With `remote` each function is ONE NDIF request however many conditions, layers and batches it scores (the
conditions are gathered first, then scored in one session); only top-1 token ids come back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fv_remote.core.errors import UserError
from fv_remote.execution import Target, job_details, resolve, stage_session
from fv_remote.models.loading import LoadedModel
from fv_remote.core.progress import Progress
from fv_remote.fv.steering import Condition, Steer, score_conditions
from fv_remote.data.tasks import PreparedTask
from fv_remote.fv.vectors import FunctionVector, assemble_function_vector, probe_ids, projection_plan, top_heads

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


def _sweep_prompts(model: LoadedModel, prepared: PreparedTask, split: str, layers: list[int] | None,
                   n_prompts: int | None) -> tuple[list[int], list[str], list[int]]:
    layers = list(range(model.adapter.n_layers)) if layers is None else [model.adapter.check_layer(x) for x in layers]
    pairs = getattr(prepared.splits, split)
    prompts = prepared.prompts(split, n_prompts or min(len(pairs), SWEEP_PROMPTS), kind="zero_shot", n_shots=0)
    return layers, [p.text for p in prompts], prepared.ids(prompts)


def sweep_conditions(model: LoadedModel, prepared: PreparedTask, fv: FunctionVector, split: str = "valid",
                     layers: list[int] | None = None, n_prompts: int | None = None, scale: float = 1.0,
                     batch_size: int = 32, positions: str = "last") -> dict[int, Condition]:
    """The layer sweep's scoring conditions, {layer: Condition} (to score together with others in one request)."""
    layers, texts, ids = _sweep_prompts(model, prepared, split, layers, n_prompts)
    return {layer: Condition(texts, Steer(fv, layer=layer, scale=scale, positions=positions), ids, batch_size)
            for layer in layers}


def layer_sweep(model: LoadedModel, prepared: PreparedTask, fv: FunctionVector, split: str = "valid",
                layers: list[int] | None = None, n_prompts: int | None = None, scale: float = 1.0,
                batch_size: int = 32, progress: Progress | None = None, remote: Target = False,
                positions: str = "last") -> dict[int, float]:
    """Zero-shot accuracy with the FV added at each layer, on `split` pairs (validation; at most 50 by default).

    Remotely all layers are one request, so `progress` is called once, at the end.
    """
    return _accuracies(model, sweep_conditions(model, prepared, fv, split, layers, n_prompts, scale, batch_size,
                                               positions), progress, remote)


def _accuracies(model: LoadedModel, conditions: dict, progress: Progress | None, remote: Target) -> dict:
    """Accuracy per condition: one request with a session executor (`progress` once, at the end), else condition
    by condition so that a progress bar moves."""
    conds = list(conditions.values())
    acc = score_conditions(model, conds, remote) if resolve(remote).session else []
    if progress and acc:
        progress(len(acc), len(conds))
    for condition in conds[len(acc):]:
        acc += score_conditions(model, [condition], remote)
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
    _, texts, ids = _sweep_prompts(model, prepared, split, [], n_prompts)
    return {float(s): Condition(texts, Steer(fv, layer=layer, scale=float(s), distributed=distributed,
                                             positions=positions), ids, batch_size) for s in scales}


def scale_sweep(model: LoadedModel, prepared: PreparedTask, fv: FunctionVector, scales: list[float],
                layer: int | None = None, positions: str = "last", distributed: bool = False, split: str = "valid",
                n_prompts: int | None = None, batch_size: int = 32, progress: Progress | None = None,
                remote: Target = False) -> dict[float, float]:
    """Zero-shot accuracy on validation pairs (at most 50 by default) at each scale; one request when remote.

    An FV added at every position (`positions="all"`, what a llama.cpp control vector does) usually needs another
    scale than at the last token: this finds it without touching the test split."""
    return _accuracies(model, scale_sweep_conditions(model, prepared, fv, scales, layer, positions, distributed,
                                                     split, n_prompts, batch_size), progress, remote)


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


def evaluate_task(model: LoadedModel, prepared: PreparedTask, fv: FunctionVector, layer: int | None = None,
                  n_test: int | None = None, n_shots: int = 10, scale: float = 1.0, distributed: bool = False,
                  extra_vectors: dict[str, FunctionVector] | None = None, batch_size: int = 16,
                  remote: Target = False, positions: str = "last") -> TaskScores:
    """Accuracy on test queries (the test split, at most 200 by default): zero-shot and shuffled n-shot, each
    with/without the FV, and clean n-shot ICL.

    `extra_vectors` (e.g. {"ffv": ...}) add `zero_shot_<name>` and `shuffled_<name>` columns. With `remote` all
    conditions are one NDIF request. `positions` ("last" or "all") and `scale` apply to every vector; the row
    records both.
    """
    n, layer, conditions = evaluation_conditions(model, prepared, fv, layer, n_test, n_shots, scale, distributed,
                                                 extra_vectors, batch_size, positions)
    with job_details(stage="evaluate", task=prepared.name, n_test=n, layer=layer, names=list(conditions),
                     sweep_layers=None, positions=positions, scale=scale):
        acc = dict(zip(conditions, score_conditions(model, list(conditions.values()), remote)))
    return _scores(prepared.name, n, layer, acc, positions, scale)


def evaluate_and_sweep(model: LoadedModel, prepared: PreparedTask, fv: FunctionVector, layer: int | None = None,
                       n_test: int | None = None, n_shots: int = 10, scale: float = 1.0, distributed: bool = False,
                       extra_vectors: dict[str, FunctionVector] | None = None, batch_size: int = 16,
                       sweep_batch_size: int = 32, remote: Target = False,
                       positions: str = "last") -> tuple[TaskScores, dict[int, float]]:
    """`evaluate_task` plus the validation `layer_sweep` (same scale and positions), scored together: one request
    when remote."""
    n, layer, conditions = evaluation_conditions(model, prepared, fv, layer, n_test, n_shots, scale, distributed,
                                                 extra_vectors, batch_size, positions)
    sweep = sweep_conditions(model, prepared, fv, scale=scale, batch_size=sweep_batch_size, positions=positions)
    with job_details(stage="evaluate", task=prepared.name, n_test=n, layer=layer, names=list(conditions),
                     sweep_layers=list(sweep), positions=positions, scale=scale):
        acc = score_conditions(model, [*conditions.values(), *sweep.values()], remote)
    scores = _scores(prepared.name, n, layer, dict(zip(conditions, acc)), positions, scale)
    return scores, dict(zip(sweep, acc[len(conditions):]))


def scores_from_job(saved: dict, details: dict) -> tuple[TaskScores, dict[int, float] | None]:
    """What `evaluate_task` (sweep None) or `evaluate_and_sweep` returned, from a no-wait job's saved values."""
    from fv_remote.fv.steering import accuracies_from_job

    acc = accuracies_from_job(saved, details)
    names = details["names"]
    scores = _scores(details["task"], int(details["n_test"]), int(details["layer"]), dict(zip(names, acc)),
                           details.get("positions"), details.get("scale"))
    layers = details.get("sweep_layers")
    return scores, (None if layers is None else {int(x): a for x, a in zip(layers, acc[len(names):])})


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


def fit_function_vector(model: LoadedModel, prepared: PreparedTask, means: torch.Tensor, aie: Any,
                        k: int | None = 10, share: float | None = None, layer: int | None = None,
                        sweep: bool = True, meta: dict | None = None, n_prompts: int | None = None,
                        batch_size: int = 32, progress: Progress | None = None,
                        remote: Target = False) -> tuple[FunctionVector, dict[int, float] | None]:
    """The `fit` stage: the FV of the top heads and, when `layer` is None and `sweep`, the validation layer sweep
    that places it (fv.layer = best layer, fv.meta["sweep"]). Returns (fv, sweep scores or None).

    One stage body wherever it runs (one NDIF request with `remote`): the heads' means are projected by the model's
    output projections and the resulting vector steers the sweep in the same session; only the k projected vectors
    and top-1 ids come back. `progress` is called once, at the end.
    """
    from fv_remote.fv.vectors import build_function_vector

    do_sweep = layer is None and sweep
    if not do_sweep:
        fv = build_function_vector(model, prepared.name, means, aie, k=k, share=share, layer=layer, meta=meta,
                                   remote=remote)
        scores = None
    else:
        ranked = top_heads(aie, k=k, share=share)
        vecs, scores = _fit_sweep_session(model, prepared, means, [(a, b) for a, b, _ in ranked], n_prompts,
                                          batch_size, remote)
        fv = assemble_function_vector(model, prepared.name, means, ranked, vecs, layer, meta)
        if progress:
            progress(len(scores), len(scores))
    if scores is not None:
        fv.layer = best_layer(scores)
        fv.meta["sweep"] = {str(x): v for x, v in scores.items()}
        fv.meta["sweep_flat"] = sweep_is_flat(scores)
    return fv, scores


def _fit_sweep_session(model: LoadedModel, prepared: PreparedTask, means: torch.Tensor, heads: list[tuple[int, int]],
                       n_prompts: int | None, batch_size: int, remote: Target) -> tuple[torch.Tensor, dict[int, float]]:
    """Project the heads and sweep all layers with their sum, in one session (the vector never leaves the server)."""
    import nnsight

    from fv_remote.core.errors import require_positive
    from fv_remote.traces.patching import add_to_residual
    from fv_remote.traces.projection import project_heads

    require_positive("batch_size", batch_size)
    ad, lm = model.adapter, model.lm
    layers, texts, ids = _sweep_prompts(model, prepared, "valid", None, n_prompts)
    chunks = [texts[i:i + batch_size] for i in range(0, len(texts), batch_size)]
    work = [(ad.layer(lm, layer), chunk) for layer in layers for chunk in chunks]
    plan = projection_plan(model, means, heads)
    is_tuple = ad.layer_output_is_tuple
    unembed, probe = ad.unembed(lm), probe_ids()
    tops: list[torch.Tensor] = []
    session = resolve(remote).session
    with stage_session(model, remote):
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
    answer = torch.tensor(ids)
    n_chunks = len(chunks)
    scores = {layer: float((torch.cat(tops[i * n_chunks:(i + 1) * n_chunks]) == answer).float().mean())
              for i, layer in enumerate(layers)}
    return vecs, scores
