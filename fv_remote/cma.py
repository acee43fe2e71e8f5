"""Causal mediation: the average indirect effect (AIE) of each head on shuffled-label prompts.

For a corrupted prompt and a head (l, h), the indirect effect is P(answer | head's last-token output set to its
mean clean activation) - P(answer | corrupted). Four implementations, all exact (they agree to ~1e-8):

- `fast` (default): the patch only touches the last token, so the prompt runs once (keys/values cached) and the
  last token is then recomputed for many patches at once, as copies that share the cached prefix, starting from
  the patched layer (layers below it are skipped: their output is the unpatched one). See `cma_prompt_fast`.
- `cached_batch`: the previous fast path: prefix cache repeated per batch row, one row per patch, all layers.
- `invoke_per_head`: the whole prompt once per head, batched as rows of one forward (the classic batching).
- `naive`: one separate forward per head (the reference).

`run_cma(..., method="attribution")` stores the first-order gradient estimate instead (fv_remote.attribution), and
`method="lrp"` / `"lrp_attention"` AttnLRP relevances on clean prompts (fv_remote.lrp).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import nnsight
import numpy as np
import torch
import xarray as xr

from fv_remote.errors import UserError, require_positive
from fv_remote.models import LoadedModel
from fv_remote.remote import JobSubmitted, remote_mode, saved_result, stage_session
from fv_remote.store import PROMPT_DIM, ActivationStore
from fv_remote.tasks import PreparedTask
from fv_remote.traces.mediation import answer_prob, answer_prob_positions, copies_mask, patch_positions, patch_rows
from fv_remote.traces.patching import layer_hidden, set_head

Heads = list[tuple[int, int]]
METHODS = ("fast", "cached_batch", "invoke_per_head", "naive")


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


# -- fast: shared prefix, copies of the last token, layers below the patch skipped -------------------------------
# Cost model for grouping patches into forwards, in units of "one copy through one decoder layer". A forward that
# starts at layer a with R copies costs FIXED + (L - a + head) * (WEIGHTS + R), `head` being the unembedding's size
# relative to a decoder layer: every computed layer reads its weights once per forward (worth WEIGHTS copies) and
# then does R copies' work. Measured on CPU with smollm2-135m: WEIGHTS ~ 20, FIXED ~ 15. On an accelerator WEIGHTS
# is far larger (per-kernel overhead), which pushes the plan toward fewer, larger forwards.
FAST_FIXED_COST = 15.0
FAST_WEIGHTS_COST = 20.0
FAST_MAX_COPIES = 256


def _copies_supported(model: LoadedModel, n_tokens: int) -> bool:
    """Whether the copies layout is exact here: eager/sdpa attention and no sliding window shorter than the prompt."""
    config = model.hf.config
    if getattr(config, "_attn_implementation", "eager") not in ("eager", "sdpa"):
        return False
    for name in ("sliding_window", "attention_chunk_size"):
        window = getattr(config, name, None)
        if isinstance(window, int) and window < n_tokens + 1:
            return False
    return True


def _mask_dtype(model: LoadedModel) -> torch.dtype:
    """Boolean masks for SDPA (any compute dtype, e.g. bf16 autocast on NDIF); additive masks in the model's dtype
    for eager attention, which adds the mask to the scores."""
    if getattr(model.hf.config, "_attn_implementation", "eager") == "sdpa":
        return torch.bool
    return next(model.hf.parameters()).dtype


def _last_logits_only(model: LoadedModel) -> dict:
    """`logits_to_keep=1` where the model takes it: the unembedding then runs on the last token only."""
    try:
        takes = "logits_to_keep" in inspect.signature(model.hf.forward).parameters
    except (TypeError, ValueError):
        takes = False
    return {"logits_to_keep": 1} if takes else {}


def _unit_costs(model: LoadedModel) -> float:
    """The unembedding's cost relative to one decoder layer (parameter counts)."""
    ad = model.adapter
    layer_params = sum(p.numel() for p in ad.layer(model.hf, 0).parameters())
    return ad.vocab_size * ad.d_model / max(layer_params, 1)


def plan_groups(heads: Heads, n_layers: int, head_cost: float, fixed: float | None = None,
                weights: float | None = None, max_copies: int = FAST_MAX_COPIES) -> list[list[int]]:
    """Split patches into forwards (lists of indices into `heads`) of least total cost (see FAST_FIXED_COST).

    Patches of one layer share a forward unless there are more than `max_copies` of them; runs of consecutive
    layers are grouped by dynamic programming: a forward starting deeper skips more layers but pays its fixed and
    weight-reading costs again.
    """
    require_positive("max_copies", max_copies)
    fixed = FAST_FIXED_COST if fixed is None else fixed
    weights = FAST_WEIGHTS_COST if weights is None else weights
    by_layer: dict[int, list[int]] = {}
    for i, (layer, _) in enumerate(heads):
        by_layer.setdefault(int(layer), []).append(i)
    layers = sorted(by_layer)
    m = len(layers)
    best = [0.0] + [float("inf")] * m
    cut = [0] * (m + 1)
    for i in range(1, m + 1):
        rows = 0
        for j in range(i - 1, -1, -1):
            rows += len(by_layer[layers[j]])
            pieces = -(-rows // max_copies)
            depth = n_layers - layers[j] + head_cost
            cost = best[j] + pieces * (fixed + depth * weights) + rows * depth
            if cost < best[i]:
                best[i], cut[i] = cost, j
    groups: list[list[int]] = []
    i = m
    while i > 0:
        j = cut[i]
        members = [k for layer in layers[j:i] for k in by_layer[layer]]
        # Too many copies for one forward: split in layer order, so later pieces start (and skip) deeper.
        groups[:0] = [members[s:s + max_copies] for s in range(0, len(members), max_copies)]
        i = j
    return groups


def cma_prompt_fast(model: LoadedModel, text: str, answer_id: int, means: torch.Tensor,
                    heads: Heads | None = None, chunk: int = FAST_MAX_COPIES) -> tuple[float, torch.Tensor]:
    """(P(answer | corrupted), indirect effect per head): the prefix once, then only the patched layers up.

    1. One forward over the whole corrupted prompt keeps its keys/values, P(answer) and every layer's last-token
       output.
    2. Each group of patches (see `plan_groups`) is one forward over R copies of the last token placed at its own
       position and attending to the cached prompt (minus the original last token) and to itself only. Decoder
       layers below the group's first patched layer are skipped (their output at the last token is already known
       from step 1), and copy r gets patch r at its layer. The prefix's keys/values are shared, not repeated.

    Falls back to `cma_prompt_cached_batch` where the layout does not apply (sliding windows shorter than the
    prompt, attention kernels that ignore custom masks).
    """
    heads = list(heads or all_heads(model))
    ids = _encode(model, text)
    n_tokens = ids.shape[1]
    if n_tokens < 2:
        raise UserError("a prompt needs at least two tokens for cached mediation")
    if not _copies_supported(model, n_tokens):
        return cma_prompt_cached_batch(model, text, answer_id, means, heads, chunk=min(chunk, 128))
    ad, lm = model.adapter, model.lm
    is_tuple = ad.layer_output_is_tuple
    with lm.trace(input_ids=ids, use_cache=True, **_last_logits_only(model)):
        hidden = nnsight.save([])
        for layer in range(ad.n_layers):
            hidden.append(layer_hidden(ad.layer(lm, layer), is_tuple)[:, -1:].detach().clone())
        base = answer_prob(ad.unembed(lm).output, answer_id).save()
        cache = lm.output.past_key_values.save()
    base = float(base[0])
    dtype = _mask_dtype(model)
    effects = torch.empty(len(heads), dtype=torch.float64)
    for group in plan_groups(heads, ad.n_layers, _unit_costs(model), max_copies=chunk):
        probs = _copies_forward(model, [heads[i] for i in group], means, answer_id, ids[:, -1:], cache, hidden,
                                n_tokens, dtype)
        effects[torch.tensor(group)] = probs.double() - base
    return base, effects.float()


def _copies_forward(model: LoadedModel, part: Heads, means: torch.Tensor, answer_id: int, last_id: torch.Tensor,
                    cache, hidden: list[torch.Tensor], n_tokens: int, dtype) -> torch.Tensor:
    """One forward of R = len(part) last-token copies; copy r patches part[r]. Returns P(answer) per copy."""
    ad, lm = model.adapter, model.lm
    n_copies = len(part)
    first = min(layer for layer, _ in part)
    by_layer: dict[int, list[tuple[int, int]]] = {}
    for pos, (layer, head) in enumerate(part):
        by_layer.setdefault(layer, []).append((pos, head))
    replacement = None
    if first > 0:
        h = hidden[first - 1].expand(1, n_copies, -1).contiguous()
        replacement = (h, None) if ad.layer_output_is_tuple else h
    inputs = dict(
        input_ids=last_id.expand(1, n_copies),
        past_key_values=copy.deepcopy(cache),  # the forward appends the copies' keys; keep the prompt's clean
        attention_mask=copies_mask(n_tokens, n_copies, dtype, hide=n_tokens - 1),
        position_ids=torch.full((1, n_copies), n_tokens - 1, dtype=torch.long),
        use_cache=True,
    )
    with lm.trace(**inputs):
        for layer in range(first):  # forward order: skipped layers first
            ad.layer(lm, layer).skip(replacement)
        for layer in sorted(by_layer):
            pos, hs = zip(*by_layer[layer])
            heads_t = torch.tensor(hs)
            patch_positions(ad.head_site(lm, layer), torch.tensor(pos), heads_t, means[layer, heads_t],
                            ad.n_heads, ad.head_dim)
        probs = answer_prob_positions(ad.unembed(lm).output, answer_id).save()
    return probs.detach().cpu()


def cma_fast_session(model: LoadedModel, jobs: list[tuple[str, int]], means: torch.Tensor,
                     heads: Heads | None = None, remote: Any = True,
                     max_copies: int = 1024) -> list[tuple[float, torch.Tensor]]:
    """`cma_prompt_fast` for many (text, answer_id) prompts as one stage: one NDIF request with `remote=True`,
    nnsight's in-process dry run with `remote="local"`, plain local traces with `remote=False`.

    Same layout (last-token copies sharing the prompt's cached keys/values, layers below each group's first patched
    layer skipped), with one difference that keeps the shipped code free of anything but torch and
    `fv_remote.traces`: every group of up to `max_copies` copies gets its own prompt forward (the cache is appended
    to by the copies, and copying it needs the `copy` module the sandbox refuses). Groups are as few as
    `max_copies` allows, so with the default one prompt forward + one copies forward covers up to 1024 heads.
    """
    ad, lm = model.adapter, model.lm
    heads = list(heads or all_heads(model))
    n_heads, head_dim, is_tuple = ad.n_heads, ad.head_dim, ad.layer_output_is_tuple
    layers = [ad.layer(lm, layer) for layer in range(ad.n_layers)]
    sites = [ad.head_site(lm, layer) for layer in range(ad.n_layers)]
    unembed = ad.unembed(lm)
    keep = _last_logits_only(model)
    mask_dtype = _mask_dtype(model)
    groups = session_groups(model, heads, max_copies)
    plan = []
    for text, answer_id in jobs:
        ids = _encode(model, text)
        n_tokens = ids.shape[1]
        if n_tokens < 2:
            raise UserError("a prompt needs at least two tokens for cached mediation")
        if not _copies_supported(model, n_tokens):
            raise UserError(f"a prompt of {n_tokens} tokens is longer than this model's sliding attention window; "
                            "run the CMA locally (it falls back to the per-row cache there)")
        steps = []
        for group in groups:
            part = [heads[i] for i in group]
            by_layer: dict[int, list[tuple[int, int]]] = {}
            for pos, (layer, head) in enumerate(part):
                by_layer.setdefault(layer, []).append((pos, head))
            patches = []
            for layer in sorted(by_layer):
                pos, hs = zip(*by_layer[layer])
                heads_t = torch.tensor(hs)
                patches.append((layer, torch.tensor(pos), heads_t, means[layer, heads_t].clone()))
            steps.append({"first": min(layer for layer, _ in part), "copies": len(part), "patches": patches,
                          "input_ids": ids[:, -1:].expand(1, len(part)).contiguous(),
                          "mask": copies_mask(n_tokens, len(part), mask_dtype, hide=n_tokens - 1),
                          "position_ids": torch.full((1, len(part)), n_tokens - 1, dtype=torch.long)})
        plan.append({"ids": ids, "answer": int(answer_id), "steps": steps})

    results = []
    session = bool(remote_mode(remote))
    with stage_session(model, remote):
        for job in plan:
            probs = []
            for step in job["steps"]:
                with lm.trace(input_ids=job["ids"], use_cache=True, **keep):
                    hidden = nnsight.save([])
                    if step["first"] > 0:
                        hidden.append(layer_hidden(layers[step["first"] - 1], is_tuple)[:, -1:].detach().clone())
                    base = answer_prob(unembed.output, job["answer"]).save()
                    cache = lm.output.past_key_values.save()
                with lm.trace(input_ids=step["input_ids"], past_key_values=cache, attention_mask=step["mask"],
                              position_ids=step["position_ids"], use_cache=True):
                    if step["first"] > 0:
                        rep = hidden[0].expand(1, step["copies"], -1).contiguous()
                        rep = (rep, None) if is_tuple else rep
                        for layer in range(step["first"]):
                            layers[layer].skip(rep)
                    for layer, pos, hs, values in step["patches"]:
                        patch_positions(sites[layer], pos, hs, values, n_heads, head_dim)
                    probs.append(answer_prob_positions(unembed.output, job["answer"]).detach().save())
            results.append((base.detach(), probs))
        hidden = base = cache = probs = rep = job = step = None
        if session:
            results = nnsight.save(results)
    return session_effects(results, groups, len(heads))


def session_groups(model: LoadedModel, heads: Heads, max_copies: int = 1024) -> list[list[int]]:
    """How `cma_fast_session` splits the patches into copies forwards (indices into `heads`)."""
    return plan_groups(heads, model.adapter.n_layers, _unit_costs(model), fixed=1e12, weights=0.0,
                       max_copies=max_copies)


def session_effects(results: list, groups: list[list[int]], n_heads: int) -> list[tuple[float, torch.Tensor]]:
    """(P(answer | corrupted), indirect effect per head) per prompt from `cma_fast_session`'s saved `results`
    (per prompt: the base probability and one probability tensor per group of `groups`)."""
    out = []
    for base, probs in results:
        if len(probs) != len(groups):
            raise UserError(f"the CMA result has {len(probs)} groups of patches per prompt, expected {len(groups)}")
        effects = torch.empty(n_heads, dtype=torch.float64)
        for group, p in zip(groups, probs):
            effects[torch.tensor(group)] = p.double().cpu() - float(base[0])
        out.append((float(base[0]), effects.float()))
    return out


def cma_prompt_cached_batch(model: LoadedModel, text: str, answer_id: int, means: torch.Tensor,
                            heads: Heads | None = None, chunk: int = 128) -> tuple[float, torch.Tensor]:
    """The previous fast path: prefix cache once, repeated per batch row; the last token for every patched head.

    Kept as the fallback of `cma_prompt_fast` (sliding windows) and as a benchmark reference.
    """
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
    """The full prompt once per patched head, as rows of one batch (no prefix reuse; logits at the last token)."""
    heads = heads or all_heads(model)
    ids = _encode(model, text)
    base, effects = None, []
    for start in range(0, len(heads), chunk):
        part = heads[start:start + chunk]
        rows = len(part) + 1
        probs = _patched_forward(model, part, means, answer_id, input_ids=ids.expand(rows, -1),
                                 attention_mask=torch.ones(rows, ids.shape[1], dtype=torch.long),
                                 **_last_logits_only(model))
        base = float(probs[0]) if base is None else base
        effects.append(probs[1:] - probs[0])
    return base, torch.cat(effects)


def cma_prompt_naive(model: LoadedModel, text: str, answer_id: int, means: torch.Tensor,
                     heads: Heads | None = None) -> tuple[float, torch.Tensor]:
    """One separate forward per patched head: slow, obviously right, the reference for tests."""
    heads = heads or all_heads(model)
    ad, lm = model.adapter, model.lm
    keep = _last_logits_only(model)
    with lm.trace(text, **keep):
        base = answer_prob(ad.unembed(lm).output, answer_id).save()
    effects = []
    for layer, head in heads:
        with lm.trace(text, **keep):
            set_head(ad.head_site(lm, layer), head, ad.head_dim, means[layer, head])
            p = answer_prob(ad.unembed(lm).output, answer_id).save()
        effects.append(float(p[0]) - float(base[0]))
    return float(base[0]), torch.tensor(effects)


CMA_FUNCTIONS: dict[str, Callable] = {
    "fast": cma_prompt_fast,
    "cached_batch": cma_prompt_cached_batch,
    "invoke_per_head": cma_prompt_invoke_per_head,
    "naive": cma_prompt_naive,
}


SOURCES = ("cma", "attribution", "lrp", "lrp_attention")


def cma_group(task: str, source: str = "cma") -> str:
    """Store group of a task's per-prompt head scores: `<task>/cma` (exact), `<task>/attribution`, `<task>/lrp`..."""
    if source not in SOURCES:
        raise UserError(f"unknown head-score source {source!r}; use one of {', '.join(SOURCES)}")
    return f"{task}/{source}"


@dataclass
class CMAResult:
    task: str
    aie: xr.DataArray  # (layer, head)
    n_prompts: int
    n_new: int


PromptScorer = Callable[[LoadedModel, str, int, torch.Tensor], tuple[float, torch.Tensor]]


def run_cma(model: LoadedModel, prepared: PreparedTask, store: ActivationStore, means: torch.Tensor,
            n_prompts: int = 25, n_shots: int = 10, method: str = "fast",
            progress: Callable[[int, int], None] | None = None, remote: Any = False) -> CMAResult:
    """Indirect effects of every head on `n_prompts` shuffled-label prompts, appended to `<task>/cma` (resumable).

    `method="attribution"` stores the gradient estimate instead, in `<task>/attribution` (see fv_remote.attribution).
    `remote=True` (NDIF) or `"local"` (dry run) computes all missing prompts in one request (`cma_fast_session`;
    method "fast" only) and stores them once the results are back. Under `fv_remote.remote.no_wait()` the request
    is submitted and `JobSubmitted` raised, its `details` saying how `store_remote_cma` stores the results later.
    """
    from fv_remote import lrp

    batch = None
    if remote_mode(remote):
        if method in lrp.METHODS:
            raise UserError(lrp.REMOTE_REFUSAL.format(method=method))
        if method != "fast":
            raise UserError(f"remote CMA runs the fast method only, not {method!r}")

        def batch(jobs: list[tuple[str, int]]) -> list[tuple[float, torch.Tensor]]:
            try:
                return cma_fast_session(model, jobs, means, remote=remote)
            except JobSubmitted as job:
                job.details.update(stage="cma", result_key="results", n_heads=len(all_heads(model)),
                                   groups=session_groups(model, all_heads(model)))
                raise
    if method == "attribution":
        from fv_remote.attribution import attribution_prompt

        return run_head_scores(model, prepared, store, means, attribution_prompt, "attribution", method,
                               n_prompts, n_shots, progress)
    if method in lrp.METHODS:
        return run_head_scores(model, prepared, store, means, lrp.prompt_scorer(model, prepared, method), method,
                               method, n_prompts, n_shots, progress, kind="clean")
    if method not in CMA_FUNCTIONS:
        raise UserError(f"unknown CMA method {method!r}; use one of "
                        f"{', '.join([*CMA_FUNCTIONS, 'attribution', *lrp.METHODS])}")
    return run_head_scores(model, prepared, store, means, CMA_FUNCTIONS[method], "cma", method, n_prompts, n_shots,
                           progress, batch=batch)


def run_head_scores(model: LoadedModel, prepared: PreparedTask, store: ActivationStore, means: torch.Tensor,
                    fn: PromptScorer, source: str, method: str, n_prompts: int = 25, n_shots: int = 10,
                    progress: Callable[[int, int], None] | None = None,
                    batch: Callable[[list[tuple[str, int]]], list[tuple[float, torch.Tensor]]] | None = None,
                    kind: str = "shuffled") -> CMAResult:
    """Score every head on each shuffled-label prompt (or `kind` prompt) with `fn`; append per prompt to
    `<task>/<source>`. With `batch`, all missing prompts are scored by one call (one remote request) before anything
    is stored. For "clean" prompts the stored `p_corrupted` is what `fn` returns first (LRP: the answer logit).
    """
    require_positive("n_prompts", n_prompts)
    ad = model.adapter
    group = cma_group(prepared.name, source)
    # Corrupted queries come from the training split, like the clean prompts that gave the means.
    prompts = prepared.prompts("train", n_prompts, kind=kind, n_shots=n_shots, seed_offset=1)
    identity = {"model": model.model_id, "task": prepared.name, "n_layers": ad.n_layers, "n_heads": ad.n_heads,
                "head_dim": ad.head_dim, "n_shots": n_shots, "seed": prepared.seed, "kind": kind,
                "template": [prepared.template.query, prepared.template.answer, prepared.template.separator,
                             prepared.template.prefix]}
    from fv_remote.checks import check_prompt_lengths

    check_prompt_lengths(model, [p.text for p in prompts], "corrupted prompt")
    with store.writing():  # one writer per store for the whole run
        store.check_compatible(group, identity)
        start = store.trim(group)
        jobs = [(p.text, prepared.answer_token[p.answer]) for p in prompts]
        rows = [(p.query, p.answer, p.text) for p in prompts]
        try:
            done = batch(jobs[start:]) if batch is not None and start < n_prompts else None
        except JobSubmitted as job:  # no-wait: everything `store_remote_cma` needs to store the results later
            job.details.update(task=prepared.name, store=store.url, source=source, method=method,
                               n_prompts=n_prompts, n_shots=n_shots, start=start, identity=identity,
                               rows=[list(r) for r in rows[start:]])
            raise
        for i in range(start, n_prompts):
            scored = done[i - start] if done is not None else fn(model, *jobs[i], means)
            _append_scores(store, group, identity, method, i, rows[i], scored)
            if progress:
                progress(i + 1, n_prompts)
        return CMAResult(prepared.name, load_aie(store, prepared.name, n_prompts, source=source), n_prompts,
                         n_prompts - start)


def _append_scores(store: ActivationStore, group: str, identity: dict, method: str, i: int,
                   row: tuple[str, str, str], scored: tuple[float, torch.Tensor]) -> None:
    """Append prompt `i` (query, answer, text) and its head scores to `<task>/<source>`."""
    base, effects = scored
    n_layers, n_heads = int(identity["n_layers"]), int(identity["n_heads"])
    query, answer, text = row
    ds = xr.Dataset(
        {
            "indirect_effect": ((PROMPT_DIM, "layer", "head"),
                                effects.reshape(1, n_layers, n_heads).float().numpy()),
            "p_corrupted": ((PROMPT_DIM,), np.array([base], dtype=np.float32)),
            "query": ((PROMPT_DIM,), np.array([query], dtype=object)),
            "answer": ((PROMPT_DIM,), np.array([answer], dtype=object)),
            "text": ((PROMPT_DIM,), np.array([text], dtype=object)),
        },
        coords={PROMPT_DIM: [i], "layer": np.arange(n_layers), "head": np.arange(n_heads)},
    )
    store.append(group, ds, {**identity, "method": method})


def store_remote_cma(store: ActivationStore, saved: dict, details: dict,
                     progress: Callable[[int, int], None] | None = None) -> CMAResult:
    """Store a no-wait CMA's results (the job's saved values) exactly as `run_cma` would have.

    `details` are the ones `run_cma` put on `JobSubmitted` (prompts, identity, where the store stood). Storing
    twice is a no-op; a store that moved on since the job was submitted (another run appended prompts) is refused
    rather than mixed. Needs no model: the job file says everything.
    """
    task, source, method = details["task"], details.get("source", "cma"), details.get("method", "fast")
    n_prompts, start = int(details["n_prompts"]), int(details["start"])
    identity, rows = details["identity"], [tuple(r) for r in details["rows"]]
    group = cma_group(task, source)
    with store.writing():
        return _store_remote_cma(store, saved, details, progress, task, source, method, n_prompts, start, identity,
                                 rows, group)


def _store_remote_cma(store, saved, details, progress, task, source, method, n_prompts, start, identity, rows,
                      group) -> CMAResult:
    store.check_compatible(group, identity)
    now = store.trim(group)
    if now >= n_prompts and now > start:  # already stored (by this job, or a run that caught up)
        return CMAResult(task, load_aie(store, task, n_prompts, source=source), n_prompts, 0)
    if now != start:
        raise UserError(f"store {store.url} has {now} {group!r} prompts but the job starts at prompt {start}: the "
                        "store changed since it was submitted; nothing stored")
    results = saved_result(saved, details, "results", "the CMA job's")
    done = session_effects(results, [list(g) for g in details["groups"]], int(details["n_heads"]))
    if len(done) != len(rows) or len(rows) != n_prompts - start:
        raise UserError(f"the job returned {len(done)} prompts, expected {n_prompts - start}; nothing stored")
    for i in range(start, n_prompts):
        _append_scores(store, group, identity, method, i, rows[i - start], done[i - start])
        if progress:
            progress(i + 1, n_prompts)
    return CMAResult(task, load_aie(store, task, n_prompts, source=source), n_prompts, n_prompts - start)


def load_aie(store: ActivationStore, task: str, n_prompts: int | None = None, source: str = "auto") -> xr.DataArray:
    """AIE per (layer, head): the mean indirect effect over the stored corrupted prompts.

    `source`: "cma" (exact), "attribution" (gradient estimate), "lrp" / "lrp_attention" (AttnLRP relevance, not
    an effect on P(answer): only its ranking compares) or "auto" (exact where stored, else attribution).
    """
    if source == "auto":
        source = "attribution" if (not store.has_task(cma_group(task))
                                   and store.has_task(cma_group(task, "attribution"))) else "cma"
    ds = store.open(cma_group(task, source), hint=f"fv-remote cma --task {task} --store {store.url}"
                    + (f" --method {source}" if source != "cma" else ""))
    if n_prompts is not None:
        ds = ds.isel({PROMPT_DIM: slice(0, n_prompts)})
    effects = store.require(ds, cma_group(task, source), "indirect_effect")["indirect_effect"]
    # Read once, checked: a damaged chunk or a NaN must be an error naming the prompts, not a NaN AIE.
    values = store.finite_values(cma_group(task, source), effects)
    return effects.copy(data=values).mean(PROMPT_DIM)
