"""Fine-tuned FVs, the plain-value side: settings, training data, the result record, the schedule, layer candidates and
the starting vector. Shared by the local optimiser (`ffv`) and the one-request session (`ffv_session`), which do not
import each other's code for these.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from fv_remote.core.errors import UserError, require_positive
from fv_remote.models.loading import LoadedModel
from fv_remote.fv.vectors import FunctionVector

INITS = ("fv", "zero", "random")


@dataclass
class FinetuneSettings:
    """Fine-tuning an FFV: Adam with a cosine schedule, validation every `eval_every` steps and early stopping."""

    steps: int = 40  # optimiser steps at most (early stopping may end sooner)
    lr: float = 0.2  # peak Adam learning rate; cosine-decayed to lr * min_lr_ratio
    min_lr_ratio: float = 0.05
    l2: float = 0.0  # λ of λ‖v − v0‖² (pulls the vector toward its initial value)
    batch_size: int = 32  # prompts per step (all training prompts when there are fewer)
    eval_every: int = 5  # steps between validation checks
    patience: int = 15  # steps without a better validation loss before stopping
    seed: int = 0
    fast: bool = True  # each chunk's prefix cached once, its last tokens fed per step (exact)
    allow_unchanged: bool = False  # keep a result equal to its starting vector (a baseline on purpose; issue 26)

    def check(self) -> "FinetuneSettings":
        require_positive("steps", self.steps)
        require_positive("batch_size", self.batch_size)
        require_positive("eval_every", self.eval_every)
        require_positive("patience", self.patience)
        if not self.lr > 0:
            raise UserError(f"lr must be positive, got {self.lr}")
        if self.l2 < 0:
            raise UserError(f"l2 must be 0 or more, got {self.l2}")
        return self

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Examples:
    """Zero-shot prompts and the first token of each answer."""

    texts: list[str]
    targets: torch.Tensor  # [N] int64
    pairs: list[tuple[str, str]] = field(default_factory=list)  # the (x, y) of each prompt, when known (`overlap`)

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class FinetuneResult:
    ffv: FunctionVector
    history: dict[str, list]  # step, train_loss, lr; eval_step, valid_loss, valid_acc
    best_step: int
    best_valid_loss: float
    best_valid_acc: float
    stopped_early: bool


def trace_kwargs(model: LoadedModel) -> dict[str, Any]:
    """Ask for last-position logits only when the model supports it (saves the [B, T, vocab] unembedding)."""


    try:
        params = inspect.signature(model.hf.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def chunk_examples(data: Examples, batch_size: int, seed: int = 0,
                   shuffle: bool = True) -> list[tuple[list[str], torch.Tensor]]:
    """Fixed chunks of (texts, targets), shuffled once with `seed` when there are more than `batch_size`."""
    order = list(range(len(data)))
    if shuffle and len(data) > batch_size:
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    return [([data.texts[i] for i in order[start:start + batch_size]], data.targets[order[start:start + batch_size]])
            for start in range(0, len(order), batch_size)]


def initial_plan(model: LoadedModel, init: str, fv: FunctionVector | None = None, texts: Sequence[str] = (),
                 seed: int = 0) -> tuple[torch.Tensor, list[str] | None]:
    """`initial_vector` without tracing: (vector, None), or (random direction, prompts) when the direction still
    has to be scaled to 10% of the residual stream's norm at the layer (measured on those prompts)."""
    if init not in INITS:
        raise UserError(f"unknown init {init!r}; use one of {', '.join(INITS)}")
    if init == "fv":
        if fv is None:
            raise UserError("init 'fv' needs a function vector (--fv FILE); or use --init zero / random")
        fv.check_model(model)
        return fv.vector.detach().float().clone(), None
    d = model.adapter.d_model
    if init == "zero":
        return torch.zeros(d), None
    direction = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    if fv is not None:
        return direction / direction.norm() * float(fv.vector.float().norm()), None
    return direction, list(texts[:16]) or ["Q: a\nA:"]


def cosine_factor(s: FinetuneSettings, step: int) -> float:
    """The learning-rate factor at `step`: cosine from 1 down to `min_lr_ratio` over `steps`."""
    return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * step / s.steps))


@dataclass
class SourceInfo:
    """What a fine-tuning result records of its starting FV (a `FunctionVector` has the same fields)."""

    task: str
    layer: int
    kind: str
    heads: list[tuple[int, int]]


def finetune_result(model_id: str, best: torch.Tensor, layer: int, history: dict[str, list], best_step: int,
                    best_loss: float, best_acc: float, stopped: bool, init_norm: float, s: FinetuneSettings,
                    task: str, init: str, source: FunctionVector | SourceInfo | None, extra: dict) -> FinetuneResult:
    """The FFV (metadata included) and its training record, from a local or a remote run.

    Refuses (UserError) a run whose losses or vector are not finite, or whose optimiser never moved the vector
    (`extra["moved"]`: the norm of final - initial vector), or whose kept vector is its starting vector within float
    noise (`extra["kept_moved"]`; unless `s.allow_unchanged`): saving such a vector would be a silent wrong result.
    """
    check_trained(history, best, extra.get("moved"), s.steps, task)
    from fv_remote.core.unchanged import check_ffv_kept

    unchanged = check_ffv_kept(task, {"best_step": best_step, "kept_moved": extra.get("kept_moved"),
                                      "init_norm": init_norm, "history": history}, best.numel(),
                               int(extra.get("n_valid") or 0), s.lr, s.steps, s.allow_unchanged)
    meta: dict[str, Any] = {
        "init": init, "settings": s.as_dict(), "n_train": extra.pop("n_train"), "n_valid": extra.pop("n_valid"),
        "best_step": best_step, "best_valid_loss": best_loss, "best_valid_acc": best_acc,
        "stopped_early": stopped, "init_norm": init_norm, "norm": float(best.norm()), "unchanged": unchanged,
        **extra,
    }
    if source is not None:
        meta["source"] = {"task": source.task, "layer": source.layer, "kind": source.kind,
                          "heads": [list(h) for h in source.heads]}
    ffv = FunctionVector(vector=best, model=model_id, task=task or (source.task if source else ""),
                         layer=layer, heads=list(source.heads) if source else [], kind="ffv", meta=meta)
    return FinetuneResult(ffv, history, best_step, best_loss, best_acc, stopped)


def check_trained(history: dict[str, list], best: torch.Tensor, moved: float | None, steps: int,
                  task: str = "") -> None:
    """A fine-tuning run is usable: finite training losses and vector, and a vector the optimiser moved."""
    what = f"fine-tuning {task!r}" if task else "fine-tuning"
    bad = [step for step, loss in zip(history.get("step", []), history.get("train_loss", []))
           if not math.isfinite(loss)]
    if bad:
        raise UserError(f"{what}: the training loss is not finite from step {bad[0]} on: lower --lr (or check the "
                        "data); nothing was saved")
    if not bool(torch.isfinite(best).all()):
        raise UserError(f"{what}: the vector has non-finite values: lower --lr; nothing was saved")
    if steps > 0 and history.get("step") and moved is not None and not moved > 0:
        raise UserError(f"{what}: the vector did not move in {len(history['step'])} optimiser steps (no gradient "
                        "reached it); nothing was saved")


def quick_settings(s: FinetuneSettings, quick_steps: int) -> FinetuneSettings:
    """A layer-search run's settings: `quick_steps` steps, validated once at the end, no early stop before."""
    return FinetuneSettings(**{**s.as_dict(), "steps": quick_steps, "patience": quick_steps,
                               "eval_every": quick_steps})


def candidate_layers(n_layers: int, fv_layer: int | None = None, n: int = 5) -> list[int]:
    """A handful of layers spread over the first two thirds of the model, plus the FV's own layer."""
    top = max(1, (2 * n_layers) // 3)
    picks = {round(i * top / n) for i in range(1, n + 1)}
    if fv_layer is not None:
        picks.add(int(fv_layer))
    return sorted(x for x in picks if 0 <= x < n_layers)


@dataclass
class FFVRun:
    """What `train_ffv` did: the result, the layer search (if any) and the data sizes."""

    result: FinetuneResult
    layer_search: dict[int, dict[str, float]] = field(default_factory=dict)
    n_train: int = 0
    n_valid: int = 0

