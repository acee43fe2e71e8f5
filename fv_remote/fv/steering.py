"""Steering: add a function vector at one layer (or distributed over its heads' own layers), at the last token or at
every position.

Used for scoring (top-1 next token, answer probability) and for generation. `positions="last"` (the FV papers' rule,
the default) touches only the prompt's last token and generated tokens are not steered again; `positions="all"` adds
the vector at every position of the prompt and of every generated token, as a llama.cpp control vector does
(`fv_remote.export.llamacpp`).

Every function runs where the model's executor says (`model.using(...)`): locally, as one NDIF request (a session
around all its traces), or as nnsight's in-process dry run of one. Several scoring conditions (`Condition`) share a
request through `score_conditions` / `logits_conditions`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import nnsight
import torch

from fv_remote.core.errors import UserError, require_positive
from fv_remote.execution import check_shippable, executor_of, stage_session
from fv_remote.models.loading import LoadedModel
from fv_remote.traces.patching import apply_edits, last_token_value, top_probs
from fv_remote.fv.vectors import FunctionVector, directions

POSITIONS = ("last", "all")


def check_positions(positions: str, flag: str = "--positions") -> str:
    if positions not in POSITIONS:
        raise UserError(f"{flag} must be one of {', '.join(POSITIONS)} (last: the prompt's last token, as in the FV "
                        f"papers; all: every position of the prompt and of generated tokens, as a llama.cpp control "
                        f"vector), got {positions!r}")
    return positions


def default_positions(fv: FunctionVector) -> str:
    """Where a vector is added unless told: an imported control vector at every position (llama.cpp's rule), any
    other vector at the last token."""
    value = fv.meta.get("positions") if isinstance(fv.meta, dict) else None
    return value if value in POSITIONS else "last"


@dataclass
class Steer:
    """What to add: `vector` at `layer` (times `scale`), or with distributed=True each head's mean in its slot;
    `positions` "last" (the prompt's last token) or "all" (every position, generated tokens included). A vector
    whose `apply` is "replace" (a task vector) is patched in at the last token instead of added.

    A multi-layer control vector (`export.llamacpp.import_control_vector`) adds each layer's direction at its own
    layer; `layer` then must be None (or its first layer)."""

    fv: FunctionVector
    layer: int | None = None
    scale: float = 1.0
    distributed: bool = False
    positions: str = "last"

    def __post_init__(self) -> None:
        check_positions(self.positions, "positions")

    def resolved_layer(self, model: LoadedModel) -> int:
        return model.adapter.check_layer(self.fv.layer if self.layer is None else self.layer)

    def describe(self, model: LoadedModel) -> str:
        """e.g. "layer 12, positions all, scale 4" (for tables and messages)."""
        layers = sorted(directions(self.fv)) if self.layer is None and not self.distributed else []
        if self.distributed:
            where = "distributed over its heads"
        elif len(layers) > 1:
            where = f"layers {layers[0]}-{layers[-1]} ({len(layers)} directions)"
        else:
            where = f"layer {self.resolved_layer(model)}"
        return f"{where}, positions {self.positions}, scale {self.scale:g}"


def steer_edits(model: LoadedModel, steer: Steer | None) -> list[tuple]:
    """The edits a steer makes, as plain tuples of envoys and tensors (`traces.patching.apply_edits`' plan).

    Plain values only, so the plan can travel in a remote request (a Steer or FunctionVector cannot).
    """
    if steer is None:
        return []
    ad, lm = model.adapter, model.lm
    every = check_positions(steer.positions, "positions") == "all"
    if steer.distributed:
        if not steer.fv.heads or steer.fv.head_means is None:
            raise UserError(f"this {steer.fv.kind.upper()} has no per-head means; distributed steering needs an "
                            "FV built by `fv-remote fit`")
        order = sorted(range(len(steer.fv.heads)), key=lambda i: steer.fv.heads[i])  # forward order
        edits = []
        for i in order:
            layer, head = steer.fv.heads[i]
            edits.append(("head_all" if every else "head", ad.head_site(lm, layer), head, ad.head_dim,
                          steer.scale * steer.fv.head_means[i]))
        return edits
    if steer.fv.apply == "replace":  # a task vector: patched in at the last token (Hendel et al. 2023)
        if every:
            raise UserError(f"this {steer.fv.kind.upper()} replaces the last token's residual stream; --positions all "
                            "does not apply (use positions last)")
        if steer.scale != 1:
            raise UserError(f"this {steer.fv.kind.upper()} replaces the residual stream instead of adding to it; "
                            f"a scale ({steer.scale:g}) does not apply (use 1)")
        return [("set_residual", ad.layer(lm, steer.resolved_layer(model)), ad.layer_output_is_tuple,
                 steer.fv.vector, 1.0)]
    kind = "residual_all" if every else "residual"
    by_layer = directions(steer.fv)
    if len(by_layer) > 1:  # an imported multi-layer control vector: each direction at its own layer
        if steer.layer is not None and steer.layer != steer.fv.layer:
            raise UserError(f"this {steer.fv.kind.upper()} has directions for {len(by_layer)} layers "
                            f"({min(by_layer)}-{max(by_layer)}); each is added at its own layer, so --layer does "
                            f"not apply")
        return [(kind, ad.layer(lm, ad.check_layer(layer)), ad.layer_output_is_tuple, vector, steer.scale)
                for layer, vector in sorted(by_layer.items())]
    layer = steer.resolved_layer(model)
    return [(kind, ad.layer(lm, layer), ad.layer_output_is_tuple, steer.fv.vector, steer.scale)]


@dataclass
class Condition:
    """One scoring condition: prompts, an optional steer, answer ids (for accuracy) and the batch size."""

    texts: list[str]
    steer: Steer | None = None
    answer_ids: list[int] | None = None
    batch_size: int = 16


def _check_lengths(model: LoadedModel, conditions: list[Condition]) -> None:
    """Every prompt fits the model's context (checked once per prompt text and model: sweeps repeat them), before
    any forward pass."""
    from fv_remote.core.checks import check_prompt_lengths

    seen = model.__dict__.setdefault("_length_checked", set())
    new = {hash(t): t for cond in conditions for t in cond.texts if hash(t) not in seen}
    if new:
        check_prompt_lengths(model, list(new.values()), "prompt")
        seen.update(new)


def condition_work(model: LoadedModel, conditions: list[Condition]) -> tuple[list[tuple[list[str], list[tuple]]],
                                                                            list[int]]:
    """The batches of all conditions as plain values ((texts, edits) per batch) and the condition each belongs to."""
    _check_lengths(model, conditions)
    work: list[tuple[list[str], list[tuple]]] = []
    owners: list[int] = []
    chunks_of: dict[tuple[int, int], list[list[str]]] = {}  # id(texts) -> its batches, so shared prompt lists ship once
    for index, cond in enumerate(conditions):
        require_positive("batch_size", cond.batch_size)
        if cond.steer is not None:
            cond.steer.fv.check_model(model)
        edits = steer_edits(model, cond.steer)
        key = (id(cond.texts), cond.batch_size)
        if key not in chunks_of:
            chunks_of[key] = [list(cond.texts[i:i + cond.batch_size])
                              for i in range(0, len(cond.texts), cond.batch_size)]
        for texts in chunks_of[key]:
            work.append((texts, edits))
            owners.append(index)
    return work, owners


def last_token_body(model: LoadedModel, work: list[tuple[list[str], list[tuple]]], top1: bool,
                    top_k: int = 0) -> list[Any]:
    """The scoring body: per batch of `work`, last-token float32 logits [B, vocab], top-1 ids [B], or with `top_k`
    the (probabilities [B, k], ids [B, k]) of the k most probable next tokens; all batches in one session.

    The session body reads only plain values, envoys and `fv_remote.traces` helpers (it travels as source). It ends
    by clearing its variables: the server returns every one whose object was saved (by id, and ids of freed saved
    objects get reused), so only `outs` goes back.
    """
    lm = model.lm
    unembed = model.adapter.unembed(lm)
    outs: list[torch.Tensor] = []
    session = executor_of(model).session
    if session:
        check_shippable(work=work)
    if not work:
        return outs
    with stage_session(model):
        for texts, edits in work:
            with lm.trace(texts):
                apply_edits(edits)
                value = last_token_value(unembed.output[:, -1], top1).save()
            outs.append(top_probs(value, top_k) if top_k else value.detach().cpu())
        # Nothing else may travel back: unbind the body's other values (typed as they were bound).
        value = texts = edits = None  # type: ignore[assignment]
        if session:
            outs = nnsight.save(outs)
    return outs


def _last_token_runs(model: LoadedModel, conditions: list[Condition], top1: bool, top_k: int = 0) -> list[Any]:
    """Per condition: `last_token_body`'s outputs concatenated; all conditions in one session."""
    work, owners = condition_work(model, conditions)
    mine = by_condition(last_token_body(model, work, top1, top_k), owners, len(conditions))
    if top_k:
        return [(torch.cat([p for p, _ in m]), torch.cat([t for _, t in m])) if m else
                (torch.empty(0, top_k), torch.empty(0, top_k, dtype=torch.long)) for m in mine]
    empty = torch.empty(0, dtype=torch.long) if top1 else torch.empty(0, model.adapter.vocab_size)
    return [torch.cat(m) if m else empty for m in mine]


def by_condition(outs: list, owners: list[int], n: int) -> list[list]:
    """The body's per-batch outputs grouped by the condition each batch belongs to."""
    if len(outs) != len(owners):
        raise UserError(f"the scoring returned {len(outs)} batches, expected {len(owners)}")
    return [[o for o, i in zip(outs, owners) if i == index] for index in range(n)]


def logits_conditions(model: LoadedModel, conditions: list[Condition]) -> list[torch.Tensor]:
    """Last-token logits [N, vocab] (float32, CPU) for each condition; one NDIF request for all on NDIF."""
    return _last_token_runs(model, conditions, top1=False)


def top_tokens_conditions(model: LoadedModel, conditions: list[Condition],
                          k: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The k most probable next tokens per condition: (probabilities [N, k] float32, token ids [N, k]), CPU.

    The softmax and top-k run where the model is: remotely only k probabilities and ids per prompt come back, not
    the logits over the whole vocabulary.
    """
    require_positive("top", k)
    return _last_token_runs(model, conditions, top1=False, top_k=min(k, model.adapter.vocab_size))


def answer_ids_of(conditions: list[Condition]) -> list[list[int]]:
    """Each condition's answer ids (checked: one per prompt)."""
    for cond in conditions:
        if not cond.texts:
            raise UserError("no prompts to evaluate")
        if cond.answer_ids is None or len(cond.answer_ids) != len(cond.texts):
            raise UserError("each condition needs one answer id per prompt")
    return [list(map(int, cond.answer_ids or [])) for cond in conditions]


def accuracies(outs: list, owners: list[int], answer_ids: list[list[int]]) -> list[float]:
    """Top-1 accuracy per condition from `last_token_body(top1=True)`'s per-batch outputs."""
    tops = by_condition(outs, owners, len(answer_ids))
    return [float((torch.cat(top) == torch.tensor(ids)).float().mean()) if top else 0.0
            for top, ids in zip(tops, answer_ids)]


def score_conditions(model: LoadedModel, conditions: list[Condition]) -> list[float]:
    """Top-1 accuracy of each condition (needs `answer_ids`); only the top-1 ids travel back from NDIF."""
    answer_ids = answer_ids_of(conditions)
    work, owners = condition_work(model, conditions)
    return accuracies(last_token_body(model, work, top1=True), owners, answer_ids)


def last_logits(model: LoadedModel, texts: list[str], steer: Steer | None = None,
                batch_size: int = 16) -> torch.Tensor:
    """Last-token logits [N, vocab] (float32, CPU), batched with left padding."""
    require_positive("batch_size", batch_size)
    return logits_conditions(model, [Condition(list(texts), steer, batch_size=batch_size)])[0]


def top1_accuracy(model: LoadedModel, texts: list[str], answer_ids: list[int], steer: Steer | None = None,
                  batch_size: int = 16) -> float:
    if not texts:
        raise UserError("no prompts to evaluate")
    require_positive("batch_size", batch_size)
    return score_conditions(model, [Condition(list(texts), steer, list(answer_ids), batch_size)])[0]


def generate_many(model: LoadedModel, runs: list[tuple[str, Steer | None]], max_new_tokens: int = 12) -> list[str]:
    """Greedy continuations (only the new text) of (prompt, steer) pairs; one NDIF request for all on NDIF."""
    require_positive("max_new_tokens", max_new_tokens)
    work = []
    for prompt, steer in runs:
        if steer is not None:
            steer.fv.check_model(model)
        every_step = steer is not None and steer.positions == "all"
        work.append((prompt, steer_edits(model, steer), every_step))
    lm = model.lm
    pad = model.tokenizer.pad_token_id
    outs: list[torch.Tensor] = []
    session = executor_of(model).session
    if session:
        check_shippable(work=work)
    with stage_session(model):
        for prompt, edits, every_step in work:
            with lm.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad) as tracer:
                if every_step:  # positions "all": the prompt at step 0, then each new token at its own step
                    for _ in tracer.iter[:max_new_tokens]:
                        apply_edits(edits)
                else:
                    apply_edits(edits)  # first step only: the prompt's last token
                tokens = tracer.result.save()
            outs.append(tokens.detach().cpu())
        # Nothing else may travel back: unbind the body's other values (typed as they were bound).
        tokens = tracer = prompt = edits = every_step = None  # type: ignore[assignment]
        if session:
            outs = nnsight.save(outs)
    texts = []
    for (prompt, _), tokens in zip(runs, outs):
        n_prompt = len(model.tokenizer(prompt).input_ids)
        texts.append(model.tokenizer.decode(tokens[0][n_prompt:], skip_special_tokens=True))
    return texts


def generate(model: LoadedModel, prompt: str, steer: Steer | None = None, max_new_tokens: int = 12) -> str:
    """Greedy continuation of `prompt` (only the new text), optionally steered (at the prompt's last token, or with
    positions "all" at every position of the prompt and of the generated tokens)."""
    return generate_many(model, [(prompt, steer)], max_new_tokens)[0]
