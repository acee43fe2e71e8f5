"""Evaluation: top-1 accuracy on held-out pairs with and without a vector, and the layer sweep that places it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from fv_remote.models import LoadedModel
from fv_remote.steering import Steer, top1_accuracy
from fv_remote.tasks import PreparedTask
from fv_remote.vectors import FunctionVector

Progress = Callable[[int, int], None]

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


def layer_sweep(model: LoadedModel, prepared: PreparedTask, fv: FunctionVector, split: str = "valid",
                layers: list[int] | None = None, n_prompts: int | None = None, scale: float = 1.0,
                batch_size: int = 32, progress: Progress | None = None) -> dict[int, float]:
    """Zero-shot accuracy with the FV added at each layer, on `split` pairs (validation; at most 50 by default)."""
    layers = list(range(model.adapter.n_layers)) if layers is None else [model.adapter.check_layer(x) for x in layers]
    pairs = getattr(prepared.splits, split)
    prompts = prepared.prompts(split, n_prompts or min(len(pairs), SWEEP_PROMPTS), kind="zero_shot", n_shots=0)
    texts, ids = [p.text for p in prompts], prepared.ids(prompts)
    scores = {}
    for i, layer in enumerate(layers):
        scores[layer] = top1_accuracy(model, texts, ids, Steer(fv, layer=layer, scale=scale), batch_size)
        if progress:
            progress(i + 1, len(layers))
    return scores


def best_layer(scores: dict[int, float]) -> int:
    """Highest accuracy; ties go to the earliest layer."""
    return max(scores, key=lambda layer: (scores[layer], -layer))


def evaluate_task(model: LoadedModel, prepared: PreparedTask, fv: FunctionVector, layer: int | None = None,
                  n_test: int | None = None, n_shots: int = 10, scale: float = 1.0, distributed: bool = False,
                  extra_vectors: dict[str, FunctionVector] | None = None, batch_size: int = 16) -> TaskScores:
    """Accuracy on test queries (the test split, at most 200 by default): zero-shot and shuffled n-shot, each
    with/without the FV, and clean n-shot ICL.

    `extra_vectors` (e.g. {"ffv": ...}) add `zero_shot_<name>` and `shuffled_<name>` columns.
    """
    n = n_test or min(len(prepared.splits.test), MAX_TEST)
    zero = prepared.prompts("test", n, kind="zero_shot", n_shots=0, seed_offset=2)
    shuffled = prepared.prompts("test", n, kind="shuffled", n_shots=n_shots, seed_offset=2)
    clean = prepared.prompts("test", n, kind="clean", n_shots=n_shots, seed_offset=2)
    ids = prepared.ids(zero)  # same queries in all three (one seed)
    layer = fv.layer if layer is None else layer

    def acc(prompts, vec: FunctionVector | None) -> float:
        steer = None if vec is None else Steer(vec, layer=None if vec is not fv else layer, scale=scale,
                                              distributed=distributed and vec is fv)
        return top1_accuracy(model, [p.text for p in prompts], ids, steer, batch_size)

    extra = {}
    for name, vec in (extra_vectors or {}).items():
        extra[f"zero_shot_{name}"] = acc(zero, vec)
        extra[f"shuffled_{name}"] = acc(shuffled, vec)
    return TaskScores(task=prepared.name, n_test=n, zero_shot=acc(zero, None), zero_shot_fv=acc(zero, fv),
                      shuffled=acc(shuffled, None), shuffled_fv=acc(shuffled, fv), icl=acc(clean, None),
                      layer=layer, extra=extra)
