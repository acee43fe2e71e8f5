"""Fine-tuned function vectors (Kang, Wu & Lu 2026): train only the vector, with the model frozen.

The vector v is added at the last token of one layer's output; the loss is the cross-entropy of the answer's
first token at the last position of zero-shot prompts ("Q: x\\nA:"), plus an optional λ‖v − v0‖² toward the
initial vector. Adam with a cosine learning-rate schedule; every `eval_every` steps the validation loss is
measured and the best vector so far is kept; training stops after `patience` steps without improvement.

The loop itself is written once, as the session body of `relational.ffv_session` (plan -> body -> result): every
forward is a trace that adds the vector and `.save()`s the loss; `backward()` and the optimiser step run between
traces. Locally the body runs as plain traces; with an NDIF executor it is one request; a local fast path was
measured against it and dropped (1.03x, below the 1.2x bar: RESULTS.md, issue 12). `score` and `_trace_loss`
remain for scoring without training, `Prefix` for analogy's first-token path.

The result is a `FunctionVector` with kind="ffv" (same file format as an FV), so `fv-remote evaluate` and steering
take it as is.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fv_remote.core.errors import UserError, require_positive
from fv_remote.execution import Target, job_details
from fv_remote.relational.ffv_plan import (Examples, FFVRun, FinetuneResult, FinetuneSettings, SourceInfo,
                                           candidate_layers, initial_plan, quick_settings, trace_kwargs)
from fv_remote.relational.ffv_session import Plan, ffv_run, source_info, to_result
from fv_remote.models.loading import LoadedModel
from fv_remote.core.progress import Progress
from fv_remote.data.tasks import PreparedTask
from fv_remote.traces.patching import add_to_residual, layer_hidden
from fv_remote.fv.vectors import FunctionVector

# The stage's plain values live in ffv_plan (shared with the session body); they are part of this module's API.
__all__ = ["Examples", "FFVRun", "FinetuneResult", "FinetuneSettings", "Prefix", "SourceInfo",
           "best_ffv_layer", "build_prefix", "candidate_layers", "examples", "finetune", "initial_plan",
           "initial_vector", "loss_curve", "residual_norm", "save_run", "score", "select_layer", "train_ffv",
           "trace_kwargs"]


def examples(prepared: PreparedTask, split: str, n: int | None = None, start: int = 0) -> Examples:
    """Zero-shot prompts for pairs `start:start+n` of a split, in split order (no resampling, no repeats)."""
    pairs = list(getattr(prepared.splits, split))[start:]
    if n is not None:
        pairs = pairs[:n]
    if not pairs:
        raise UserError(f"task {prepared.name!r} has no {split} pairs to fine-tune on")
    texts = [prepared.template.query_text(x) for x, _ in pairs]
    targets = torch.tensor([prepared.answer_token[y] for _, y in pairs], dtype=torch.long)
    return Examples(texts, targets)


def _trace_loss(model: LoadedModel, texts: list[str], targets: torch.Tensor, vector: torch.Tensor, layer: int):
    """(mean cross-entropy of the targets at the last position, top-1 hits) with `vector` added at `layer`."""
    ad, lm = model.adapter, model.lm
    with lm.trace(texts, **trace_kwargs(model)):
        add_to_residual(ad.layer(lm, layer), ad.layer_output_is_tuple, vector)
        logits = ad.unembed(lm).output[:, -1].float()
        loss = torch.nn.functional.cross_entropy(logits, targets)
        hits = (logits.argmax(-1) == targets).sum()
        loss.save()  # type: ignore[attr-defined]  # nnsight proxy .save()
        hits.save()
    return loss, hits


@dataclass
class Prefix:
    """A batch of prompts run once without gradients: the keys/values of all but the last token, and every
    layer's output at the last token.

    A vector added at the last token changes nothing at earlier tokens (causal attention), so a forward with it can
    feed just the last token against the cached keys/values and skip the layers below the vector's (their output
    there is known): exact (analogy's first-token scores use it; tests/test_relational.py checks it).
    """

    last_ids: torch.Tensor  # [B, 1]
    mask: torch.Tensor  # [B, T]
    position: torch.Tensor  # [B, 1]
    cache: Any  # past key values of the first T-1 positions
    hidden: list[torch.Tensor]  # per layer: its output at the last token, [B, 1, d_model]
    targets: torch.Tensor

    def __len__(self) -> int:
        return len(self.targets)

    def select(self, rows: torch.Tensor) -> "Prefix":
        """Rows by index (repeats allowed: several vectors on one prompt share its prefix)."""
        cache = copy.deepcopy(self.cache)
        cache.batch_select_indices(rows)
        return Prefix(self.last_ids[rows], self.mask[rows], self.position[rows], cache,
                      [h[rows] for h in self.hidden], self.targets[rows])


def build_prefix(model: LoadedModel, texts: list[str], targets: torch.Tensor) -> Prefix:
    import nnsight

    ad, lm = model.adapter, model.lm
    enc = model.tokenizer(texts, return_tensors="pt", padding=True)  # nnsight set left padding
    ids, mask = enc["input_ids"], enc["attention_mask"]
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), lm.trace(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True,
                                   **trace_kwargs(model)):
        hidden = nnsight.save([])
        for layer in range(ad.n_layers):
            hidden.append(layer_hidden(ad.layer(lm, layer), ad.layer_output_is_tuple)[:, -1:].detach().clone())
        cache = lm.output.past_key_values.save()
    cache.crop(-1)  # drop the last token: it is fed again at every step
    return Prefix(ids[:, -1:], mask, position[:, -1:], cache, list(hidden), targets)


def score(model: LoadedModel, data: Examples, vector: torch.Tensor, layer: int,
          batch_size: int = 64) -> tuple[float, float]:
    """(mean NLL, top-1 accuracy) of the answers' first tokens with `vector` at `layer` (no gradients)."""
    total, hits = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            texts, targets = data.texts[start:start + batch_size], data.targets[start:start + batch_size]
            loss, n_hit = _trace_loss(model, texts, targets, vector.detach(), layer)
            total += float(loss) * len(texts)
            hits += int(n_hit)
    return total / len(data), hits / len(data)


def residual_norm(model: LoadedModel, texts: Sequence[str], layer: int) -> float:
    """Mean L2 norm of the residual stream at the last token after `layer` (scale for random inits)."""
    ad, lm = model.adapter, model.lm
    with torch.no_grad(), lm.trace(list(texts)):
        out = ad.layer(lm, layer).output
        hidden = out[0] if ad.layer_output_is_tuple else out
        norm = hidden[:, -1].float().norm(dim=-1).mean().save()
    return float(norm)


def initial_vector(model: LoadedModel, init: str, fv: FunctionVector | None = None, layer: int | None = None,
                   texts: Sequence[str] = (), seed: int = 0) -> torch.Tensor:
    """The starting point: the FV itself, zeros, or a random direction (norm of the FV, else 10% of the
    residual stream's norm at `layer`)."""
    vector, scale_texts = initial_plan(model, init, fv, texts, seed)
    if scale_texts is None:
        return vector
    norm = 0.1 * residual_norm(model, scale_texts, layer if layer is not None else 0)
    return vector / vector.norm() * norm


def finetune(model: LoadedModel, train: Examples, valid: Examples | None, init_vector: torch.Tensor, layer: int,
             settings: FinetuneSettings | None = None, task: str = "", init: str = "custom",
             source: FunctionVector | None = None, progress: Progress | None = None,
             remote: Target = False) -> FinetuneResult:
    """Optimise a vector added at `layer` so the frozen model answers the zero-shot training prompts.

    Without a validation set the last vector is kept and there is no early stopping. With more training prompts
    than `batch_size`, fixed chunks (shuffled once) are cycled. The optimisation (Adam, schedule, validation, early
    stopping) is the session body of `fv_remote.relational.ffv_session`, run where `remote` says: locally, as one NDIF
    request, or as nnsight's dry run; `progress` is called once, at the end.
    """
    s = (settings or FinetuneSettings()).check()
    layer = model.adapter.check_layer(layer)
    if train is None or not len(train):
        raise UserError("no training prompts")
    if init_vector.shape != (model.adapter.d_model,):
        raise UserError(f"initial vector has shape {tuple(init_vector.shape)}, the model needs "
                        f"({model.adapter.d_model},)")
    plan = Plan(model)
    train_i = plan.data(train, s.batch_size, s.seed, s.fast)
    valid_i = plan.data(valid, s.batch_size, s.seed, s.fast)
    plan.job(s, train_i, valid_i, layer, init_vector)
    assert train_i is not None  # job() refused None
    result = to_result(model.model_id, plan.run(remote)[0], s, task, init, source, len(train),
                       len(valid) if valid is not None else 0, len(plan.datasets[train_i]))
    if progress:
        progress(s.steps, s.steps)
    return result


def select_layer(model: LoadedModel, train: Examples, valid: Examples, layers: Sequence[int],
                 make_init: Callable[[int], torch.Tensor], settings: FinetuneSettings | None = None,
                 quick_steps: int = 30, progress: Progress | None = None,
                 remote: Target = False) -> dict[int, dict[str, float]]:
    """Short fine-tuning runs at each candidate layer -> {layer: {"valid_loss", "valid_acc"}}, as one stage.

    Pick with `best_ffv_layer`. `make_init(layer)` gives each run's starting vector.
    """
    if valid is None or not len(valid):
        raise UserError("choosing the FFV layer needs validation pairs")
    quick = quick_settings((settings or FinetuneSettings()).check(), quick_steps)
    layers = [model.adapter.check_layer(int(at)) for at in layers]
    plan = Plan(model)
    train_i = plan.data(train, quick.batch_size, quick.seed, quick.fast)
    valid_i = plan.data(valid, quick.batch_size, quick.seed, quick.fast)
    for at in layers:
        plan.job(quick, train_i, valid_i, at, make_init(at))
    outs = plan.run(remote)
    if progress:
        progress(len(layers), len(layers))
    return {at: {"valid_loss": out["best_loss"], "valid_acc": out["best_acc"]} for at, out in zip(layers, outs)}


def best_ffv_layer(results: dict[int, dict[str, float]]) -> int:
    """Highest validation accuracy; ties go to the lower validation loss."""
    return min(results, key=lambda layer: (-results[layer]["valid_acc"], results[layer]["valid_loss"]))


def loss_curve(history: dict[str, list], path: str | Path, title: str = "") -> Path:
    """Training loss per step and validation loss per check; the kept step marked."""
    from fv_remote.core.plots import _save, plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(history["step"], history["train_loss"], lw=1, label="train NLL")
    if history.get("eval_step"):
        ax.plot(history["eval_step"], history["valid_loss"], marker="o", ms=3, lw=1, label="validation NLL")
        best = min(range(len(history["valid_loss"])), key=lambda i: history["valid_loss"][i])
        ax.axvline(history["eval_step"][best], color="grey", ls="--", lw=0.8, label="kept")
    ax.set_xlabel("step")
    ax.set_ylabel("NLL of the answer's first token")
    ax.set_title(title or "FFV fine-tuning")
    ax.legend(fontsize=8)
    return _save(fig, path)


def save_run(run: FFVRun, out_path: str | Path, plot: str | Path | None = None, init: str = "") -> Path:
    """The `finetune` stage's files: the FFV (refused if training diverged) and, with `plot`, its loss curve."""
    from fv_remote.core.checks import atomic_save, require_finite_vector

    ffv = run.result.ffv
    require_finite_vector(ffv, "the fine-tuned FFV")  # training diverged: say so rather than save it
    saved = atomic_save(ffv.save, Path(out_path), "FFV")
    if plot:
        loss_curve(run.result.history, plot, title=f"{ffv.task}: FFV at layer {ffv.layer} (init {init})")
    return saved


def train_ffv(model: LoadedModel, prepared: PreparedTask, fv: FunctionVector | None = None, init: str = "fv",
              layer: int | str | None = None, n_train: int = 20, n_valid: int = 30,
              settings: FinetuneSettings | None = None, quick_steps: int = 30,
              progress: Progress | None = None, remote: Target = False) -> FFVRun:
    """Fine-tune on the first `n_train` training pairs, validate on up to `n_valid` validation pairs.

    `layer`: an int; None = the FV's layer (required without an FV); "auto" = short runs on `candidate_layers`
    and the best by validation accuracy (then loss). All of it (the layer search included) is one stage body
    (`ffv_session.run_jobs`), run where `remote` says; `progress` is called once, at the end.
    """
    s = (settings or FinetuneSettings()).check()
    require_positive("n_train", n_train)
    train = examples(prepared, "train", n_train)
    valid = examples(prepared, "valid", n_valid) if n_valid and prepared.splits.valid else None
    if fv is not None:
        fv.check_model(model)
    if layer == "auto" and valid is None:
        raise UserError(f"--layer auto needs validation pairs; task {prepared.name!r} has none")
    if layer is None and fv is None:
        raise UserError("give --layer (an index or 'auto') when there is no FV to take the layer from")
    if layer is None:
        assert fv is not None  # refused above otherwise
        layer = fv.layer
    if layer != "auto":  # -1 would be the session body's "best layer of the search" (issue 26's fuzz found it)
        layer = model.adapter.check_layer(int(layer))
    vector, scale_texts = initial_plan(model, init, fv, train.texts, s.seed)
    plan = Plan(model)
    train_i = plan.data(train, s.batch_size, s.seed, s.fast)
    valid_i = plan.data(valid, s.batch_size, s.seed, s.fast)
    search: list[int] = []
    layers: list[int] = []
    if layer == "auto":  # the short runs, the choice (on the server) and the final run in one body
        layers = candidate_layers(model.adapter.n_layers, fv.layer if fv else None)
        quick = quick_settings(s, quick_steps)
        search = [plan.job(quick, train_i, valid_i, at, vector, scale_texts) for at in layers]
        layer = -1
    plan.job(s, train_i, valid_i, int(layer), vector, scale_texts, search=search)
    assert train_i is not None  # job() refused None
    n_valid, n_batches = len(valid) if valid is not None else 0, len(plan.datasets[train_i])
    with job_details(stage="finetune", result_key="results", model=model.model_id, task=prepared.name, init=init,
                     settings=s.as_dict(), source=source_info(fv), n_train=len(train), n_valid=n_valid,
                     n_batches=n_batches, layers=layers, search=search, n_jobs=len(plan.jobs)):
        outs = plan.run(remote)
    run = ffv_run(model.model_id, outs, s, prepared.name, init, fv, len(train), n_valid, n_batches, layers, search)
    if progress:
        progress(s.steps, s.steps)
    return run
