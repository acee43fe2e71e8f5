"""Causal mediation per prompt: the indirect effect of each head (the algorithms; `fv_remote.fv.cma` stores them).

For a corrupted prompt and a head (l, h), the indirect effect is P(answer | head's last-token output set to its
mean clean activation) - P(answer | corrupted). Four implementations, all exact (they agree to ~1e-8):

- `fast` (default): the patch only touches the last token, so the prompt runs once (keys/values cached) and the
  last token is then recomputed for many patches at once, as copies that share the cached prefix, starting from
  the patched layer (layers below it are skipped: their output is the unpatched one). See `cma_prompt_fast`.
- `cached_batch`: the previous fast path: prefix cache repeated per batch row, one row per patch, all layers.
- `invoke_per_head`: the whole prompt once per head, batched as rows of one forward (the classic batching).
- `naive`: one separate forward per head (the reference).

`run_cma(..., method="attribution")` stores the first-order gradient estimate instead (fv_remote.fv.attribution).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from typing import Any

import nnsight
import torch

from fv_remote.core.errors import UserError, require_positive
from fv_remote.execution import Local, executor_of, stage_session
from fv_remote.models.loading import LoadedModel
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


def _prefix_reusable(model: LoadedModel) -> bool:
    """Whether one prompt forward can serve every copies forward of a prompt: the copies' keys/values are cropped
    off the cache again after each, which a sliding-window layer (it drops old positions) does not allow."""
    config = model.hf.config
    if getattr(config, "sliding_window", None) or getattr(config, "attention_chunk_size", None):
        return False
    return not any("sliding" in str(kind) for kind in (getattr(config, "layer_types", None) or ()))


def fast_groups(model: LoadedModel, heads: Heads, max_copies: int = FAST_MAX_COPIES) -> list[list[int]]:
    """How the fast CMA splits the patches into copies forwards (indices into `heads`): by the cost model when one
    prompt forward serves them all, else as few as `max_copies` allows (each then needs its own prompt forward)."""
    if _prefix_reusable(model):
        return plan_groups(heads, model.adapter.n_layers, _unit_costs(model), max_copies=max_copies)
    return plan_groups(heads, model.adapter.n_layers, _unit_costs(model), fixed=1e12, weights=0.0,
                       max_copies=max_copies)


def cma_prompt_fast(model: LoadedModel, text: str, answer_id: int, means: torch.Tensor,
                    heads: Heads | None = None, chunk: int = FAST_MAX_COPIES) -> tuple[float, torch.Tensor]:
    """(P(answer | corrupted), indirect effect per head) of one prompt: `cma_fast_session`'s body, run locally.

    1. One forward over the whole corrupted prompt keeps its keys/values, P(answer) and the last-token output of
       the layers the groups start above.
    2. Each group of patches (see `fast_groups`) is one forward over R copies of the last token placed at its own
       position and attending to the cached prompt (minus the original last token) and to itself only. Decoder
       layers below the group's first patched layer are skipped (their output at the last token is already known
       from step 1), and copy r gets patch r at its layer. The prefix's keys/values are shared, not repeated, and
       the copies' are cropped off again after each group.

    Falls back to `cma_prompt_cached_batch` where the layout does not apply (sliding windows shorter than the
    prompt, attention kernels that ignore custom masks).
    """
    heads = list(heads or all_heads(model))
    ids = _encode(model, text)
    if ids.shape[1] >= 2 and not _copies_supported(model, ids.shape[1]):
        return cma_prompt_cached_batch(model, text, answer_id, means, heads, chunk=min(chunk, 128))
    return cma_fast_session(model.using(Local()), [(text, answer_id)], means, heads, max_copies=chunk)[0]


def cma_fast_session(model: LoadedModel, jobs: list[tuple[str, int]], means: torch.Tensor,
                     heads: Heads | None = None,
                     max_copies: int = FAST_MAX_COPIES) -> list[tuple[float, torch.Tensor]]:
    """The fast CMA of many (text, answer_id) prompts as one stage body, where the model's executor runs it: one
    NDIF request, nnsight's in-process dry run, or plain local traces (what `cma_prompt_fast` runs). See
    `cma_prompt_fast` for the layout.

    The body ships with nothing but torch and `fv_remote.traces`: the cache is restored after each copies forward
    by cropping every layer back to the prompt's length (layers the copies skipped were not appended to; no `copy`,
    which the sandbox refuses), and where a sliding-window layer forbids that, every group gets its own prompt
    forward.
    """
    ad, lm = model.adapter, model.lm
    heads = list(heads or all_heads(model))
    n_heads, head_dim, is_tuple = ad.n_heads, ad.head_dim, ad.layer_output_is_tuple
    layers = [ad.layer(lm, layer) for layer in range(ad.n_layers)]
    sites = [ad.head_site(lm, layer) for layer in range(ad.n_layers)]
    unembed = ad.unembed(lm)
    keep = _last_logits_only(model)
    mask_dtype = _mask_dtype(model)
    groups = fast_groups(model, heads, max_copies)
    reuse = _prefix_reusable(model)
    firsts = [min(heads[i][0] for i in group) for group in groups]
    # What does not depend on the prompt is built once and shared: pickle writes an object once per payload, so a
    # 70B job no longer carries every group's head means (and equal masks) again for every prompt.
    group_patches = []
    for group in groups:
        by_layer: dict[int, list[tuple[int, int]]] = {}
        for pos, i in enumerate(group):
            by_layer.setdefault(heads[i][0], []).append((pos, heads[i][1]))
        patches = []
        for layer in sorted(by_layer):
            places, hs = zip(*by_layer[layer])
            heads_t = torch.tensor(hs)
            patches.append((layer, torch.tensor(places), heads_t, means[layer, heads_t].clone()))
        group_patches.append(patches)
    shared: dict[tuple, torch.Tensor] = {}  # ("mask"|"pos", n_tokens, copies) and ("ids", last token, copies)
    plan: list[dict[str, Any]] = []
    for text, answer_id in jobs:
        ids = _encode(model, text)
        n_tokens = ids.shape[1]
        if n_tokens < 2:
            raise UserError("a prompt needs at least two tokens for cached mediation")
        if not _copies_supported(model, n_tokens):
            raise UserError(f"a prompt of {n_tokens} tokens is longer than this model's sliding attention window; "
                            "run the CMA locally (it falls back to the per-row cache there)")
        steps: list[dict[str, Any]] = []
        for g, group in enumerate(groups):
            r = len(group)
            own = [firsts[g] - 1] if firsts[g] > 0 else []
            read = sorted({f - 1 for f in firsts if f > 0}) if reuse else own
            last_id = int(ids[0, -1])
            if ("mask", n_tokens, r) not in shared:
                shared["mask", n_tokens, r] = copies_mask(n_tokens, r, mask_dtype, hide=n_tokens - 1)
                shared["pos", n_tokens, r] = torch.full((1, r), n_tokens - 1, dtype=torch.long)
            if ("ids", last_id, r) not in shared:
                shared["ids", last_id, r] = torch.full((1, r), last_id, dtype=torch.long)
            steps.append({"first": firsts[g], "copies": r, "patches": group_patches[g],
                          "prompt": g == 0 or not reuse, "read": read, "crop": reuse and g < len(groups) - 1,
                          "slot": read.index(firsts[g] - 1) if firsts[g] > 0 else -1,
                          "input_ids": shared["ids", last_id, r], "mask": shared["mask", n_tokens, r],
                          "position_ids": shared["pos", n_tokens, r]})
        plan.append({"ids": ids, "answer": int(answer_id), "n_tokens": n_tokens, "steps": steps})

    results = []
    session = executor_of(model).session
    with stage_session(model):
        for job in plan:
            probs = []
            for step in job["steps"]:
                if step["prompt"]:
                    with lm.trace(input_ids=job["ids"], use_cache=True, **keep):
                        hidden = nnsight.save([])
                        for layer in step["read"]:
                            hidden.append(layer_hidden(layers[layer], is_tuple)[:, -1:].detach().clone())
                        base = answer_prob(unembed.output, job["answer"]).save()
                        cache = lm.output.past_key_values.save()
                with lm.trace(input_ids=step["input_ids"], past_key_values=cache, attention_mask=step["mask"],
                              position_ids=step["position_ids"], use_cache=True):
                    if step["first"] > 0:
                        rep = hidden[step["slot"]].expand(1, step["copies"], -1).contiguous()
                        rep = (rep, None) if is_tuple else rep
                        for layer in range(step["first"]):
                            layers[layer].skip(rep)
                    for layer, pos, hs, values in step["patches"]:
                        patch_positions(sites[layer], pos, hs, values, n_heads, head_dim)
                    probs.append(answer_prob_positions(unembed.output, job["answer"]).detach().save())
                if step["crop"]:
                    for kv in cache.layers:
                        kv.crop(job["n_tokens"] - kv.get_seq_length())
            results.append((base.detach(), probs))
        # Nothing else may travel back: unbind the body's other values (typed as they were bound).
        hidden = base = cache = probs = rep = job = step = kv = None  # type: ignore[assignment]
        if session:
            results = nnsight.save(results)
    return session_effects(results, groups, len(heads))


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
    assert base is not None  # at least one head
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
    assert base is not None  # at least one head
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
