"""The fit-vector stage: a task vector, ICV, mean-difference or PCA vector from the stored residual reads, placed
(layer, and scale where the method has one) by zero-shot accuracy on validation pairs, all candidates scored in one
session (one NDIF request). The vector file says its method (`kind`), how it steers (`meta["apply"]`) and what the
sweep saw (`meta["sweep"]`); `evaluate`, `steer` and `export` take it like an FV.

The chosen scale is folded into the saved vector (steer it at scale 1); the unscaled candidate's norm is in
`meta["norm_unscaled"]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fv_remote.baselines.builders import APPLY, PAPERS, build, check_method
from fv_remote.baselines.residuals import ResidualReads
from fv_remote.core.errors import UserError, require_positive
from fv_remote.core.progress import Progress
from fv_remote.data.tasks import PreparedTask
from fv_remote.execution import run_stage
from fv_remote.execution.stage import Stage, in_process
from fv_remote.fv.evaluate import score_batches, sweep_prompts
from fv_remote.fv.steering import Condition, Steer, accuracies, condition_work
from fv_remote.fv.vectors import APPLY_META, DIRECTIONS_META, FunctionVector
from fv_remote.models.loading import LoadedModel

DEFAULT_SCALES = {"task-vector": (1.0,), "mean-diff": (0.5, 1.0, 2.0, 4.0), "pca": (0.5, 1.0, 2.0, 4.0),
                  "icv": (0.02, 0.05, 0.1, 0.2, 0.5)}
EVERY_LAYER = -1  # a grid point's layer for an ICV added at every layer


@dataclass
class VectorFitPlan:
    """The grid of (layer, scale) candidates scored on validation prompts; which method, and what the vector
    records."""

    task: str
    method: str
    grid: list[tuple[int, float]]  # per condition: (layer or EVERY_LAYER, scale)
    owners: list[int]  # the condition of each batch
    answer_ids: list[list[int]]
    meta: dict
    model_id: str
    candidates: Any = in_process()  # [L, d_model] per-layer vectors
    base: Any = in_process()  # [L, d_model] mean zero-shot residuals (a task vector's additive equivalent)
    icv_layers: Any = in_process()  # the layers an every-layer ICV is added at
    work: Any = in_process()  # (texts, edits) per batch
    progress: Any = in_process()


def choose(grid: list[tuple[int, float]], acc: list[float]) -> tuple[int, float]:
    """Highest validation accuracy; among ties the smallest |scale| (the least intervention that does as well), then
    the middle layer (so a flat sweep does not pick layer 0)."""
    top = max(acc)
    tied = [point for point, a in zip(grid, acc) if a == top]
    smallest = min(abs(s) for _, s in tied)
    layers = sorted(layer for layer, s in tied if abs(s) == smallest)
    layer = layers[(len(layers) - 1) // 2]
    return layer, next(s for lay, s in tied if lay == layer and abs(s) == smallest)


def candidate_vector(method: str, candidates: torch.Tensor, model_id: str, task: str, layer: int, scale: float,
                     icv_layers: list[int] | None = None, base: torch.Tensor | None = None,
                     meta: dict | None = None) -> FunctionVector:
    """The vector of one grid point, its scale folded in (an every-layer ICV: one direction per layer)."""
    info = {"method": method, APPLY_META: APPLY[method], "scale": scale, **(meta or {})}
    if layer == EVERY_LAYER:
        layers = list(icv_layers or [])
        first, rest = layers[0], layers[1:]
        info[DIRECTIONS_META] = {str(x): (candidates[x] * scale).tolist() for x in rest}
        info["norm_unscaled"] = float(candidates[layers].norm(dim=-1).mean())
        return FunctionVector(candidates[first] * scale, model_id, task, first, kind=method, meta=info)
    info["norm_unscaled"] = float(candidates[layer].norm())
    return FunctionVector(candidates[layer] * scale, model_id, task, layer, kind=method, meta=info,
                          base=None if base is None else base[layer].clone())


def _sweep_vector(method: str, candidates: torch.Tensor, model_id: str, task: str, layer: int,
                  icv_layers: list[int]) -> FunctionVector:
    """A scale-1 vector for the sweep's conditions (the Steer carries the scale); multi-layer without JSON."""
    if layer == EVERY_LAYER:
        vec = candidate_vector(method, candidates, model_id, task, icv_layers[0], 1.0)
        vec.meta[DIRECTIONS_META] = {str(x): candidates[x] for x in icv_layers[1:]}
        return vec
    return candidate_vector(method, candidates, model_id, task, layer, 1.0)


class VectorFit(Stage[VectorFitPlan, tuple[FunctionVector, dict[str, float]]]):
    """A task vector, ICV, mean-difference or PCA vector placed by a validation sweep over layers (and scales):
    every candidate scored in one session; the chosen vector is returned with the sweep."""

    name = "fit-vector"
    plan_type = VectorFitPlan
    can_submit = False  # like fit: the CLI saves the vector the blocking run returns

    def body(self, model: LoadedModel, plan: VectorFitPlan) -> list:
        return score_batches(model, plan.work, plan.owners, len(plan.grid), plan.progress)

    def commit(self, plan: VectorFitPlan, outputs: list, progress: Progress | None = None
               ) -> tuple[FunctionVector, dict[str, float]]:
        acc = accuracies(outputs, plan.owners, plan.answer_ids)
        sweep = {_key(layer, scale): a for (layer, scale), a in zip(plan.grid, acc)}
        layer, scale = choose(plan.grid, acc)
        meta = {**plan.meta, "sweep": sweep, "validation_accuracy": max(acc)}
        vec = candidate_vector(plan.method, plan.candidates, plan.model_id, plan.task, layer, scale,
                               plan.icv_layers, plan.base if APPLY[plan.method] == "replace" else None, meta)
        return vec, sweep


VECTOR_FIT = VectorFit()


def _key(layer: int, scale: float) -> str:
    return f"{'all' if layer == EVERY_LAYER else layer}@{scale:g}"


def fit_vector(model: LoadedModel, prepared: PreparedTask, reads: ResidualReads, method: str,
               layer: int | None = None, scales: list[float] | None = None, every_layer: bool | None = None,
               n_prompts: int | None = None, batch_size: int = 32,
               progress: Progress | None = None) -> tuple[FunctionVector, dict[str, float]]:
    """The `fit --method METHOD` stage: build the method's per-layer candidates from `reads`, score them on
    validation zero-shot prompts (at most 50 by default) at every layer (or `layer`) and scale, and return the best
    as a vector file's content, with the sweep {"layer@scale": accuracy}.

    `every_layer` (ICV only; default True unless `layer` is given): the ICV is added at every layer from 1 (block 0's
    output has no llama.cpp control-vector slot) at one shared scale. One session wherever it runs."""
    check_method(method)
    require_positive("batch_size", batch_size)
    ad = model.adapter
    if reads.icl.shape[1:] != (ad.n_layers, ad.d_model):
        raise UserError(f"the residual reads of {reads.task!r} are [layers, d_model] = {list(reads.icl.shape[1:])}, "
                        f"not {model.model_id}'s [{ad.n_layers}, {ad.d_model}]: they are from another model")
    scales = [float(s) for s in (scales or DEFAULT_SCALES[method])]
    if method == "task-vector" and scales != [1.0]:
        raise UserError("a task vector is patched in, not added: it has no scale (leave out --scales)")
    if every_layer and method != "icv":
        raise UserError(f"only an ICV is added at every layer; a {method} vector goes at one layer (chosen on "
                        f"validation, or --layer)")
    every = method == "icv" and (every_layer if every_layer is not None else layer is None)
    if every and layer is not None:
        raise UserError("an ICV added at every layer takes no --layer (give --layer for one layer)")
    if every and ad.n_layers < 2:
        raise UserError(f"{model.model_id} has {ad.n_layers} layer(s); an every-layer ICV starts at layer 1")
    candidates = build(method, reads.icl, reads.zero_shot)
    base = reads.zero_shot.double().mean(0).float()
    icv_layers = list(range(1, ad.n_layers))
    layers, texts, ids = sweep_prompts(model, prepared, "valid", None if layer is None else [layer], n_prompts)
    grid = [(EVERY_LAYER, s) for s in scales] if every else [(x, s) for x in layers for s in scales]
    conditions = []
    for point_layer, scale in grid:
        vec = _sweep_vector(method, candidates, model.model_id, prepared.name, point_layer, icv_layers)
        conditions.append(Condition(texts, Steer(vec, scale=scale), ids, batch_size))
    work, owners = condition_work(model, conditions)
    meta = {"paper": PAPERS[method], "n_prompts": reads.n_prompts, "n_shots": reads.n_shots,
            "validation_prompts": len(texts)}
    plan = VectorFitPlan(prepared.name, method, grid, owners, [list(map(int, ids))] * len(grid), meta,
                         model.model_id, candidates, base, icv_layers, work, progress)
    return run_stage(VECTOR_FIT, model, plan)
