"""In-context prompts in the style of Todd et al. (2024), dataset splits, and answer tokens.

Randomness comes only from `random.Random` seeded explicitly, so the same seed gives the same splits and
prompts on every run and machine.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from fv_remote.core.errors import UserError, did_you_mean, require_positive

__all__ = [
    "PromptTemplate",
    "Splits",
    "ICLPrompt",
    "PROMPT_KINDS",
    "split_pairs",
    "build_prompts",
    "answer_first_token",
    "resolve_answers",
]

PROMPT_KINDS = ("clean", "shuffled", "zero_shot")

Pair = tuple[str, str]


@dataclass
class PromptTemplate:
    """`prefix`, then demonstrations and the query joined by `separator`: "Q: x\\nA: y\\n\\nQ: x'\\nA:"."""

    query: str = "Q: {x}\nA:"
    answer: str = " {y}"
    separator: str = "\n\n"
    prefix: str = ""

    # str.replace rather than str.format, so braces inside words or templates need no escaping.
    def query_text(self, x: str) -> str:
        return self.query.replace("{x}", x)

    def answer_text(self, y: str) -> str:
        return self.answer.replace("{y}", y)

    def demo(self, x: str, y: str) -> str:
        return self.query_text(x) + self.answer_text(y)

    def render(self, demos: Sequence[Pair], x: str) -> str:
        parts = [self.demo(dx, dy) for dx, dy in demos] + [self.query_text(x)]
        return self.prefix + self.separator.join(parts)


@dataclass
class Splits:
    train: list[Pair]
    valid: list[Pair]
    test: list[Pair]


@dataclass
class ICLPrompt:
    """One prompt; `answer` is always the correct output for `query`, whatever the demo labels say."""

    text: str
    query: str
    answer: str
    demos: list[Pair] = field(default_factory=list)
    kind: str = "clean"


def split_pairs(pairs: Sequence[Pair], seed: int = 0, fractions: Sequence[float] = (0.7, 0.15, 0.15)) -> Splits:
    """Shuffle with `seed` and cut into train/valid/test; valid and test get floor(n * fraction) pairs each."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise UserError(f"fractions must be three non-negative numbers summing to 1, got {tuple(fractions)}")
    shuffled = [(x, y) for x, y in pairs]
    random.Random(seed).shuffle(shuffled)
    n = len(shuffled)
    n_valid, n_test = int(n * fractions[1]), int(n * fractions[2])
    n_train = n - n_valid - n_test
    return Splits(shuffled[:n_train], shuffled[n_train : n_train + n_valid], shuffled[n_train + n_valid :])


def build_prompts(
    pairs: Sequence[Pair],
    n_prompts: int,
    n_shots: int = 10,
    kind: str = "clean",
    seed: int = 0,
    template: PromptTemplate | None = None,
    query_pairs: Sequence[Pair] | None = None,
) -> list[ICLPrompt]:
    """`n_prompts` prompts: `n_shots` demonstrations from `pairs`, a query from `query_pairs` (default `pairs`).

    Queries, demonstrations and label shuffles use separate seeded streams, so for one seed every kind gets the
    same queries, and "shuffled" prompts are exactly the "clean" ones with their demo labels permuted. Queries
    are drawn without replacement until `query_pairs` is used up, then reshuffled. Demonstrations never share
    the query's input (that would give the answer away).
    """
    if kind not in PROMPT_KINDS:
        hint = did_you_mean(kind, PROMPT_KINDS)
        raise UserError(f"unknown prompt kind {kind!r}{hint}; use one of {', '.join(PROMPT_KINDS)}")
    n_prompts = require_positive("n_prompts", n_prompts)
    if n_shots is None or int(n_shots) < 0:
        raise UserError(f"n_shots must be 0 or more, got {n_shots}")
    n_shots = int(n_shots)
    template = template or PromptTemplate()
    pairs = [(x, y) for x, y in pairs]
    queries_from = [(x, y) for x, y in (pairs if query_pairs is None else query_pairs)]
    if not queries_from:
        raise UserError("no query pairs to build prompts from")
    use_demos = kind != "zero_shot" and n_shots > 0
    # With queries drawn from `pairs` itself, one pair is always taken by the query.
    needed = n_shots + (query_pairs is None)
    if use_demos and len(pairs) < needed:
        raise UserError(
            f"{n_shots}-shot prompts need at least {needed} pairs to draw demonstrations from; there are {len(pairs)}"
        )

    # String seeds hash with SHA-512 inside `random`, independent of PYTHONHASHSEED.
    query_rng = random.Random(f"{seed}:queries")
    demo_rng = random.Random(f"{seed}:demos")
    label_rng = random.Random(f"{seed}:labels")
    order: list[Pair] = []
    prompts = []
    for _ in range(n_prompts):
        if not order:
            order = queries_from[:]
            query_rng.shuffle(order)
            order.reverse()  # pop() from the end walks the shuffled order front to back
        x, y = order.pop()
        demos: list[Pair] = []
        if use_demos:
            candidates = [p for p in pairs if p[0] != x]
            if len(candidates) < n_shots:
                raise UserError(
                    f"query {x!r}: only {len(candidates)} pairs have a different input, {n_shots} demonstrations needed"
                )
            demos = demo_rng.sample(candidates, n_shots)
            if kind == "shuffled":
                original = [dy for _, dy in demos]
                labels = original[:]
                # Redraw an identity permutation (likely at few shots): a corrupted prompt must differ.
                while True:
                    label_rng.shuffle(labels)
                    if labels != original or len(set(original)) < 2:
                        break
                demos = [(dx, label) for (dx, _), label in zip(demos, labels)]
        prompts.append(ICLPrompt(template.render(demos, x), x, y, demos, kind))
    return prompts


def answer_first_token(tokenizer, answer: str, template: PromptTemplate | None = None) -> int | None:
    """Id of the first token of `answer` as the model sees it right after a query, or None if unusable.

    Encoding the answer alone would get the leading space wrong (BPE folds it into the word, SentencePiece
    adds its own), so encode query+answer and the query alone and take the first token where they differ.
    None when that token decodes to whitespace only: it says nothing about which answer is meant.
    """
    template = template or PromptTemplate()
    context = template.query_text("x")
    full = tokenizer.encode(context + template.answer_text(answer), add_special_tokens=False)
    ctx = tokenizer.encode(context, add_special_tokens=False)
    for i, token in enumerate(full):
        if i >= len(ctx) or token != ctx[i]:
            return token if tokenizer.decode([token]).strip() else None
    return None


def resolve_answers(
    tokenizer, pairs: Sequence[Pair], template: PromptTemplate | None = None
) -> tuple[list[Pair], list[int], list[tuple[Pair, str]]]:
    """(kept pairs, their answer first-token ids, [(dropped pair, reason)]); callers must report the drops."""
    kept, ids, problems = [], [], []
    for x, y in pairs:
        pair = (x, y)
        token = answer_first_token(tokenizer, pair[1], template)
        if token is None:
            problems.append((pair, f"the first token of {pair[1]!r} after the query is whitespace or empty"))
        else:
            kept.append(pair)
            ids.append(token)
    return kept, ids, problems
