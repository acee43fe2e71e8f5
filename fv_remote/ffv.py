"""Fine-tuned function vectors (Kang, Wu & Lu 2026): train only the vector, with the model frozen.

The vector v is added at the last token of one layer's output; the loss is the cross-entropy of the answer's
first token at the last position of zero-shot prompts ("Q: x\\nA:"), plus an optional λ‖v − v0‖² toward the
initial vector. Adam with a cosine learning-rate schedule; every `eval_every` steps the validation loss is
measured and the best vector so far is kept; training stops after `patience` steps without improvement.

Every forward pass is an nnsight trace (`_trace_loss`): add the vector, read the logits, compute and `.save()` the
loss; `backward()` and the optimiser step run outside the trace. With `remote=True` the same loop runs inside one
`model.session()`, as a single NDIF job (`fv_remote.ffv_session`).

The result is a `FunctionVector` with kind="ffv" (same file format as an FV), so `fv-remote evaluate` and steering
take it as is.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fv_remote.errors import UserError, require_positive
from fv_remote.models import LoadedModel
from fv_remote.remote import remote_mode
from fv_remote.tasks import PreparedTask
from fv_remote.traces.patching import add_to_residual, layer_hidden
from fv_remote.vectors import FunctionVector

INITS = ("fv", "zero", "random")
Progress = Callable[[int, int], None]


@dataclass
class FinetuneSettings:
    steps: int = 40  # optimiser steps at most (early stopping may end sooner)
    lr: float = 0.2  # peak Adam learning rate; cosine-decayed to lr * min_lr_ratio
    min_lr_ratio: float = 0.05
    l2: float = 0.0  # λ of λ‖v − v0‖² (pulls the vector toward its initial value)
    batch_size: int = 32  # prompts per step (all training prompts when there are fewer)
    eval_every: int = 5  # steps between validation checks
    patience: int = 15  # steps without a better validation loss before stopping
    seed: int = 0
    fast: bool = True  # cached prefix + last token from the vector's layer up (exact; see `Prefix`)

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


def trace_kwargs(model: LoadedModel) -> dict[str, Any]:
    """Ask for last-position logits only when the model supports it (saves the [B, T, vocab] unembedding)."""
    import inspect

    try:
        params = inspect.signature(model.hf.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def _trace_loss(model: LoadedModel, texts: list[str], targets: torch.Tensor, vector: torch.Tensor, layer: int):
    """(mean cross-entropy of the targets at the last position, top-1 hits) with `vector` added at `layer`."""
    ad, lm = model.adapter, model.lm
    with lm.trace(texts, **trace_kwargs(model)):
        add_to_residual(ad.layer(lm, layer), ad.layer_output_is_tuple, vector)
        logits = ad.unembed(lm).output[:, -1].float()
        loss = torch.nn.functional.cross_entropy(logits, targets)
        hits = (logits.argmax(-1) == targets).sum()
        loss.save()
        hits.save()
    return loss, hits


@dataclass
class Prefix:
    """A batch of prompts run once without gradients: the keys/values of all but the last token, and every
    layer's output at the last token.

    The vector only changes the last token's residual stream from its layer up, and causal attention means no
    earlier token sees it. So a training step can feed just the last token against the cached keys/values and
    skip the decoder layers below the vector's layer (their output there is known): exact, and far cheaper than
    the whole prompt through the whole model. `finetune` checks the first step against the full forward and falls
    back to it (with a warning in the result's meta) if they differ.
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


def _trace_loss_fast(model: LoadedModel, prefix: Prefix, vector: torch.Tensor, layer: int):
    """`_trace_loss` from a `Prefix`: the last token only, decoder layers below `layer` skipped."""
    ad, lm = model.adapter, model.lm
    replacement = None
    if layer > 0:
        h = prefix.hidden[layer - 1]
        replacement = (h, None) if ad.layer_output_is_tuple else h
    targets = prefix.targets
    with lm.trace(input_ids=prefix.last_ids, attention_mask=prefix.mask, position_ids=prefix.position,
                  past_key_values=copy.deepcopy(prefix.cache), use_cache=True, **trace_kwargs(model)):
        for skipped in range(layer):  # forward order: the skipped layers first
            ad.layer(lm, skipped).skip(replacement)
        add_to_residual(ad.layer(lm, layer), ad.layer_output_is_tuple, vector)
        logits = ad.unembed(lm).output[:, -1].float()
        loss = torch.nn.functional.cross_entropy(logits, targets)
        hits = (logits.argmax(-1) == targets).sum()
        loss.save()
        hits.save()
    return loss, hits


def chunk_examples(data: Examples, batch_size: int, seed: int = 0,
                   shuffle: bool = True) -> list[tuple[list[str], torch.Tensor]]:
    """Fixed chunks of (texts, targets), shuffled once with `seed` when there are more than `batch_size`."""
    order = list(range(len(data)))
    if shuffle and len(data) > batch_size:
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    return [([data.texts[i] for i in order[start:start + batch_size]], data.targets[order[start:start + batch_size]])
            for start in range(0, len(order), batch_size)]


class Batches:
    """Training/validation data in fixed chunks, each with its cached prefix when the fast path is on."""

    def __init__(self, model: LoadedModel, data: Examples, batch_size: int, fast: bool, seed: int = 0,
                 shuffle: bool = True):
        self.model = model
        self.chunks = [(texts, targets, build_prefix(model, texts, targets) if fast else None)
                       for texts, targets in chunk_examples(data, batch_size, seed, shuffle)]
        self.n = len(data)

    def loss(self, i: int, vector: torch.Tensor, layer: int):
        texts, targets, prefix = self.chunks[i % len(self.chunks)]
        if prefix is not None:
            return _trace_loss_fast(self.model, prefix, vector, layer)
        return _trace_loss(self.model, texts, targets, vector, layer)

    def score(self, vector: torch.Tensor, layer: int) -> tuple[float, float]:
        total, hits = 0.0, 0
        with torch.no_grad():
            for i, (texts, _, _) in enumerate(self.chunks):
                loss, n_hit = self.loss(i, vector.detach(), layer)
                total += float(loss) * len(texts)
                hits += int(n_hit)
        return total / self.n, hits / self.n


def check_fast(model: LoadedModel, batches: "Batches", vector: torch.Tensor, layer: int, tol: float = 1e-3) -> bool:
    """Whether the cached-prefix loss equals the full forward's on the first chunk."""
    texts, targets, prefix = batches.chunks[0]
    with torch.no_grad():
        fast, _ = _trace_loss_fast(model, prefix, vector, layer)
        full, _ = _trace_loss(model, texts, targets, vector, layer)
    return abs(float(fast) - float(full)) <= tol * max(1.0, abs(float(full)))


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


def prepare_batches(model: LoadedModel, data: "Examples | Batches | None", settings: FinetuneSettings,
                    layer: int, note: dict | None = None) -> "Batches | None":
    """Examples -> Batches (cached prefixes when `settings.fast`, checked once against the full forward)."""
    if data is None or isinstance(data, Batches):
        return data
    if not len(data):
        return None
    if settings.fast:
        try:
            batches = Batches(model, data, settings.batch_size, True, settings.seed)
            probe = batches.chunks[0][2].hidden[layer][0, 0].float()  # a vector on the residual stream's scale
            if check_fast(model, batches, probe, layer):
                return batches
            reason = "cached-prefix loss differed from the full forward"
        except Exception as exc:  # noqa: BLE001 - any architecture quirk: fall back to the exact full forward
            reason = f"{type(exc).__name__}: {exc}"
        if note is not None:
            note["fast_fallback"] = reason
    return Batches(model, data, settings.batch_size, False, settings.seed)


def finetune(model: LoadedModel, train: "Examples | Batches", valid: "Examples | Batches | None",
             init_vector: torch.Tensor, layer: int, settings: FinetuneSettings | None = None, task: str = "",
             init: str = "custom", source: FunctionVector | None = None,
             progress: Progress | None = None, remote: Any = False) -> FinetuneResult:
    """Optimise a vector added at `layer` so the frozen model answers the zero-shot training prompts.

    Without a validation set the last vector is kept and there is no early stopping. With more training prompts
    than `batch_size`, fixed chunks (shuffled once) are cycled. `remote=True` runs the whole optimisation (Adam,
    schedule, validation, early stopping) as one NDIF request (`fv_remote.ffv_session`); `train`/`valid` must then
    be Examples.
    """
    s = (settings or FinetuneSettings()).check()
    layer = model.adapter.check_layer(layer)
    if train is None or not len(train if isinstance(train, Examples) else range(train.n)):
        raise UserError("no training prompts")
    if init_vector.shape != (model.adapter.d_model,):
        raise UserError(f"initial vector has shape {tuple(init_vector.shape)}, the model needs "
                        f"({model.adapter.d_model},)")
    if remote_mode(remote):
        if isinstance(train, Batches) or isinstance(valid, Batches):
            raise UserError("remote fine-tuning takes Examples (the prompts are batched on the server)")
        from fv_remote.ffv_session import finetune_remote

        return finetune_remote(model, train, valid, init_vector, layer, s, task, init, source, remote)
    note: dict[str, Any] = {}
    train_b = prepare_batches(model, train, s, layer, note)
    valid_b = prepare_batches(model, valid, s, layer, note)
    v0 = init_vector.detach().float().clone()
    vector = v0.clone().requires_grad_(True)
    opt = torch.optim.Adam([vector], lr=s.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(cosine_factor, s))
    history: dict[str, list] = {"step": [], "train_loss": [], "lr": [], "eval_step": [], "valid_loss": [],
                                "valid_acc": []}

    def evaluate(step: int) -> tuple[float, float]:
        loss, acc = valid_b.score(vector, layer)
        history["eval_step"].append(step)
        history["valid_loss"].append(loss)
        history["valid_acc"].append(acc)
        return loss, acc

    best = vector.detach().clone()
    best_step, best_loss, best_acc = 0, math.inf, math.nan
    if valid_b is not None:
        best_loss, best_acc = evaluate(0)
    stopped = False
    for step in range(1, s.steps + 1):
        opt.zero_grad()
        loss, _ = train_b.loss(step - 1, vector, layer)
        history["step"].append(step)
        history["train_loss"].append(float(loss.detach()))
        history["lr"].append(opt.param_groups[0]["lr"])
        if s.l2:
            loss = loss + s.l2 * (vector - v0).pow(2).sum()
        loss.backward()
        opt.step()
        sched.step()
        if progress:
            progress(step, s.steps)
        if valid_b is None:
            best, best_step = vector.detach().clone(), step
            continue
        if step % s.eval_every == 0 or step == s.steps:
            v_loss, v_acc = evaluate(step)
            if v_loss < best_loss:
                best, best_step, best_loss, best_acc = vector.detach().clone(), step, v_loss, v_acc
            elif step - best_step >= s.patience:
                stopped = True
                break
    if progress:
        progress(s.steps, s.steps)
    meta: dict[str, Any] = {"n_train": train_b.n, "n_valid": valid_b.n if valid_b else 0,
                            "n_train_batches": len(train_b.chunks), **note}
    meta["moved"] = float((vector.detach() - v0).norm())
    return finetune_result(model, best, layer, history, best_step, best_loss, best_acc, stopped, float(v0.norm()),
                           s, task, init, source, meta)


def cosine_factor(s: FinetuneSettings, step: int) -> float:
    """The learning-rate factor at `step`: cosine from 1 down to `min_lr_ratio` over `steps`."""
    return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * step / s.steps))


def finetune_result(model: LoadedModel, best: torch.Tensor, layer: int, history: dict[str, list], best_step: int,
                    best_loss: float, best_acc: float, stopped: bool, init_norm: float, s: FinetuneSettings,
                    task: str, init: str, source: FunctionVector | None, extra: dict) -> FinetuneResult:
    """The FFV (metadata included) and its training record, from a local or a remote run.

    Refuses (UserError) a run whose losses or vector are not finite, or whose optimiser never moved the vector
    (`extra["moved"]`: the norm of final - initial vector): saving such a vector would be a silent wrong result.
    """
    check_trained(history, best, extra.get("moved"), s.steps, task)
    meta: dict[str, Any] = {
        "init": init, "settings": s.as_dict(), "n_train": extra.pop("n_train"), "n_valid": extra.pop("n_valid"),
        "best_step": best_step, "best_valid_loss": best_loss, "best_valid_acc": best_acc,
        "stopped_early": stopped, "init_norm": init_norm, "norm": float(best.norm()), **extra,
    }
    if source is not None:
        meta["source"] = {"task": source.task, "layer": source.layer, "kind": source.kind,
                          "heads": [list(h) for h in source.heads]}
    ffv = FunctionVector(vector=best, model=model.model_id, task=task or (source.task if source else ""),
                         layer=layer, heads=list(source.heads) if source else [], kind="ffv", meta=meta)
    return FinetuneResult(ffv, history, best_step, best_loss, best_acc, stopped)


def check_trained(history: dict[str, list], best: torch.Tensor, moved: float | None, steps: int, task: str = "") -> None:
    """A fine-tuning run is usable: finite training losses and vector, and a vector the optimiser moved."""
    what = f"fine-tuning {task!r}" if task else "fine-tuning"
    bad = [step for step, loss in zip(history.get("step", []), history.get("train_loss", [])) if not math.isfinite(loss)]
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


def select_layer(model: LoadedModel, train: "Examples | Batches", valid: "Examples | Batches", layers: Sequence[int],
                 make_init: Callable[[int], torch.Tensor], settings: FinetuneSettings | None = None,
                 quick_steps: int = 30, progress: Progress | None = None) -> dict[int, dict[str, float]]:
    """Short fine-tuning runs at each candidate layer -> {layer: {"valid_loss", "valid_acc"}}.

    Pick with `best_ffv_layer`. `make_init(layer)` gives each run's starting vector.
    """
    if valid is None or (isinstance(valid, Examples) and not len(valid)):
        raise UserError("choosing the FFV layer needs validation pairs")
    quick = quick_settings(settings or FinetuneSettings(), quick_steps)
    results = {}
    layers = list(layers)
    train = prepare_batches(model, train, quick, layers[0])  # the cached prefixes serve every layer
    valid = prepare_batches(model, valid, quick, layers[0])
    for i, layer in enumerate(layers):
        res = finetune(model, train, valid, make_init(layer), layer, quick)
        results[int(layer)] = {"valid_loss": res.best_valid_loss, "valid_acc": res.best_valid_acc}
        if progress:
            progress(i + 1, len(layers))
    return results


def best_ffv_layer(results: dict[int, dict[str, float]]) -> int:
    """Highest validation accuracy; ties go to the lower validation loss."""
    return min(results, key=lambda layer: (-results[layer]["valid_acc"], results[layer]["valid_loss"]))


def candidate_layers(n_layers: int, fv_layer: int | None = None, n: int = 5) -> list[int]:
    """A handful of layers spread over the first two thirds of the model, plus the FV's own layer."""
    top = max(1, (2 * n_layers) // 3)
    picks = {round(i * top / n) for i in range(1, n + 1)}
    if fv_layer is not None:
        picks.add(int(fv_layer))
    return sorted(x for x in picks if 0 <= x < n_layers)


def loss_curve(history: dict[str, list], path: str | Path, title: str = "") -> Path:
    """Training loss per step and validation loss per check; the kept step marked."""
    from fv_remote.plots import _save, plt

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


@dataclass
class FFVRun:
    """What `train_ffv` did: the result, the layer search (if any) and the data sizes."""

    result: FinetuneResult
    layer_search: dict[int, dict[str, float]] = field(default_factory=dict)
    n_train: int = 0
    n_valid: int = 0


def train_ffv(model: LoadedModel, prepared: PreparedTask, fv: FunctionVector | None = None, init: str = "fv",
              layer: int | str | None = None, n_train: int = 20, n_valid: int = 30,
              settings: FinetuneSettings | None = None, quick_steps: int = 30,
              progress: Progress | None = None, remote: Any = False) -> FFVRun:
    """Fine-tune on the first `n_train` training pairs, validate on up to `n_valid` validation pairs.

    `layer`: an int; None = the FV's layer (required without an FV); "auto" = short runs on `candidate_layers`
    and the best by validation accuracy (then loss). `remote=True`: all of it (the layer search included) is one
    NDIF request; `progress` is then called once, at the end.
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
    if remote_mode(remote):
        from fv_remote.ffv_session import train_ffv_remote

        run = train_ffv_remote(model, prepared.name, train, valid, fv, init, fv.layer if layer is None else layer,
                               s, quick_steps, remote)
        if progress:
            progress(s.steps, s.steps)
        return run

    def make_init(at: int) -> torch.Tensor:
        return initial_vector(model, init, fv, at, train.texts, s.seed)

    search: dict[int, dict[str, float]] = {}
    if layer == "auto":
        search = select_layer(model, train, valid, candidate_layers(model.adapter.n_layers, fv.layer if fv else None),
                              make_init, s, quick_steps)
        layer = best_ffv_layer(search)
    elif layer is None:
        layer = fv.layer
    layer = model.adapter.check_layer(int(layer))
    result = finetune(model, train, valid, make_init(layer), layer, s, task=prepared.name, init=init, source=fv,
                      progress=progress)
    if search:
        result.ffv.meta["layer_search"] = {str(k): v for k, v in search.items()}
    return FFVRun(result, search, len(train), len(valid) if valid else 0)
