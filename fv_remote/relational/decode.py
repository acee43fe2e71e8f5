"""Decoding a vector: push it through the final norm and the unembedding, list the top tokens and find where
relation words (e.g. "opposite", "antonym") rank among the whole vocabulary.

Todd et al. (2024) and Kang, Wu & Lu (2026) read FVs this way: a vector that encodes "antonym" tends to rank words
about opposition high. Locally plain torch on the loaded weights; remotely one tiny trace that calls the final norm
and the unembedding ad hoc (nothing here depends on a prompt).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import nnsight
import torch

from fv_remote.core.errors import UserError, require_positive
from fv_remote.execution import executor_of, run_stage, stage_session
from fv_remote.execution.stage import Stage, in_process
from fv_remote.models.loading import LoadedModel
from fv_remote.traces.projection import project_rows
from fv_remote.fv.vectors import probe_ids


@dataclass
class Decoded:
    name: str
    top: list[tuple[str, float]]  # (token text, logit)
    ranks: dict[str, int] = field(default_factory=dict)  # word -> 1-based rank of its best token form
    forms: dict[str, str] = field(default_factory=dict)  # word -> the token that got that rank

    def as_json(self) -> dict:
        return {"name": self.name, "top": [[t, round(v, 4)] for t, v in self.top], "ranks": self.ranks,
                "forms": self.forms}


def project(model: LoadedModel, vector: torch.Tensor) -> torch.Tensor:
    """Logits [vocab] of `vector` read as a residual-stream state: unembed(final_norm(vector))."""
    ad = model.adapter
    if vector.shape[-1] != ad.d_model:
        raise UserError(f"vector has width {vector.shape[-1]}, the model's residual stream {ad.d_model}")
    norm, unembed = ad.final_norm(model.hf), ad.unembed(model.hf)
    param = next(unembed.parameters())
    with torch.no_grad():
        x = vector.detach().to(param.device, param.dtype).view(1, 1, -1)
        return unembed(norm(x)).float().view(-1).cpu()


def word_forms(tokenizer, word: str) -> dict[int, str]:
    """Token ids that stand for a word (id -> text): the variants " word", "word", " Word", "Word" that are a
    single token; if none is, the first token of each variant (a weaker reading, shown in the output)."""
    single: dict[int, str] = {}
    first: dict[int, str] = {}
    for variant in (f" {word}", word, f" {word.capitalize()}", word.capitalize()):
        ids = tokenizer.encode(variant, add_special_tokens=False)
        if not ids or not tokenizer.decode(ids[:1]).strip():
            continue
        (single if len(ids) == 1 else first).setdefault(ids[0], tokenizer.decode(ids[:1]))
    return single or first


def _best_forms(tokenizer, words: Sequence[str], position_of) -> tuple[dict[str, int], dict[str, str]]:
    ranks, forms = {}, {}
    for word in words:
        options = word_forms(tokenizer, word)
        if not options:
            continue
        best = min(options, key=position_of)
        ranks[word], forms[word] = position_of(best) + 1, options[best]
    return ranks, forms


def decode(model: LoadedModel, vector: torch.Tensor, name: str = "vector", words: Sequence[str] = (),
           k: int = 20) -> Decoded:
    """Top-k tokens of one vector read through the final norm and unembedding, and the ranks of `words`."""
    return decode_many(model, [(name, vector)], words, k)[0]


@dataclass
class DecodePlan:
    """Vectors to read through the final norm and unembedding: their names, the relation words, top-k."""

    names: list[str]
    words: list[str]
    k: int
    candidates: list[int]  # token ids of the words' forms, whose vocabulary positions come back
    rows: Any = in_process()  # the vectors [n, 1, d_model]
    tokenizer: Any = in_process()  # decoding is never fetched later


class Decode(Stage[DecodePlan, list[Decoded]]):
    """Top tokens of vectors and the ranks of relation words: the final norm and unembedding are called on the
    vectors inside one tiny trace (no weight is read: NDIF's sandbox holds none); only the top-k (ids, logits) and
    the vocabulary positions of the words' token forms come back."""

    name = "decode"
    plan_type = DecodePlan
    can_submit = False

    def body(self, model: LoadedModel, plan: DecodePlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ad, lm = model.adapter, model.lm
        rows, candidates = plan.rows, torch.tensor(plan.candidates, dtype=torch.long)
        norm, unembed = ad.final_norm(lm), ad.unembed(lm)
        top_k, probe = min(plan.k, ad.vocab_size), probe_ids()
        session = executor_of(model).session
        with stage_session(model):
            with lm.trace(input_ids=probe):
                values, ids, where = project_rows(norm, unembed, rows, top_k, candidates)
                values, ids, where = values.save(), ids.save(), where.save()
            values, ids, where = values.cpu(), ids.cpu(), where.cpu()
            if session:
                values, ids, where = nnsight.save(values), nnsight.save(ids), nnsight.save(where)
        return values, ids, where

    def commit(self, plan: DecodePlan, outputs: tuple, progress: Any = None) -> list[Decoded]:
        values, ids, where = outputs
        tok, out = plan.tokenizer, []
        for i, name in enumerate(plan.names):
            position = dict(zip(plan.candidates, where[i].tolist()))
            top = [(tok.decode([int(t)]), float(v)) for v, t in zip(values[i], ids[i])]
            ranks, forms = _best_forms(tok, plan.words, lambda t, position=position: position[t])
            out.append(Decoded(name, top, ranks, forms))
        return out


DECODE = Decode()


def decode_many(model: LoadedModel, named: Sequence[tuple[str, torch.Tensor]], words: Sequence[str] = (),
                k: int = 20) -> list[Decoded]:
    """`decode` for several (name, vector), as one stage (one request on NDIF)."""
    require_positive("top-k", k)
    ad, tok = model.adapter, model.tokenizer
    for _, vector in named:
        if vector.shape[-1] != ad.d_model:
            raise UserError(f"vector has width {vector.shape[-1]}, the model's residual stream {ad.d_model}")
    candidates = sorted({t for w in words for t in word_forms(tok, w)})
    rows = torch.stack([v.detach().float().view(-1) for _, v in named]).unsqueeze(1)  # [n, 1, d_model]
    plan = DecodePlan([name for name, _ in named], list(words), k, candidates, rows, tok)
    return run_stage(DECODE, model, plan)
