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
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fv_remote.core.errors import UserError, require_positive
from fv_remote.execution import run_stage
from fv_remote.execution.stage import Stage, in_process
from fv_remote.plan.cost import (DTYPE_BYTES, PAYLOAD_TENSOR_OVERHEAD, RESULT_OVERHEAD, Dims, Plan as CostPlan,
                                  StageOptions, Trace, _batches, _merge, sent_bytes, session_bytes, tensor_bytes)
from fv_remote.relational.ffv_plan import (Examples, FFVRun, FinetuneResult, FinetuneSettings, SourceInfo,
                                           candidate_layers, initial_plan, quick_settings, trace_kwargs)
from fv_remote.relational.ffv_session import Plan, ffv_run, run_jobs, source_from_info, source_info
from fv_remote.relational.overlap import examples_record
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
    return Examples(texts, targets, [(str(x), str(y)) for x, y in pairs])


def _trace_loss(model: LoadedModel, texts: list[str], targets: torch.Tensor, vector: torch.Tensor, layer: int):
    """(mean cross-entropy of the targets at the last position, top-1 hits) with `vector` added at `layer`."""
    ad, lm = model.adapter, model.lm
    with lm.trace(texts, **trace_kwargs(model)):
        add_to_residual(ad.layer(lm, layer), ad.layer_output_is_tuple, vector)
        logits = ad.unembed(lm).output[:, -1].float()
        on_device = targets.to(logits.device)
        loss = torch.nn.functional.cross_entropy(logits, on_device)
        hits = (logits.argmax(-1) == on_device).sum()
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
        on_device = rows.to(self.hidden[0].device) if self.hidden else rows  # the cache and states live there
        cache.batch_select_indices(on_device)
        return Prefix(self.last_ids[rows], self.mask[rows], self.position[rows], cache,
                      [h[on_device] for h in self.hidden], self.targets[rows])


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
             source: FunctionVector | None = None, progress: Progress | None = None) -> FinetuneResult:
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
    return run_stage(FINETUNE, model, finetune_plan(model, plan, s, task, init, source, len(train),
                                                    len(valid) if valid is not None else 0, train_i,
                                                    trained_pairs=examples_record(train, valid)), progress).result


def select_layer(model: LoadedModel, train: Examples, valid: Examples, layers: Sequence[int],
                 make_init: Callable[[int], torch.Tensor], settings: FinetuneSettings | None = None,
                 quick_steps: int = 30, progress: Progress | None = None) -> dict[int, dict[str, float]]:
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
    outs = run_jobs(model, plan.datasets, plan.jobs)  # the stage's body (short runs: no result to commit)
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
              progress: Progress | None = None, out: str | Path | None = None, plot: str | Path | None = None,
              next_step: str | None = None) -> FFVRun:
    """Fine-tune on the first `n_train` training pairs, validate on up to `n_valid` validation pairs.

    `layer`: an int; None = the FV's layer (required without an FV); "auto" = short runs on `candidate_layers`
    and the best by validation accuracy (then loss). All of it (the layer search included) is one stage body
    (`ffv_session.run_jobs`), run where the model's executor says; `progress` is called once, at the end. With
    `out` the FFV is saved there (and its loss curve at `plot`) when the results are in (`next_step`: a command a
    fetched job prints afterwards).
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
    n_valid = len(valid) if valid is not None else 0
    return run_stage(FINETUNE, model, finetune_plan(model, plan, s, prepared.name, init, fv, len(train), n_valid,
                                                    train_i, layers, search, out, plot, next_step,
                                                    examples_record(train, valid)), progress)


@dataclass
class FinetunePlan:
    """Fine-tuning jobs (one relation; or a layer search's short runs, then the final run at the best layer) and
    what their result records; `work` holds the jobs and their data as tensors (`ffv_session.Plan`)."""

    model: str
    task: str
    init: str
    settings: dict  # FinetuneSettings.as_dict()
    source: dict | None  # the starting FV's task, layer, kind, heads (`ffv_session.source_info`)
    n_train: int
    n_valid: int
    n_batches: int  # training chunks
    n_jobs: int
    layers: list[int] = field(default_factory=list)  # the layer search's candidates
    search: list[int] = field(default_factory=list)  # their jobs
    out: str | None = None  # where the commit saves the FFV (None: nowhere)
    plot: str | None = None  # and its loss curve
    next_step: str | None = None  # a command to show once a fetched job is saved
    trained_pairs: dict | None = None  # `overlap.record` of the training and validation pairs (None: not known)
    work: Any = in_process()


def finetune_plan(model: LoadedModel, work: Plan, s: FinetuneSettings, task: str, init: str,
                  source: FunctionVector | None, n_train: int, n_valid: int, train_i: int, layers: Sequence[int] = (),
                  search: Sequence[int] = (), out: str | Path | None = None, plot: str | Path | None = None,
                  next_step: str | None = None, trained_pairs: dict | None = None) -> FinetunePlan:
    return FinetunePlan(model.model_id, task, init, s.as_dict(), source_info(source), n_train, n_valid,
                        len(work.datasets[train_i]), len(work.jobs), list(layers), list(search),
                        str(out) if out else None, str(plot) if plot else None, next_step, trained_pairs, work)


class Finetune(Stage[FinetunePlan, FFVRun]):
    """FFV fine-tuning: every job in one session (`ffv_session.run_jobs`); the FFV with its training record, saved
    (with its loss curve) where the plan says."""

    name = "finetune"
    plan_type = FinetunePlan
    result_key = "results"

    def body(self, model: LoadedModel, plan: FinetunePlan) -> list[dict]:
        return run_jobs(model, plan.work.datasets, plan.work.jobs)

    def commit(self, plan: FinetunePlan, outputs: list[dict], progress: Progress | None = None) -> FFVRun:
        if len(outputs) != plan.n_jobs:
            raise UserError(f"the job returned {len(outputs)} fine-tuning runs, expected {plan.n_jobs}")
        s = FinetuneSettings(**plan.settings)
        run = ffv_run(plan.model, outputs, s, plan.task, plan.init, source_from_info(plan.source), plan.n_train,
                      plan.n_valid, plan.n_batches, plan.layers, plan.search, plan.trained_pairs)
        if plan.out:
            save_run(run, plan.out, plan.plot, plan.init)
        if progress:
            progress(s.steps, s.steps)
        return run

    def cost(self, dims: Dims, o: StageOptions) -> tuple[CostPlan, Any]:
        if o.layer is not None and not 0 <= o.layer < dims.n_layers:
            raise UserError(f"--layer {o.layer} out of range: this model has layers 0..{dims.n_layers - 1}")
        return finetune_cost(dims, o.n_train, o.n_valid, o.tokens(0), o.steps, o.batch_size or 32, o.eval_every,
                             o.layer, nbytes=DTYPE_BYTES[o.dtype]), None

    def summary(self, plan: FinetunePlan, result: FFVRun) -> str:
        message = f"{plan.task or result.result.ffv.task}: FFV at layer {result.result.ffv.layer}" + \
            (f" saved to {plan.out}" if plan.out else "")
        return message + (f"\nevaluate it: {plan.next_step}" if plan.next_step else "")


FINETUNE = Finetune()


# -- the cost model: what the body costs as one request (`fv-remote plan`) ------------------------------

Chunks = list[tuple[int, int]]  # (rows, padded tokens) per chunk of a dataset, in order


def _ffv_job_traces(layer: int, steps: int, train: Chunks, valid: Chunks, eval_every: int) -> list[Trace]:
    """One fine-tuning job of `ffv_session.run_jobs` on the cached-prefix path: the last token of a training chunk
    per step from the vector's layer up (the layers below skipped; forward + backward), every validation chunk at
    step 0, every `eval_every` steps and the last step."""
    evals = (steps // eval_every + 1 + (steps % eval_every != 0)) if valid else 0  # 0, every eval_every, the last
    n = len(train)  # step s trains on chunk (s - 1) % n
    out = [Trace(rows, 1, t, 1, first=layer, backward_from=layer, count=steps // n + (i < steps % n))
           for i, (rows, t) in enumerate(train) if steps // n + (i < steps % n)]
    out += [Trace(rows, 1, t, 1, first=layer, count=evals) for rows, t in valid]
    return out


def _chunks(n: int, batch_size: int, tokens: int) -> Chunks:
    return _batches([tokens] * n, batch_size) if n else []


def finetune_cost(dims: Dims, n_train: int, n_valid: int, prompt_tokens: int, steps: int = 40, batch_size: int = 32,
                  eval_every: int = 5, layer: int | None = None, quick_steps: int = 30, nbytes: int = 2,
                  relations: int = 1, baseline: bool = False, stage: str = "finetune",
                  datasets: list[dict[str, Chunks]] | None = None) -> CostPlan:
    """`finetune --remote` (one relation; `layer=None`: the layer search's short runs at `candidate_layers` plus the
    final run) and `bank build --remote` (`relations` jobs at one layer, each with its zero-shot baseline on whole
    prompts in batches of 64): `ffv_session.run_jobs` on the cached-prefix path (each chunk's whole prompts once,
    then the last token per step from the vector's layer up). `datasets` (per relation: "train", "valid", "base"
    chunks as (rows, padded tokens)) replaces the uniform `prompt_tokens` where the real prompts are known. Back per
    job: the vector (float32), its history and a few floats."""
    if datasets is None:
        uniform = {"train": _chunks(n_train, batch_size, prompt_tokens),
                   "valid": _chunks(n_valid, batch_size, prompt_tokens),
                   "base": _chunks(n_valid, 64, prompt_tokens) if baseline else []}
        datasets = [uniform] * (1 if layer is None else relations)
    at_layers = candidate_layers(dims.n_layers) if layer is None else [layer]  # the search's, or the one layer
    traces: list[Trace] = []
    n_jobs = 0
    same = Counter(id(data) for data in datasets)  # relations sharing one uniform dataset cost the same
    for data in {id(d): d for d in datasets}.values():
        k = same[id(data)]
        one = [Trace(rows, t, t, 1) for rows, t in data["train"] + data["valid"]]  # each chunk's prompts once
        if layer is None:
            for at in at_layers:
                one += _ffv_job_traces(at, quick_steps, data["train"], data["valid"], quick_steps)
            at = at_layers[len(at_layers) // 2]  # the final run's layer is decided on the server; costs barely differ
            n_jobs += k * len(at_layers)
        else:
            at = layer
        one += _ffv_job_traces(at, steps, data["train"], data["valid"], eval_every)
        one += [Trace(rows, t, t, 1) for rows, t in data.get("base", [])]
        n_jobs += k
        traces += [Trace(t.rows, t.tokens, t.keys, t.logits, t.first, t.backward_from, t.count * k) for t in one]
    # per chunk: ids, mask and positions of the whole prompts and the targets; a cached-prefix chunk (all but the
    # baseline's) also the last token's ids and positions, views that each ship their whole storage (the last
    # token's mask is the whole prompts' own)
    cached = sum(rows * t for data in datasets for rows, t in data["train"] + data["valid"])
    whole = sum(rows * t for data in datasets for rows, t in data.get("base", []))
    n_tensors = sum(6 * (len(data["train"]) + len(data["valid"])) + 4 * len(data.get("base", [])) for data in datasets)
    sent = session_bytes(run_jobs, dims) + 8 * (5 * cached + 3 * whole) + n_tensors * PAYLOAD_TENSOR_OVERHEAD \
        + n_jobs * (sent_bytes(dims.d_model, 4) + 16 * steps)
    # per job: the vector, a dict of a few floats and the history (about 30 bytes per step and per validation)
    returned = RESULT_OVERHEAD + n_jobs * (tensor_bytes(dims.d_model, 4) + 200 + 30 * (steps + steps // eval_every))
    handoffs = len({at - 1 for at in at_layers if at > 0})  # last-token outputs kept: the layer below each vector's
    kv_token = 2 * dims.n_layers * dims.n_kv_heads * dims.head_dim
    cache = nbytes * sum(rows * (kv_token * (t - 1) + handoffs * dims.d_model)
                         for data in datasets for rows, t in data["train"] + data["valid"])
    units = len(datasets) if stage == "bank" else n_train
    return CostPlan(stage, units, "relations" if stage == "bank" else "prompts", _merge(traces), sent, returned,
                extra_memory={"prefix_caches": cache},
                settings={"n_train": n_train, "n_valid": n_valid, "steps": steps, "batch_size": batch_size,
                          "eval_every": eval_every, "layer": "search" if layer is None else layer, "jobs": n_jobs,
                          **({"relations": len(datasets)} if stage == "bank" else {})},
                splittable=stage == "bank",
                note="steps are an upper bound (early stopping ends sooner); every chunk's prefix KV cache stays "
                     "on the server for the whole request (prefix_caches)")
