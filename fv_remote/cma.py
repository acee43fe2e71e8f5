"""Causal mediation: the average indirect effect (AIE) of each head on shuffled-label prompts.

For a corrupted prompt and a head (l, h), the indirect effect is P(answer | head's last-token output set to its
mean clean activation) - P(answer | corrupted). Three implementations, all exact:

- `fast`: the patch only touches the last token, so the prefix's keys/values are computed once and reused; the
  last token is then recomputed for many patches at once (one batch row per patched head).
- `invoke_per_head`: the whole prompt once per head, batched as rows of one forward (the classic batching).
- `naive`: one separate forward per head (the reference).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import xarray as xr

from fv_remote.errors import UserError, require_positive
from fv_remote.models import LoadedModel
from fv_remote.store import PROMPT_DIM, ActivationStore
from fv_remote.tasks import PreparedTask
from fv_remote.traces.mediation import answer_prob, patch_rows
from fv_remote.traces.patching import set_head

Heads = list[tuple[int, int]]
METHODS = ("fast", "invoke_per_head", "naive")


def all_heads(model: LoadedModel) -> Heads:
    ad = model.adapter
    return [(layer, head) for layer in range(ad.n_layers) for head in range(ad.n_heads)]


def _encode(model: LoadedModel, text: str) -> torch.Tensor:
    return model.tokenizer(text, return_tensors="pt").input_ids


def _patched_forward(model: LoadedModel, heads: Heads, means: torch.Tensor, answer_id: int, **inputs) -> torch.Tensor:
    """One forward where row r+1 patches heads[r] and row 0 is unpatched; returns P(answer) per row."""
    ad, lm = model.adapter, model.lm
    by_layer: dict[int, list[tuple[int, int]]] = {}
    for row, (layer, head) in enumerate(heads, start=1):
        by_layer.setdefault(layer, []).append((row, head))
    with lm.trace(**inputs):
        for layer in sorted(by_layer):  # forward order
            rows, hs = zip(*by_layer[layer])
            rows_t, heads_t = torch.tensor(rows), torch.tensor(hs)
            patch_rows(ad.head_site(lm, layer), rows_t, heads_t, means[layer, heads_t], ad.n_heads, ad.head_dim)
        probs = answer_prob(ad.unembed(lm).output, answer_id).save()
    return probs.detach().cpu()


def cma_prompt_fast(model: LoadedModel, text: str, answer_id: int, means: torch.Tensor,
                    heads: Heads | None = None, chunk: int = 128) -> tuple[float, torch.Tensor]:
    """(P(answer | corrupted), indirect effect per head) with the prefix computed once."""
    heads = heads or all_heads(model)
    ids = _encode(model, text)
    n_tokens = ids.shape[1]
    if n_tokens < 2:
        raise UserError("a prompt needs at least two tokens for cached mediation")
    with model.lm.trace(input_ids=ids[:, :-1], use_cache=True):
        prefix_cache = model.lm.output.past_key_values.save()
    base, effects = None, []
    for start in range(0, len(heads), chunk):
        part = heads[start:start + chunk]
        rows = len(part) + 1
        cache = copy.deepcopy(prefix_cache)
        cache.batch_repeat_interleave(rows)
        probs = _patched_forward(
            model, part, means, answer_id,
            input_ids=ids[:, -1:].expand(rows, 1),
            past_key_values=cache,
            attention_mask=torch.ones(rows, n_tokens, dtype=torch.long),
            position_ids=torch.full((rows, 1), n_tokens - 1, dtype=torch.long),
        )
        base = float(probs[0]) if base is None else base
        effects.append(probs[1:] - probs[0])
    return base, torch.cat(effects)


def cma_prompt_invoke_per_head(model: LoadedModel, text: str, answer_id: int, means: torch.Tensor,
                               heads: Heads | None = None, chunk: int = 32) -> tuple[float, torch.Tensor]:
    """The full prompt once per patched head, as rows of one batch (no prefix reuse)."""
    heads = heads or all_heads(model)
    ids = _encode(model, text)
    base, effects = None, []
    for start in range(0, len(heads), chunk):
        part = heads[start:start + chunk]
        rows = len(part) + 1
        probs = _patched_forward(model, part, means, answer_id, input_ids=ids.expand(rows, -1),
                                 attention_mask=torch.ones(rows, ids.shape[1], dtype=torch.long))
        base = float(probs[0]) if base is None else base
        effects.append(probs[1:] - probs[0])
    return base, torch.cat(effects)


def cma_prompt_naive(model: LoadedModel, text: str, answer_id: int, means: torch.Tensor,
                     heads: Heads | None = None) -> tuple[float, torch.Tensor]:
    """One separate forward per patched head: slow, obviously right, the reference for tests."""
    heads = heads or all_heads(model)
    ad, lm = model.adapter, model.lm
    with lm.trace(text):
        base = answer_prob(ad.unembed(lm).output, answer_id).save()
    effects = []
    for layer, head in heads:
        with lm.trace(text):
            set_head(ad.head_site(lm, layer), head, ad.head_dim, means[layer, head])
            p = answer_prob(ad.unembed(lm).output, answer_id).save()
        effects.append(float(p[0]) - float(base[0]))
    return float(base[0]), torch.tensor(effects)


CMA_FUNCTIONS: dict[str, Callable] = {
    "fast": cma_prompt_fast,
    "invoke_per_head": cma_prompt_invoke_per_head,
    "naive": cma_prompt_naive,
}


def cma_group(task: str) -> str:
    return f"{task}/cma"


@dataclass
class CMAResult:
    task: str
    aie: xr.DataArray  # (layer, head)
    n_prompts: int
    n_new: int


def run_cma(model: LoadedModel, prepared: PreparedTask, store: ActivationStore, means: torch.Tensor,
            n_prompts: int = 25, n_shots: int = 10, method: str = "fast",
            progress: Callable[[int, int], None] | None = None) -> CMAResult:
    """Indirect effects of every head on `n_prompts` shuffled-label prompts, appended to `<task>/cma` (resumable)."""
    require_positive("n_prompts", n_prompts)
    if method not in CMA_FUNCTIONS:
        raise UserError(f"unknown CMA method {method!r}; use one of {', '.join(CMA_FUNCTIONS)}")
    ad = model.adapter
    group = cma_group(prepared.name)
    # Corrupted queries come from the training split, like the clean prompts that gave the means.
    prompts = prepared.prompts("train", n_prompts, kind="shuffled", n_shots=n_shots, seed_offset=1)
    identity = {"model": model.model_id, "task": prepared.name, "n_layers": ad.n_layers, "n_heads": ad.n_heads,
                "head_dim": ad.head_dim, "n_shots": n_shots, "seed": prepared.seed, "kind": "shuffled",
                "template": [prepared.template.query, prepared.template.answer, prepared.template.separator,
                             prepared.template.prefix]}
    store.check_compatible(group, identity)
    start = store.repair(group)
    fn = CMA_FUNCTIONS[method]
    for i in range(start, n_prompts):
        prompt = prompts[i]
        answer_id = prepared.answer_token[prompt.answer]
        base, effects = fn(model, prompt.text, answer_id, means)
        batch = xr.Dataset(
            {
                "indirect_effect": ((PROMPT_DIM, "layer", "head"),
                                    effects.view(1, ad.n_layers, ad.n_heads).float().numpy()),
                "p_corrupted": ((PROMPT_DIM,), np.array([base], dtype=np.float32)),
                "query": ((PROMPT_DIM,), np.array([prompt.query], dtype=object)),
                "answer": ((PROMPT_DIM,), np.array([prompt.answer], dtype=object)),
                "text": ((PROMPT_DIM,), np.array([prompt.text], dtype=object)),
            },
            coords={PROMPT_DIM: [i], "layer": np.arange(ad.n_layers), "head": np.arange(ad.n_heads)},
        )
        store.append(group, batch, {**identity, "method": method})
        if progress:
            progress(i + 1, n_prompts)
    return CMAResult(prepared.name, load_aie(store, prepared.name, n_prompts), n_prompts, n_prompts - start)


def load_aie(store: ActivationStore, task: str, n_prompts: int | None = None) -> xr.DataArray:
    """AIE per (layer, head): the mean indirect effect over the stored corrupted prompts."""
    ds = store.open(cma_group(task), hint=f"fv-remote cma --task {task} --store {store.url}")
    if n_prompts is not None:
        ds = ds.isel({PROMPT_DIM: slice(0, n_prompts)})
    return ds["indirect_effect"].mean(PROMPT_DIM).load()
