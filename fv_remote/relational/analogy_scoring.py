"""Scoring rows of (prompt, continuation) through the model with bank vectors mixed in, locally: the first token
after the prompt (cached prefixes shared by every vector) or the whole continuation (teacher-forced). This is the
analogy stage's local fast path (`Executor.local_fast_paths`); the stage's session body is `analogy.analogy_session`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fv_remote.relational.bank import RelationBank
from fv_remote.relational.ffv import trace_kwargs
from fv_remote.models.loading import LoadedModel
from fv_remote.core.progress import Progress
from fv_remote.traces.patching import layer_hidden


def _bank_tensors(bank: RelationBank) -> tuple[torch.Tensor, dict[int, list[int]]]:
    by_layer: dict[int, list[int]] = {}
    for i, layer in enumerate(bank.layers):
        by_layer.setdefault(int(layer), []).append(i)
    return bank.vectors, by_layer


def _split_continuation(tokenizer, prompt: str, cont: str) -> list[int]:
    """Tokens of `cont` as the model sees them after `prompt` (from the first token where the encodings differ)."""
    full = tokenizer.encode(prompt + cont, add_special_tokens=False)
    ctx = tokenizer.encode(prompt, add_special_tokens=False)
    i = 0
    while i < min(len(full), len(ctx)) and full[i] == ctx[i]:
        i += 1
    return full[i:]


def first_token(tokenizer, prompt: str, cont: str) -> int | None:
    """The first token of `cont` as the model sees it after `prompt`; None when it is whitespace or empty."""
    ids = _split_continuation(tokenizer, prompt, cont)
    if not ids or not tokenizer.decode(ids[:1]).strip():
        return None
    return ids[0]


def _run_batch(model: LoadedModel, texts: list[str], additions: dict[int, torch.Tensor] | None,
               positions: torch.Tensor | None, read: torch.Tensor | None):
    """One trace. additions: layer -> [B, d] added at `positions` (negative, per row; None = last token).
    read: [B, K] negative positions whose logits come back ([B, K, vocab]); None = last position only ([B, vocab])."""
    ad, lm = model.adapter, model.lm
    kwargs = trace_kwargs(model) if read is None else {}
    rows = torch.arange(len(texts))
    adds = additions or {}
    with lm.trace(texts, **kwargs):
        for layer in sorted(adds):
            hidden = layer_hidden(ad.layer(lm, layer), ad.layer_output_is_tuple)
            vec = adds[layer].to(device=hidden.device, dtype=hidden.dtype)
            if positions is None:
                hidden[:, -1] += vec
            else:
                hidden[rows.to(hidden.device), hidden.shape[1] + positions.to(hidden.device)] += vec
        logits = ad.unembed(lm).output
        if read is None:
            picked = logits[:, -1].float()
        else:
            picked = logits[rows.view(-1, 1).to(logits.device), logits.shape[1] + read.to(logits.device)].float()
        picked.save()
    return picked


def _additions(mix: torch.Tensor | None, vectors: torch.Tensor | None, by_layer: dict[int, list[int]],
               scale: float) -> dict[int, torch.Tensor] | None:
    """Per-layer [B, d] additions from row weights over the bank `mix` [B, N] (None: no vector)."""
    if mix is None or vectors is None:
        return None
    return {layer: scale * (mix[:, idx] @ vectors[idx]) for layer, idx in by_layer.items()}


def _run_fast(model: LoadedModel, prefix, additions: dict[int, torch.Tensor] | None) -> torch.Tensor:
    """Last-token logits from a cached prefix: decoder layers below the first addition are skipped."""
    ad, lm = model.adapter, model.lm
    first = min(additions) if additions else ad.n_layers - 1
    replacement = None
    if first > 0:
        h = prefix.hidden[first - 1]
        replacement = (h, None) if ad.layer_output_is_tuple else h
    adds = additions or {}
    with lm.trace(input_ids=prefix.last_ids, attention_mask=prefix.mask, position_ids=prefix.position,
                  past_key_values=prefix.cache, use_cache=True, **trace_kwargs(model)):
        for skipped in range(first):
            ad.layer(lm, skipped).skip(replacement)
        for layer in sorted(adds):
            hidden = layer_hidden(ad.layer(lm, layer), ad.layer_output_is_tuple)
            hidden[:, -1] += adds[layer].to(device=hidden.device, dtype=hidden.dtype)
        picked = ad.unembed(lm).output[:, -1].float()
        picked.save()
    return picked


def _chunk_prefix(model: LoadedModel, chunk: list[str]) -> tuple[Any, torch.Tensor]:
    """The cached prefix of a batch's distinct prompts (each runs once, no gradients) and, per row, its prompt's
    index in it: `prefix.select(rows)` gives the rows (one stem under every bank vector shares its keys/values)."""
    from fv_remote.relational.ffv import build_prefix

    unique = list(dict.fromkeys(chunk))
    where = {p: i for i, p in enumerate(unique)}
    with torch.no_grad():
        prefix = build_prefix(model, unique, torch.zeros(len(unique), dtype=torch.long))
    return prefix, torch.tensor([where[p] for p in chunk])


def _target_logprobs(logits: torch.Tensor, targets: Sequence[int]) -> torch.Tensor:
    """log P(target) per row of last-position logits, on the CPU (differentiable)."""
    tgt = torch.as_tensor(list(targets), dtype=torch.long, device=logits.device)
    return torch.log_softmax(logits, -1).gather(1, tgt.view(-1, 1)).squeeze(1).cpu()


def first_token_logprobs(model: LoadedModel, prompts: Sequence[str], targets: Sequence[int],
                         mix: torch.Tensor | None = None, bank: RelationBank | None = None, scale: float = 1.0,
                         batch_size: int = 48, progress: Progress | None = None, fast: bool = True) -> torch.Tensor:
    """log P(target | prompt) at the last position, with Σ_i mix[r, i]·bank_i added (differentiable in `mix`).

    fast=True: each distinct prompt of a batch runs once (no gradients) and keeps its keys/values; every row then
    feeds only the last token from the first vector layer up (exact: see `fv_remote.relational.ffv.Prefix`). Rows that
    share a prompt (one stem under every bank vector) share that work. Falls back to whole prompts on error.
    """
    vectors, by_layer = _bank_tensors(bank) if bank is not None else (None, {})
    out = []
    n = len(prompts)
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        adds = _additions(None if mix is None else mix[start:stop], vectors, by_layer, scale)
        chunk = list(prompts[start:stop])
        logits = None
        if fast:
            try:
                prefix, rows = _chunk_prefix(model, chunk)
                logits = _run_fast(model, prefix.select(rows), adds)
            except Exception:  # noqa: BLE001 - an architecture without cache support: whole prompts instead
                fast, logits = False, None
        if logits is None:
            logits = _run_batch(model, chunk, adds, None, None)
        out.append(_target_logprobs(logits, targets[start:stop]))  # differentiable
        if progress:
            progress(stop, n)
    return torch.cat(out) if out else torch.empty(0)


def first_token_logprobs_shared(model: LoadedModel, prompts: Sequence[str], targets: Sequence[int],
                                mixes: Sequence[tuple[torch.Tensor | None, float]], bank: RelationBank | None = None,
                                batch_size: int = 48, progress: Progress | None = None) -> list[torch.Tensor]:
    """`first_token_logprobs` for several (mix, scale) pairs on the same prompts, one tensor per pair.

    Each batch's prefix is built once and every pair feeds only the last token against it, so K pairs cost one
    forward of the prompts plus K last-token forwards instead of K forwards of the prompts (a validation grid over
    temperatures x scales, or several CFV variants on one prompt kind). No gradients. Falls back to
    `first_token_logprobs` per pair on an architecture without cache support.
    """
    vectors, by_layer = _bank_tensors(bank) if bank is not None else (None, {})
    out: list[list[torch.Tensor]] = [[] for _ in mixes]
    n = len(prompts)
    try:
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            prefix, rows = _chunk_prefix(model, list(prompts[start:stop]))
            with torch.no_grad():
                for k, (mix, scale) in enumerate(mixes):
                    adds = _additions(None if mix is None else mix[start:stop], vectors, by_layer, scale)
                    # select() copies the cache: each pair feeds its last token against an untouched prefix
                    logits = _run_fast(model, prefix.select(rows), adds)
                    out[k].append(_target_logprobs(logits, targets[start:stop]))
            if progress:
                progress(stop, n)
    except Exception:  # noqa: BLE001 - an architecture without cache support: whole prompts, pair by pair
        with torch.no_grad():
            return [first_token_logprobs(model, prompts, targets, mix, bank, scale, batch_size, fast=False)
                    for mix, scale in mixes]
    return [torch.cat(parts) if parts else torch.empty(0) for parts in out]


def continuation_scores(model: LoadedModel, prompts: Sequence[str], conts: Sequence[str],
                        mix: torch.Tensor | None = None, bank: RelationBank | None = None, scale: float = 1.0,
                        batch_size: int = 48) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher-forced (sum log-prob, number of tokens, greedy match) of each continuation after its prompt,
    with the vector added at the prompt's last token."""
    vectors, by_layer = _bank_tensors(bank) if bank is not None else (None, {})
    tok = model.tokenizer
    sums, counts, matches = [], [], []
    for start in range(0, len(prompts), batch_size):
        stop = min(len(prompts), start + batch_size)
        cont_ids = [_split_continuation(tok, p, c) for p, c in zip(prompts[start:stop], conts[start:stop])]
        k = max(len(c) for c in cont_ids)
        # Logits at -(n+1)..-2 predict the n continuation tokens; pad reads repeat the last real one.
        read = torch.tensor([[-(len(c) + 1) + min(j, len(c) - 1) for j in range(k)] for c in cont_ids])
        positions = torch.tensor([-(len(c) + 1) for c in cont_ids])
        adds = _additions(None if mix is None else mix[start:stop], vectors, by_layer, scale)
        texts = [p + c for p, c in zip(prompts[start:stop], conts[start:stop])]
        logits = _run_batch(model, texts, adds, positions, read)
        logp = torch.log_softmax(logits, -1)
        for r, ids in enumerate(cont_ids):
            target = torch.tensor(ids, device=logp.device)
            lp = logp[r, :len(ids)].gather(1, target.view(-1, 1)).squeeze(1)
            sums.append(lp.sum().cpu())
            counts.append(len(ids))
            matches.append(bool((logits[r, :len(ids)].argmax(-1) == target).all()))
    return torch.stack(sums), torch.tensor(counts), torch.tensor(matches)
