"""The learned combiner done properly: validation-chosen temperature and scale, early stopping, fixed profiles.

`analogy --train-combiner` fits the affine combiner for a fixed number of steps on one set. Here (Kang, Wu & Lu's
protocol, scaled to our data): the relation profiles of the training and held-aside items are computed once;
the softmax combiner's temperature T and the CFV scale are chosen on the held-aside part; the affine combiner
(init identity, l2 pull towards it) is trained on the rest at that T, its held-aside CFV accuracy checked every
`eval_every` steps, training stops after `patience` checks without improvement and the best checkpoint is kept;
then its own scale is chosen on the held-aside part. Nothing here looks at a test set.

Also: `analogies_from_relations`, multiple-choice analogies made from labelled relations (e.g. SemEval-2012's
subcategories): stem and answer are two pairs of one relation, the foils pairs of relations of other classes.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch

from fv_remote.relational.analogy import (AnalogySettings, Combiner, _choice_scores, _hits, _method_rows, cfv_weights,
                               choice_loss, combiner_steps)
from fv_remote.relational.analogy_scoring import first_token, first_token_logprobs_shared
from fv_remote.relational.bank import RelationBank
from fv_remote.data import MCAnalogy, RelationTask
from fv_remote.core.errors import UserError
from fv_remote.models.loading import LoadedModel

TEMPERATURES = (0.25, 0.5, 1.0, 2.0)
SCALES = (0.5, 1.0, 2.0)


def analogies_from_relations(tasks: Sequence[RelationTask], per_relation: int = 2, n_choices: int = 4,
                             seed: int = 0) -> list[MCAnalogy]:
    """Per relation, `per_relation` items A:B :: C:? whose answer C:D is another pair of the relation and whose
    foils C':D' are pairs of relations of other classes (`labels["class"]`, else other relations)."""
    rng = random.Random(seed)
    items = []
    for task in tasks:
        cls = task.labels.get("class", task.name)
        others = [t for t in tasks if t.labels.get("class", t.name) != cls and t.pairs]
        if len(task.pairs) < 2 * per_relation or len(others) < n_choices - 1:
            continue
        pairs = rng.sample(task.pairs, 2 * per_relation)
        for k in range(per_relation):
            stem, answer = pairs[2 * k], pairs[2 * k + 1]
            foils = [rng.choice(t.pairs) for t in rng.sample(others, n_choices - 1)]
            choices = foils + [answer]
            rng.shuffle(choices)
            items.append(MCAnalogy(stem, choices, choices.index(answer), task.name,
                                   {"relation": task.name, "family": cls}))
    return items


def cfv_hits(model: LoadedModel, bank: RelationBank, items: Sequence[MCAnalogy], weights: torch.Tensor | None,
             s: AnalogySettings, method: str = "cfv") -> np.ndarray:
    """0/1 per item for the CFV method (or icl_qa+cfv) with the given per-item weights over the bank (None: no
    vector, the method's prompts alone)."""
    rows, prompts, ds, template = _method_rows(list(items), s, method)
    mix = None if weights is None else weights[torch.tensor(rows)]
    return _hits(list(items), _choice_scores(model, bank, prompts, ds, template, mix, s, s.mode), s.mode)


@dataclass
class Selection:
    temperature: float
    scale: float
    grid: dict[str, float] = field(default_factory=dict)  # "T=..,scale=.." -> held-aside accuracy


def choose_softmax(model: LoadedModel, bank: RelationBank, items: Sequence[MCAnalogy], logp: torch.Tensor,
                   s: AnalogySettings, temperatures: Sequence[float] = TEMPERATURES,
                   scales: Sequence[float] = SCALES, method: str = "cfv") -> Selection:
    """The (T, scale) with the best held-aside accuracy of `method` ("cfv" or "icl_qa+cfv": the one-shot prompt
    plus the CFV, which may want a smaller scale than the CFV alone) (ties: the earlier grid point). The grid
    shares each prompt's forward (`choice_hits_shared`)."""
    points = [(t, sc) for t in temperatures for sc in scales]
    if not points:
        raise UserError("empty temperature or scale grid")
    hits = choice_hits_shared(model, bank, items, method, [(cfv_weights(logp, t), sc) for t, sc in points], s)
    grid, best = {}, None
    for (t, sc), h in zip(points, hits):
        acc = float(h.mean())
        grid[f"T={t:g},scale={sc:g}"] = acc
        if best is None or acc > best[0]:
            best = (acc, t, sc)
    assert best is not None
    return Selection(best[1], best[2], grid)


def choice_hits_shared(model: LoadedModel, bank: RelationBank, items: Sequence[MCAnalogy], method: str,
                       variants: Sequence[tuple[torch.Tensor | None, float]], s: AnalogySettings) -> list[np.ndarray]:
    """0/1 per item for each (per-item weights over the bank or None, scale) of one prompt kind (`method`'s:
    "cfv"/"best_ffv"/"no_vector" the query, "icl_qa"/"icl_qa+cfv" the one-shot prompt), multiple choice scored by
    the answer's first token; the prompts run once for all variants (`first_token_logprobs_shared`). Equal to
    `cfv_hits` per variant up to float rounding."""
    if s.mode != "mc" or s.score != "first":
        return [cfv_hits(model, bank, items, w, _with(s, scale=sc), method) for w, sc in variants]
    rows, prompts, ds, template = _method_rows(list(items), s, method)
    targets = [first_token(model.tokenizer, p, template.answer_text(d)) for p, d in zip(prompts, ds)]
    index = torch.tensor(rows)
    scores = first_token_logprobs_shared(model, prompts, cast(list[int], targets),
                                         [(None if w is None else w[index], sc) for w, sc in variants], bank,
                                         s.batch_size)
    return [_hits(list(items), sc, "mc") for sc in scores]


def _with(s: AnalogySettings, **changes: Any) -> AnalogySettings:
    from dataclasses import replace

    return replace(s, **changes)


def fit_combiner(model: LoadedModel, bank: RelationBank, train: Sequence[MCAnalogy], train_logp: torch.Tensor,
                 held: Sequence[MCAnalogy], held_logp: torch.Tensor, s: AnalogySettings, steps: int = 200,
                 lr: float = 0.05, l2: float = 1e-3, items_per_step: int = 8, eval_every: int = 10,
                 patience: int = 4, progress=None) -> Combiner:
    """Train W, b (init identity, 0; softmax(W·logp/T + b)) on `train`, keep the checkpoint with the best
    held-aside CFV accuracy (ties: lower held-aside loss); stop after `patience` checks without a better one."""
    if not train or not held:
        raise UserError("the combiner needs training and held-aside analogies")
    comb = Combiner.identity(bank.names, s.temperature)
    history: list[dict[str, float]] = []

    def check(step: int, weight: torch.Tensor, bias: torch.Tensor) -> tuple[float, float]:
        with torch.no_grad():
            w = torch.softmax((held_logp / s.temperature) @ weight.T + bias, -1)
            loss, acc = choice_loss(model, bank, held, w, s)
        history.append({"step": step, "held_acc": acc, "held_loss": float(loss)})
        return acc, float(loss)

    best_acc, best_loss = check(0, comb.weight, comb.bias)
    best = (comb.weight.clone(), comb.bias.clone(), 0)
    since = 0
    for step, _, weight, bias in combiner_steps(model, bank, train, train_logp, s, steps, lr, l2, items_per_step):
        if progress:
            progress(step, steps)
        if step % eval_every == 0:
            acc, held_loss = check(step, weight, bias)
            if acc > best_acc or (acc == best_acc and held_loss < best_loss):
                best_acc, best_loss, best, since = acc, held_loss, (weight.detach().clone(),
                                                                   bias.detach().clone(), step), 0
            else:
                since += 1
                if since >= patience:
                    break
    comb.weight, comb.bias = best[0], best[1]
    comb.meta = {"n_train": len(train), "n_held": len(held), "best_step": best[2], "held_acc": best_acc,
                 "unchanged": best[2] == 0,  # the identity map won on the held-aside items: the plain softmax CFV
                 "lr": lr, "l2": l2, "items_per_step": items_per_step, "eval_every": eval_every,
                 "patience": patience, "history": history}
    return comb


def choose_scale(model: LoadedModel, bank: RelationBank, items: Sequence[MCAnalogy], weights: torch.Tensor,
                 s: AnalogySettings, scales: Sequence[float] = SCALES) -> Selection:
    grid = {f"scale={sc:g}": float(cfv_hits(model, bank, items, weights, _with(s, scale=sc)).mean())
            for sc in scales}
    best = max(scales, key=lambda sc: (grid[f"scale={sc:g}"], -scales.index(sc)))
    return Selection(s.temperature, best, grid)
