"""Composite function vectors (CFVs) and analogies A:B :: C:D (Kang, Wu & Lu 2026).

For a source pair A:B the model is run once per bank FFV_i on the zero-shot prompt "Q: A\\nA:" with FFV_i added,
and log P(B | A, FFV_i) is read (first token of B, or the mean over B's tokens with score="mean"). A softmax over
the bank (temperature T) gives the weights w; optionally a learned affine map z = W·(logp/T) + b is applied before
the softmax (`Combiner`, trained on a set of analogies through the frozen model). CFV = Σ_i w_i FFV_i.

Layers: each bank vector is added at its own layer, weighted (for a bank built at one common layer — the default
of `fv-remote bank build` — this is exactly one vector at one layer). All additions touch the last token of the
prompt only, as for FVs.

Modes:
- multiple choice: every candidate (C_j, D_j) is scored by log P(D_j | "Q: C_j\\nA:", CFV); the best wins.
  Chance = 1 / number of choices.
- generative: the item's correct pair (C, D); a hit when the greedy continuation of "Q: C\\nA:" with the CFV
  starts with D's tokens (checked by teacher forcing, identical to greedy decoding for those tokens).

Baselines in the same run: no vector; the single bank FFV with the highest weight ("best_ffv"); an ICL prompt in
the issue's form `A:B::C:` ("icl"), and a one-shot Q/A demonstration "Q: A\\nA: B\\n\\nQ: C\\nA:" ("icl_qa").
"icl_qa+cfv" is the one-shot prompt with the CFV added at its last token (the two may add up).
Confidence intervals: percentile bootstrap over items; the CFV's gain over no-vector with a paired bootstrap;
per group (`by_group`: an item field such as BATS's relation family) the same, within the group.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import nnsight
import numpy as np
import torch

from fv_remote.relational.analogy_scoring import (_bank_tensors, _split_continuation, continuation_scores, first_token,
                                       first_token_logprobs)
from fv_remote.relational.bank import RelationBank
from fv_remote.relational.combiner import Combiner
from fv_remote.relational.overlap import Overlap, find_overlap, require_known
from fv_remote.data import MCAnalogy, PromptTemplate
from fv_remote.core.errors import UserError, require_positive
from fv_remote.execution import check_shippable, executor_of, run_stage, stage_session
from fv_remote.execution.stage import Stage, in_process
from fv_remote.plan.cost import (DTYPE_BYTES, PAYLOAD_TENSOR_OVERHEAD, RESULT_OVERHEAD, Dims, Plan as CostPlan,
                                  StageOptions, Trace, _batches, _merge, sent_bytes, session_bytes, tensor_bytes)
from fv_remote.relational.ffv import trace_kwargs
from fv_remote.models.loading import LoadedModel
from fv_remote.core.progress import Progress
from fv_remote.traces.mixing import bank_additions, combine_weights, mix_rows, row_scores
from fv_remote.traces.patching import add_at_positions, read_positions

METHODS = ("cfv", "no_vector", "best_ffv", "icl", "icl_qa", "icl_qa+cfv")
CFV_METHODS = ("cfv", "icl_qa+cfv")  # methods that add the CFV at the prompt's last token
MODES = ("mc", "generative")
SCORES = ("first", "mean")

@dataclass
class AnalogySettings:
    """How `run_analogies` scores items: multiple choice (`mode`), the relation profile's softmax temperature, the
    answer score, the CFV's scale, the ICL prompt formats and the bootstrap for the intervals."""

    mode: str = "mc"
    temperature: float = 1.0
    score: str = "first"  # "first": log P(first token of D); "mean": mean log-prob over D's tokens
    scale: float = 1.0  # multiplies the CFV (and the single FFV)
    batch_size: int = 48
    icl_format: str = "{a}:{b}::{c}:"
    icl_answer: str = "{y}"  # how D follows the ICL prompt (no space: "hot:cold::big:small")
    n_boot: int = 2000
    seed: int = 0
    template: PromptTemplate = field(default_factory=PromptTemplate)

    def check(self) -> "AnalogySettings":
        if self.mode not in MODES:
            raise UserError(f"unknown mode {self.mode!r}; use one of {', '.join(MODES)}")
        if self.score not in SCORES:
            raise UserError(f"unknown score {self.score!r}; use one of {', '.join(SCORES)}")
        if not self.temperature > 0:
            raise UserError(f"temperature must be positive, got {self.temperature}")
        require_positive("batch_size", self.batch_size)
        require_positive("n_boot", self.n_boot)
        for key in ("{a}", "{b}", "{c}"):
            if key not in self.icl_format:
                raise UserError(f"--icl-format must contain {key}, got {self.icl_format!r}")
        return self

    def icl_prompt(self, a: str, b: str, c: str) -> str:
        return self.icl_format.replace("{a}", a).replace("{b}", b).replace("{c}", c)

    def icl_template(self) -> PromptTemplate:
        return PromptTemplate(query="{x}", answer=self.icl_answer)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["template"] = [self.template.query, self.template.answer]
        return d


# --- relation profiles and weights ----------------------------------------------------------------------------


def relation_profile(model: LoadedModel, bank: RelationBank, pairs: Sequence[tuple[str, str]],
                     settings: AnalogySettings | None = None, progress: Progress | None = None) -> torch.Tensor:
    """[len(pairs), N]: log P(B | "Q: A\\nA:", FFV_i) for every bank vector (first token, or mean over tokens)."""
    s = settings or AnalogySettings()
    n_bank = len(bank.require_entries())
    eye = torch.eye(n_bank)
    prompts = [s.template.query_text(a) for a, _ in pairs for _ in range(n_bank)]
    mix = eye.repeat(len(pairs), 1)
    if s.score == "first":
        targets = []
        for a, b in pairs:
            t = first_token(model.tokenizer, s.template.query_text(a), s.template.answer_text(b))
            if t is None:
                raise UserError(f"{b!r} has no usable first token after the query")
            targets += [t] * n_bank
        with torch.no_grad():
            logp = first_token_logprobs(model, prompts, targets, mix, bank, s.scale, s.batch_size, progress)
    else:
        conts = [s.template.answer_text(b) for _, b in pairs for _ in range(n_bank)]
        with torch.no_grad():
            total, count, _ = continuation_scores(model, prompts, conts, mix, bank, s.scale, s.batch_size)
        logp = total / count
    return logp.view(len(pairs), n_bank)


def cfv_weights(logp: torch.Tensor, temperature: float = 1.0, combiner: Combiner | None = None) -> torch.Tensor:
    """Softmax over the bank of the relation profile (through the combiner when given)."""
    if combiner is not None:
        return torch.softmax(combiner.logits(logp), dim=-1)
    return torch.softmax(logp / temperature, dim=-1)


def composite_vector(bank: RelationBank, weights: torch.Tensor) -> dict[int, torch.Tensor]:
    """The CFV as {layer: vector} (one entry for a single-layer bank)."""
    vectors, by_layer = _bank_tensors(bank)
    return {layer: weights[idx] @ vectors[idx] for layer, idx in by_layer.items()}


# --- items ----------------------------------------------------------------------------------------------------


def check_items(tokenizer, items: Sequence[MCAnalogy], settings: AnalogySettings,
                ) -> tuple[list[MCAnalogy], list[tuple[MCAnalogy, str]]]:
    """Keep items whose B and every D have a usable first token where they are scored: after "Q: A\nA:" /
    "Q: C\nA:" and after the ICL prompt. The others are returned with the reason (reported, counted)."""
    kept, skipped = [], []
    q = settings.template
    for item in items:
        a, b = item.stem
        checks = [(f"B {b!r}", q.query_text(a), q.answer_text(b))]
        for j, (c, d) in enumerate(item.choices):
            checks.append((f"D {d!r} (choice {j})", q.query_text(c), q.answer_text(d)))
            checks.append((f"D {d!r} (choice {j}) after the ICL prompt", settings.icl_prompt(a, b, c),
                           settings.icl_answer.replace("{y}", d)))
        reason = next((f"{what} has no usable first token" for what, prompt, cont in checks
                       if first_token(tokenizer, prompt, cont) is None), None)
        if reason:
            skipped.append((item, reason))
        else:
            kept.append(item)
    return kept, skipped


@dataclass
class AnalogyResult:
    n: int
    n_skipped: int
    chance: float
    correct: dict[str, np.ndarray]  # method -> [n] 0/1
    weights: torch.Tensor  # [n, N]
    bank_names: list[str]
    items: list[MCAnalogy]
    skipped: list[tuple[MCAnalogy, str]]
    settings: AnalogySettings
    combiner: str | None = None
    group_by: str | None = None  # the item field `as_json` reports `by_group` for
    min_group: int = 1  # groups smaller than this are pooled into "other" in `as_json`'s `by_group`

    def accuracy(self) -> dict[str, float]:
        return {m: float(v.mean()) if len(v) else float("nan") for m, v in self.correct.items()}

    def ci95(self) -> dict[str, list[float]]:
        return {m: bootstrap_ci(v, self.settings.n_boot, self.settings.seed) for m, v in self.correct.items()}

    def gains(self) -> dict[str, dict[str, Any]]:
        """Paired bootstrap of the CFV's accuracy minus each baseline's (and of icl_qa+cfv's minus icl_qa's and
        no_vector's)."""
        return _paired_gains(self.correct, self.settings)

    def by_group(self, key: str = "relation", min_size: int = 1) -> dict[str, dict[str, Any]]:
        """Per value of the items' field `key`: n, accuracy and bootstrap 95% CI per method, and the paired gains
        (as `gains`) within the group. Items without the field fall in "(none)". Groups under `min_size` items are
        pooled into one "other" group (`pooled`: how many); a group of one item gets no interval (None)."""
        out = {}
        groups = self._groups(key)
        small = [idx for _, idx in groups if len(idx) < min_size]
        kept = [(name, idx) for name, idx in groups if len(idx) >= min_size]
        if small:
            kept.append((OTHER, sorted(i for idx in small for i in idx)))
        for name, idx in kept:
            sub = {m: v[idx] for m, v in self.correct.items()}
            one = len(idx) < 2  # a bootstrap of one value is that value: no interval
            gains = _paired_gains(sub, self.settings)
            out[name] = {"n": len(idx), "accuracy": {m: float(v.mean()) for m, v in sub.items()},
                         "ci95": None if one else {m: bootstrap_ci(v, self.settings.n_boot, self.settings.seed)
                                                   for m, v in sub.items()},
                         "gain": {k: {**g, "ci95": None} for k, g in gains.items()} if one else gains}
            if name == OTHER and small:
                out[name]["pooled"] = len(small)
        return out

    def by_relation(self) -> dict[str, dict[str, float]]:
        return {rel: {"n": len(idx), **{m: float(v[idx].mean()) for m, v in self.correct.items()}}
                for rel, idx in self._groups("prefix")}

    def _groups(self, key: str) -> list[tuple[str, list[int]]]:
        """Item indices per value of the items' field `key` ("prefix": the JSONL relation only), sorted."""
        groups: dict[str, list[int]] = {}
        for i, item in enumerate(self.items):
            value = item.relation if key == "prefix" else _group_of(item, key)
            groups.setdefault(value or "(none)", []).append(i)
        return sorted(groups.items())

    def as_json(self) -> dict[str, Any]:
        """The contract: n, n_skipped, chance, accuracy{cfv,no_vector,best_ffv,icl,...}, ci95{...}; plus extras."""
        return {"n": self.n, "n_skipped": self.n_skipped, "chance": self.chance, "accuracy": self.accuracy(),
                "ci95": self.ci95(), "gain": self.gains(), "mode": self.settings.mode,
                "settings": self.settings.as_dict(), "combiner": self.combiner, "bank": self.bank_names,
                "by_relation": self.by_relation(), "group_by": self.group_by,
                "by_group": self.by_group(self.group_by, self.min_group) if self.group_by else None,
                "min_group": self.min_group if self.group_by else None,
                "skipped": [{"stem": list(it.stem), "reason": why} for it, why in self.skipped]}


def _paired_gains(correct: dict[str, np.ndarray], s: AnalogySettings) -> dict[str, dict[str, Any]]:
    pairs = [("cfv", m) for m in correct if m != "cfv"]
    pairs += [("icl_qa+cfv", m) for m in ("icl_qa", "no_vector") if "icl_qa+cfv" in correct and m in correct]
    out = {}
    for a, b in pairs:
        diff = correct[a] - correct[b]
        out[f"{a}_minus_{b}"] = {"mean": float(diff.mean()) if len(diff) else float("nan"),
                                 "ci95": bootstrap_ci(diff, s.n_boot, s.seed)}
    return out


OTHER = "other"
MIN_GROUP = 10  # items: smaller groups are pooled as "other" (a 95% interval on a handful of 0/1 values spans ~all)


def real_groups(items: Sequence[MCAnalogy], key: str, min_size: int = MIN_GROUP) -> bool:
    """Whether grouping by `key` unasked is worth a table: at least two groups, every one of at least `min_size`
    items (e.g. BATS's relations with ~50 items each; not per-item source ids in the JSONL prefix)."""
    sizes: dict[str, int] = {}
    for item in items:
        value = _group_of(item, key)
        if not value:
            return False
        sizes[value] = sizes.get(value, 0) + 1
    return len(sizes) >= 2 and min(sizes.values()) >= min_size


def _group_of(item: MCAnalogy, key: str) -> str:
    if key in item.groups:
        return item.groups[key]
    lower = {k.lower(): v for k, v in item.groups.items()}
    return lower.get(key.lower(), item.relation if key == "relation" else "")


def group_keys(items: Sequence[MCAnalogy]) -> list[str]:
    """The fields any item can be grouped by."""
    relation = {"relation"} if any(it.relation for it in items) else set()
    return sorted({k for it in items for k in it.groups} | relation)


def bootstrap_ci(values: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval of the mean."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return [float(lo), float(hi)]


def _choice_scores(model: LoadedModel, bank: RelationBank, prompts: list[str], conts: list[str],
                   template: PromptTemplate, mix: torch.Tensor | None, s: AnalogySettings,
                   mode: str) -> torch.Tensor:
    """Per row: a score (mc) or a 0/1 hit (generative)."""
    with torch.no_grad():
        if mode == "mc" and s.score == "first":
            targets = [first_token(model.tokenizer, p, template.answer_text(c)) for p, c in zip(prompts, conts)]
            return first_token_logprobs(model, prompts, cast(list[int], targets), mix, bank, s.scale, s.batch_size)
        total, count, match = continuation_scores(model, prompts, [template.answer_text(c) for c in conts], mix,
                                                  bank, s.scale, s.batch_size)
    if mode == "generative":
        return match.float()
    return total / count


def run_analogies(model: LoadedModel, bank: RelationBank, items: Sequence[MCAnalogy],
                  settings: AnalogySettings | None = None, combiner: Combiner | None = None,
                  methods: Sequence[str] = METHODS, progress: Progress | None = None,
                  exclude: torch.Tensor | None = None) -> AnalogyResult:
    """Score every method on the items (bad items are skipped and counted, never silently dropped).

    The stage body is `analogy_session` (relation profiles, CFV weights and every method's scores in one session:
    ONE NDIF request on NDIF; `progress` is then called once, at the end). The local executor runs the
    local fast path `_local_scores` instead (a declared capability, `Executor.local_fast_paths`).
    `exclude` ([len(items), len(bank)] bool) leaves entries out of an item's CFV weights (their log-probs masked
    before the softmax; `without_trained`); every item needs an entry left, and a combiner does not go with it.
    """
    s = (settings or AnalogySettings()).check()
    bank.require_entries()
    bank.check_model(model)
    if combiner is not None:
        combiner.check_bank(bank)
    if exclude is not None:
        if combiner is not None:
            raise UserError(COMBINER_EXCLUDE)
        if tuple(exclude.shape) != (len(items), len(bank)) or bool(exclude.all(-1).any()):
            raise UserError(f"exclude must be [{len(items)} items, {len(bank)} entries] with an entry left for "
                            f"every item, got {tuple(exclude.shape)}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or "cfv" not in methods:
        raise UserError(f"methods must include cfv and come from {', '.join(METHODS)}; got {list(methods)}")
    kept, skipped = check_items(model.tokenizer, items, s)
    n_bank = len(bank)
    penalty = torch.zeros(len(kept), n_bank)  # added to the relation profile: -inf leaves an entry out of an item
    if exclude is not None:
        row = {id(it): i for i, it in enumerate(items)}
        penalty = penalty.masked_fill(exclude[[row[id(it)] for it in kept]], float("-inf"))
    steps = len(methods) + 1
    if s.mode == "mc":
        chance = float(np.mean([1 / len(it.choices) for it in kept])) if kept else float("nan")
    else:
        chance = 1.0 / model.adapter.vocab_size
    ex = executor_of(model)
    scores: Mapping[str, torch.Tensor | None]
    if not kept:
        weights, scores = torch.empty(0, n_bank), {m: None for m in methods}
    else:
        weights, scores = run_stage(ANALOGY, model, AnalogyPlan(list(methods), bank, kept, s, combiner, progress,
                                                                penalty))
    if progress and (not ex.local_fast_paths or not kept):
        progress(steps, steps)
    correct = {m: _hits(kept, scores[m], s.mode) for m in methods}
    return AnalogyResult(len(kept), len(skipped), chance, correct, weights, bank.names, kept, skipped, s,
                         combiner.meta.get("path") if combiner else None,
                         "relation" if real_groups(kept, "relation", MIN_GROUP) else None, MIN_GROUP)


# --- train/test overlap (`relational.overlap`) -----------------------------------------------------------------

COMBINER_EXCLUDE = ("--exclude-trained does not go with a learned combiner: the combiner reads every entry's "
                    "log-prob to weight each entry, so an entry cannot be left out of one item; leave the combiner "
                    "out, or rebuild the bank without the overlapping relations")


def item_pairs(item: MCAnalogy, mode: str = "mc") -> list[tuple[str, str]]:
    """The word pairs an item's score reads: its stem and every choice (mc), or the stem and the answer
    (generative)."""
    return [item.stem, *(item.choices if mode == "mc" else [item.correct])]


def analogy_overlap(bank: RelationBank, result: AnalogyResult) -> Overlap:
    """Which scored items share a pair (stem or a choice) with which entries' recorded training pairs."""
    return find_overlap(bank, [item_pairs(it, result.settings.mode) for it in result.items])


def subset(result: AnalogyResult, rows: Sequence[int]) -> AnalogyResult:
    """The same result on some of its items (e.g. the items that share no pair with the bank's training pairs)."""
    idx = list(rows)
    items = [result.items[i] for i in idx]
    chance = result.chance
    if result.settings.mode == "mc":
        chance = float(np.mean([1 / len(it.choices) for it in items])) if items else float("nan")
    return AnalogyResult(len(idx), result.n_skipped, chance, {m: v[idx] for m, v in result.correct.items()},
                         result.weights[idx], result.bank_names, items, result.skipped, result.settings,
                         result.combiner, result.group_by, result.min_group)


def without_trained(model: LoadedModel, bank: RelationBank, result: AnalogyResult, overlap: Overlap,
                    progress: Progress | None = None) -> tuple[AnalogyResult, int]:
    """`result` again, on the same items, with each item's CFV built without the bank entries it shares a pair with;
    and how many items had no entry left.

    Only the items that share a pair are scored again, and only with the methods that read the bank (cfv,
    best_ffv, icl_qa+cfv); the others keep their scores (nothing they read changed). An item that shares a pair with
    every entry has no bank left: its CFV (and single FFV) is the zero vector, so cfv and best_ffv score it as
    no_vector does and icl_qa+cfv as icl_qa. Why per item and not out of the whole bank: `relational.overlap`."""
    require_known(overlap)
    if result.combiner is not None:
        raise UserError(COMBINER_EXCLUDE)
    mask = overlap.mask()
    touched = [i for i, hits in enumerate(overlap.hits) if hits]
    empty = [i for i in touched if bool(mask[i].all())]
    redo = [i for i in touched if i not in empty]
    correct = {m: v.copy() for m, v in result.correct.items()}
    weights = result.weights.clone()
    methods = [m for m in result.correct if m in MIXING_METHODS]
    if redo:
        again = run_analogies(model, bank, [result.items[i] for i in redo], result.settings, methods=methods,
                              progress=progress, exclude=mask[redo])
        if again.n != len(redo):  # the same items passed the same checks before
            raise UserError(f"{len(redo) - again.n} items could not be scored again without their entries")
        for m in methods:
            correct[m][redo] = again.correct[m]
        weights[redo] = again.weights
    if empty:  # no entry left: the bank adds nothing, so the vector methods are their vector-free counterparts
        plain = {m: "icl_qa" if m == "icl_qa+cfv" else "no_vector" for m in methods}
        base = {m: correct[m][empty] for m in set(plain.values()) if m in correct}
        missing = sorted(set(plain.values()) - set(base))
        if missing:
            extra = run_analogies(model, bank, [result.items[i] for i in empty], result.settings,
                                  methods=["cfv", *missing])
            base.update({m: extra.correct[m] for m in missing})
        for m in methods:
            correct[m][empty] = base[plain[m]]
        weights[empty] = 0.0
    return AnalogyResult(result.n, result.n_skipped, result.chance, correct, weights, result.bank_names,
                         result.items, result.skipped, result.settings, result.combiner, result.group_by,
                         result.min_group), len(empty)


def _method_rows(kept: Sequence[MCAnalogy], s: AnalogySettings,
                 method: str) -> tuple[list[int], list[str], list[str], PromptTemplate]:
    """Per scored row of a method: its item, prompt and answer D, and the template D is scored with."""
    if s.mode == "mc":
        row_item = [i for i, it in enumerate(kept) for _ in it.choices]
        cs = [c for it in kept for c, _ in it.choices]
        ds = [d for it in kept for _, d in it.choices]
    else:
        row_item = list(range(len(kept)))
        cs = [it.correct[0] for it in kept]
        ds = [it.correct[1] for it in kept]
    q = s.template
    if method == "icl":
        return row_item, [s.icl_prompt(kept[i].stem[0], kept[i].stem[1], c) for i, c in zip(row_item, cs)], ds, \
            s.icl_template()
    if method in ("icl_qa", "icl_qa+cfv"):
        return row_item, [q.render([kept[i].stem], c) for i, c in zip(row_item, cs)], ds, q
    return row_item, [q.query_text(c) for c in cs], ds, q


def _hits(kept: Sequence[MCAnalogy], scores: torch.Tensor | None, mode: str) -> np.ndarray:
    """0/1 per item: the generative hit, or whether the best-scored choice is the answer."""
    if scores is None:
        return np.zeros(0)
    if mode == "generative":
        return scores.numpy().astype(np.float64)
    hits, start = [], 0
    for it in kept:
        block = scores[start:start + len(it.choices)]
        hits.append(float(int(block.argmax()) == it.answer))
        start += len(it.choices)
    return np.array(hits)


def _local_scores(model: LoadedModel, bank: RelationBank, kept: list[MCAnalogy], s: AnalogySettings,
                  combiner: Combiner | None, methods: Sequence[str], penalty: torch.Tensor,
                  progress: Progress | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    steps, done = len(methods) + 1, 1
    profile = relation_profile(model, bank, [it.stem for it in kept], s) + penalty
    weights = cfv_weights(profile, s.temperature, combiner)
    if progress:
        progress(done, steps)
    scores = {}
    for method in methods:
        row_item, prompts, ds, template = _method_rows(kept, s, method)
        idx = torch.tensor(row_item, dtype=torch.long)
        mix = None
        if method in CFV_METHODS:
            mix = weights[idx]
        elif method == "best_ffv":
            mix = torch.nn.functional.one_hot(weights.argmax(-1), len(bank)).float()[idx]
        scores[method] = _choice_scores(model, bank, prompts, ds, template, mix, s, s.mode)
        done += 1
        if progress:
            progress(done, steps)
    return weights, scores


# --- the stage: one remote request ----------------------------------------------------------------------------


@dataclass
class AnalogyPlan:
    """The items, the bank and how to score them (never fetched later: everything lives in this process)."""

    methods: list[str]
    bank: Any = in_process()
    items: Any = in_process()  # the usable MCAnalogy items
    settings: Any = in_process()
    combiner: Any = in_process()
    progress: Any = in_process()
    penalty: Any = in_process()  # [items, bank]: 0, or -inf for an entry left out of an item's weights


class Analogy(Stage[AnalogyPlan, tuple]):
    """Relation profiles -> CFV weights -> every method's row scores: `analogy_session` in one session; the local
    executor runs the shared-prefix fast path `_local_scores` (a declared capability, `Executor.local_fast_paths`:
    1.2-1.3x, bench_analogy_body.py)."""

    name = "analogy"
    plan_type = AnalogyPlan
    can_submit = False

    def body(self, model: LoadedModel, plan: AnalogyPlan) -> tuple:
        penalty = torch.zeros(len(plan.items), len(plan.bank)) if plan.penalty is None else plan.penalty
        args = (model, plan.bank, plan.items, plan.settings, plan.combiner, plan.methods, penalty)
        if executor_of(model).local_fast_paths:
            return _local_scores(*args, plan.progress)
        return analogy_session(*args)

    def cost(self, dims: Dims, o: StageOptions) -> tuple[CostPlan, Any]:
        def make(n: int) -> CostPlan:
            return analogy_cost(dims, n, o.bank_size, o.tokens(0), o.choices, o.methods, o.batch_size or 48,
                                DTYPE_BYTES[o.dtype])
        return make(o.items), make

    def commit(self, plan: AnalogyPlan, outputs: tuple, progress: Any = None) -> tuple:
        return outputs  # (CFV weights [items, bank], {method: row scores}); the result is assembled by the caller


ANALOGY = Analogy()


def _score_batches(model: LoadedModel, prompts: Sequence[str], conts: Sequence[str], rows: Sequence[int],
                   batch_size: int, first: bool) -> list[dict]:
    """Rows as plain-tensor batches for `analogy_session`: the texts, where the vector goes (the prompt's last
    token), which logits to read and the tokens expected there (`first`: D's first token after the prompt only;
    else all of D's tokens, teacher-forced, as `continuation_scores`)."""
    tok = model.tokenizer
    batches = []
    for start in range(0, len(prompts), batch_size):
        ps, cs = list(prompts[start:start + batch_size]), list(conts[start:start + batch_size])
        if first:
            ids = [[t] for p, c in zip(ps, cs) if (t := first_token(tok, p, c)) is not None]
            if len(ids) != len(ps):
                raise UserError("an answer has no usable first token after its query")
            texts = ps
        else:
            ids = [_split_continuation(tok, p, c) for p, c in zip(ps, cs)]
            texts = [p + c for p, c in zip(ps, cs)]
        k = max(len(i) for i in ids)
        read = torch.tensor([[-(len(i) + 1) + min(j, len(i) - 1) + (1 if first else 0) for j in range(k)]
                             for i in ids])
        batches.append({"texts": texts, "rows": torch.tensor(list(rows[start:start + batch_size])),
                        "positions": read[:, 0].clone(), "read": read,
                        "targets": torch.tensor([i + i[-1:] * (k - len(i)) for i in ids]),
                        "mask": torch.tensor([[j < len(i) for j in range(k)] for i in ids]),
                        "keep": trace_kwargs(model) if first else {}})
    return batches


def analogy_session(model: LoadedModel, bank: RelationBank, kept: list[MCAnalogy], s: AnalogySettings,
                    combiner: Combiner | None, methods: Sequence[str],
                    penalty: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`_local_scores` as one stage: relation profiles -> CFV weights (softmax, or the combiner's) -> each method's
    row scores, all in one session; only the weights and one score per row come back. `penalty` [items, bank] is
    added to the profile before the weights (-inf: an entry left out of an item's CFV; zeros by default).

    Whole prompts throughout (locally the first-token path shares cached prefixes; same values up to rounding).
    The body ends by clearing its locals: the server returns every local whose object was saved (by id, and the ids
    of freed saved logits get reused), so only `outs` and `weights` go back.
    """
    n_bank, n_items = len(bank), len(kept)
    if penalty is None:
        penalty = torch.zeros(n_items, n_bank)
    vectors, by_layer = _bank_tensors(bank)
    tmpl = s.template
    profile_first = s.score == "first"
    stems = [it.stem for it in kept]
    passes: list[dict[str, Any]] = [{"mix": "eye", "batches": _score_batches(
        model, [tmpl.query_text(a) for a, _ in stems for _ in range(n_bank)],
        [tmpl.answer_text(b) for _, b in stems for _ in range(n_bank)], list(range(n_bank)) * n_items,
        s.batch_size, profile_first)}]
    method_first = s.mode == "mc" and s.score == "first"
    for method in methods:
        row_item, prompts, ds, template = _method_rows(kept, s, method)
        mix = "weights" if method in CFV_METHODS else {"best_ffv": "onehot"}.get(method, "none")
        passes.append({"mix": mix, "batches": _score_batches(
            model, prompts, [template.answer_text(d) for d in ds], row_item, s.batch_size, method_first)})
    combine = None
    if combiner is not None:
        combine = {"weight": combiner.weight.float(), "bias": combiner.bias.float(), "t": combiner.temperature}
    ad, lm = model.adapter, model.lm
    layers = [ad.layer(lm, index) for index in range(ad.n_layers)]
    add_layers = sorted(by_layer)
    is_tuple, unembed, scale, temperature = ad.layer_output_is_tuple, ad.unembed(lm), s.scale, s.temperature
    session = executor_of(model).session
    if session:
        check_shippable(passes=passes, vectors=vectors, by_layer=by_layer, combine=combine, penalty=penalty)
    outs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    sums: list[torch.Tensor] | torch.Tensor
    counts: list[torch.Tensor] | torch.Tensor
    matches: list[torch.Tensor] | torch.Tensor
    with stage_session(model):
        weights = torch.empty(0, n_bank)
        for p in passes:
            sums, counts, matches = [], [], []
            for b in p["batches"]:
                mix = mix_rows(p["mix"], b["rows"], weights, n_bank)
                adds = bank_additions(mix, vectors, by_layer, add_layers, layers, scale)
                with lm.trace(b["texts"], **b["keep"]):
                    for envoy, vec in adds:
                        add_at_positions(envoy, is_tuple, vec, b["positions"])
                    picked = read_positions(unembed.output, b["read"]).save()
                total, match = row_scores(picked, b["targets"], b["mask"])
                sums.append(total)
                counts.append(b["mask"].sum(1))
                matches.append(match)
            sums, counts, matches = torch.cat(sums), torch.cat(counts), torch.cat(matches)
            if p["mix"] == "eye":
                weights = combine_weights((sums / counts).view(n_items, n_bank) + penalty, temperature, combine)
            outs.append((sums.detach().cpu(), counts.cpu(), matches.cpu()))
        weights = weights.detach().cpu()
        picked = mix = adds = envoy = vec = total = match = sums = counts = matches = b = p = None  # type: ignore[assignment]  # session unbinds locals
        if session:
            outs, weights = nnsight.save(outs), nnsight.save(weights)
    scores = {}
    for method, (sums, counts, matches) in zip(methods, outs[1:]):
        if s.mode == "generative":
            scores[method] = matches.float()
        else:
            scores[method] = sums if method_first else sums / counts
    return weights, scores


# --- the learned combiner --------------------------------------------------------------------------------------


def choice_loss(model: LoadedModel, bank: RelationBank, items: Sequence[MCAnalogy], weights: torch.Tensor,
                s: AnalogySettings, batch_size: int | None = None) -> tuple[torch.Tensor, float]:
    """Mean cross-entropy over each item's choice scores log P(D_j | "Q: C_j\\nA:", CFV) (CFV from the item's row
    of `weights`; differentiable in it), and the accuracy."""
    rows, prompts, targets = [], [], []
    for r, item in enumerate(items):
        for c, d in item.choices:
            rows.append(r)
            prompts.append(s.template.query_text(c))
            targets.append(first_token(model.tokenizer, prompts[-1], s.template.answer_text(d)))
    scores = first_token_logprobs(model, prompts, cast(list[int], targets), weights[rows], bank, s.scale,
                                  batch_size or s.batch_size)
    loss: float | torch.Tensor = 0.0
    start, hits = 0, 0
    for item in items:
        k = len(item.choices)
        block = scores[start:start + k]
        loss = loss + torch.nn.functional.cross_entropy(block.view(1, -1), torch.tensor([item.answer]))
        hits += int(int(block.argmax()) == item.answer)
        start += k
    return torch.as_tensor(loss) / len(items), hits / len(items)


def combiner_steps(model: LoadedModel, bank: RelationBank, items: Sequence[MCAnalogy], logp: torch.Tensor,
                   s: AnalogySettings, steps: int, lr: float, l2: float, items_per_step: int,
                   batch_size: int | None = None) -> Iterator[tuple[int, float, torch.Tensor, torch.Tensor]]:
    """Adam on the affine combiner W, b (init identity, 0; weights softmax(W·logp/T + b)), `items_per_step` random
    items a step: their choice cross-entropy through the frozen model plus l2·‖(W, b) − (I, 0)‖². Yields (step, loss,
    W, b) after each step (W, b are the live parameters: clone what you keep). The one training loop of
    `train_combiner` and `combiner_fit.fit_combiner`."""
    comb = Combiner.identity(bank.names, s.temperature)
    weight = comb.weight.clone().requires_grad_(True)
    bias = comb.bias.clone().requires_grad_(True)
    opt = torch.optim.Adam([weight, bias], lr=lr)
    gen = torch.Generator().manual_seed(s.seed)
    eye = torch.eye(len(bank))
    for step in range(1, steps + 1):
        pick = torch.randperm(len(items), generator=gen)[:items_per_step].tolist()
        weights = torch.softmax((logp[pick] / s.temperature) @ weight.T + bias, -1)
        loss, _ = choice_loss(model, bank, [items[i] for i in pick], weights, s, batch_size=batch_size)
        loss = loss + l2 * ((weight - eye).pow(2).sum() + bias.pow(2).sum())
        opt.zero_grad()
        loss.backward()
        opt.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise UserError("combiner training diverged (non-finite loss); lower the learning rate (--combiner-lr)")
        yield step, value, weight, bias


def train_combiner(model: LoadedModel, bank: RelationBank, items: Sequence[MCAnalogy],
                   settings: AnalogySettings | None = None, steps: int = 40, lr: float = 0.05, l2: float = 1e-3,
                   items_per_step: int = 8, progress: Progress | None = None) -> Combiner:
    """Fit W, b (init identity, 0) so the CFV picks the right choice (`combiner_steps`) for `steps` steps on one
    set, no held-aside check (`combiner_fit.fit_combiner` adds early stopping). Multiple-choice items; for 2-choice
    CSV problems the foil is the other choice."""
    s = (settings or AnalogySettings()).check()
    require_positive("steps", steps)
    bank.require_entries()
    kept, skipped = check_items(model.tokenizer, items, s)
    if not kept:
        raise UserError("no usable analogies to train the combiner on")
    logp = relation_profile(model, bank, [it.stem for it in kept], s)
    comb = Combiner.identity(bank.names, s.temperature)
    history = []
    for step, loss, weight, bias in combiner_steps(model, bank, kept, logp, s, steps, lr, l2, items_per_step,
                                                   batch_size=10 ** 6):
        history.append(loss)
        comb.weight, comb.bias = weight.detach().clone(), bias.detach().clone()
        if progress:
            progress(step, steps)
    comb.meta = {"n_train": len(kept), "n_skipped": len(skipped), "steps": steps, "lr": lr, "l2": l2,
                 "items_per_step": items_per_step, "loss": history}
    return comb


# -- the cost model: what the body costs as one request (`fv-remote plan`) ------------------------------



MIXING_METHODS = frozenset({*CFV_METHODS, "best_ffv"})  # these mix the bank's vectors per row


def analogy_cost(dims: Dims, n_items: int, n_bank: int, prompt_tokens: int, n_choices: int = 4,
                 n_methods: int = len(METHODS),
                 batch_size: int = 48, nbytes: int = 2, passes: list[list[int]] | None = None) -> CostPlan:
    """`analogy --remote` (multiple choice, first-token scores): the relation profile (every item's A:B with every
    bank vector) then, per method, every item's choices; batches of `batch_size` whole prompts, logits at the last
    token only. `passes` (per pass, each row's prompt length in tokens) replaces the uniform `prompt_tokens` where the
    prompts are known. Back per pass: a score sum, a count and a match per row, and the CFV weights [items, bank]."""
    traces: list[Trace] = []
    if passes is None:  # every row prompt_tokens long: whole batches counted, not listed
        rows = [n_items * n_bank] + [n_items * n_choices] * n_methods
        for n in rows:
            full, rest = divmod(n, batch_size)
            traces += [Trace(batch_size, prompt_tokens, prompt_tokens, 1, count=full)] if full else []
            traces += [Trace(rest, prompt_tokens, prompt_tokens, 1)] if rest else []
        n_tokens = sum(rows) * prompt_tokens
    else:
        rows = [len(p) for p in passes]
        for lengths in passes:
            traces += [Trace(r, t, t, 1) for r, t in _batches(lengths, batch_size)]
        n_tokens = sum(sum(p) for p in passes)
    n_batches = sum(t.count for t in traces)
    sent = session_bytes(analogy_session, dims) + n_tokens * 4 + sum(rows) * 8 * 5 \
        + 5 * PAYLOAD_TENSOR_OVERHEAD * n_batches + sent_bytes(n_bank * dims.d_model, 4) \
        + sent_bytes(n_items * n_bank, 4)  # the profile's penalty (zeros unless entries are left out)
    returned = RESULT_OVERHEAD + sum(tensor_bytes(n, 4) + tensor_bytes(n, 8) + tensor_bytes(n, 1) for n in rows) \
        + tensor_bytes(n_items * n_bank, 4)
    # rows of the profile (one bank vector each) and of the mixing methods: [rows, bank] @ [bank, d_model] per batch
    mixed = rows[0] + sum(n for n, method in zip(rows[1:], METHODS) if method in MIXING_METHODS)
    return CostPlan("analogy", n_items, "items", _merge(traces), sent, returned,
                extra_flops=2 * mixed * n_bank * dims.d_model,
                settings={"items": n_items, "bank": n_bank, "choices": n_choices, "methods": len(rows) - 1,
                          "batch_size": batch_size})
