"""The whole FV pipeline for one task: extract -> CMA -> fit -> layer sweep -> evaluate, resumable via the store."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fv_remote.core.checks import atomic_save
from fv_remote.fv.cma import run_cma
from fv_remote.data import RelationTask
from fv_remote.fv.evaluate import TaskScores, evaluate_task, fit_function_vector
from fv_remote.fv.extract import extract, mean_heads_tensor
from fv_remote.models.loading import LoadedModel
from fv_remote.core.plots import aie_heatmap
from fv_remote.store.activations import ActivationStore
from fv_remote.data.tasks import prepare_task
from fv_remote.fv.vectors import FunctionVector

# A progress factory: (description, total) -> context manager yielding update(done, total).
ProgressFactory = Callable[[str, int], Any]


@dataclass
class PipelineSettings:
    """The sizes `run_task` uses for each stage (Todd et al.'s defaults): prompts, shots, top heads, seed."""

    n_prompts: int = 100  # clean prompts for the mean activations
    n_cma_prompts: int = 25  # corrupted prompts for the AIE
    n_shots: int = 10
    k: int = 10
    seed: int = 0
    n_test: int | None = None  # default: the test split, at most evaluate.MAX_TEST
    cma_method: str = "fast"

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class TaskRun:
    scores: TaskScores
    fv: FunctionVector
    fv_path: Path
    sweep: dict[int, float]
    skipped: list = field(default_factory=list)


def _no_progress(description: str, total: int):
    return nullcontext(lambda done, total_: None)


def run_task(model: LoadedModel, task: RelationTask, store: ActivationStore, out_dir: str | Path,
             settings: PipelineSettings | None = None, progress: ProgressFactory = _no_progress) -> TaskRun:
    """All stages for one task, where the model's executor runs them: on NDIF each stage is one request (extract,
    CMA, fit with its layer sweep, evaluate: four per task; a stage with nothing left to compute sends none)."""
    s = settings or PipelineSettings()
    out_dir = Path(out_dir)
    prepared = prepare_task(model.tokenizer, task, seed=s.seed, min_pairs=s.n_shots + 2)
    with progress(f"{task.name}: extract", s.n_prompts) as update:
        extract(model, task, store, n_prompts=s.n_prompts, n_shots=s.n_shots, seed=s.seed, progress=update)
    means = mean_heads_tensor(store, task.name)
    with progress(f"{task.name}: mediation", s.n_cma_prompts) as update:
        cma = run_cma(model, prepared, store, means, n_prompts=s.n_cma_prompts, n_shots=s.n_shots,
                      method=s.cma_method, progress=update)
    with progress(f"{task.name}: layer sweep", model.adapter.n_layers) as update:
        fv, sweep = fit_function_vector(model, prepared, means, cma.aie, k=s.k, meta={"store": store.url},
                                        progress=update)
    aie_heatmap(cma.aie, out_dir / f"{task.name}_aie.png", title=f"{task.name}: AIE per head",
                top=fv.heads)
    fv_path = atomic_save(fv.save, out_dir / f"{task.name}.fv.safetensors", "FV")
    scores = evaluate_task(model, prepared, fv, n_shots=s.n_shots, n_test=s.n_test)
    return TaskRun(scores, fv, fv_path, sweep or {}, prepared.problems)


def results_json(model: LoadedModel, runs: list[TaskRun], settings: PipelineSettings) -> dict:
    """The evaluation JSON contract: model, layer, settings, results (one row per task)."""
    per_task = [r.scores.layer for r in runs]
    # The contract wants one int; with per-task sweeps it is the most common layer (ties: the lowest), and
    # "layers" plus each row's "layer" say what each task really used.
    common = min(set(per_task), key=lambda layer: (-per_task.count(layer), layer)) if per_task else -1
    return {
        "model": model.model_id,
        "layer": int(common),
        "layer_is_per_task": len(set(per_task)) > 1,
        "layers": {r.scores.task: r.scores.layer for r in runs},
        "settings": settings.as_dict(),
        "results": [r.scores.as_json() for r in runs],
        "sweeps": {r.scores.task: {str(k): v for k, v in r.sweep.items()} for r in runs},
    }


def write_json(data: dict, path: str | Path) -> Path:
    """Atomically; if the write fails the results go to a fallback file and the error says where."""
    from fv_remote.core.checks import json_text, write_output

    return write_output(path, json_text(data))
