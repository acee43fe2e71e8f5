"""A relation task made ready for one model: usable pairs, their first answer tokens, and the seeded splits."""

from __future__ import annotations

from dataclasses import dataclass, field

from fv_remote.data import ICLPrompt, PromptTemplate, RelationTask, Splits, build_prompts, resolve_answers, split_pairs
from fv_remote.core.errors import UserError

# Prompts per split and run: beyond this a count is a typo, not an experiment (each prompt costs a forward pass).
MAX_PROMPTS = 100_000


@dataclass
class PreparedTask:
    """A task prepared for one tokenizer (`prepare_task`): usable pairs, their answer tokens, seeded splits and a
    prompt factory."""

    task: RelationTask
    splits: Splits
    answer_token: dict[str, int]  # answer string -> id of its first token after the query
    template: PromptTemplate
    seed: int
    problems: list = field(default_factory=list)  # (pair, reason): pairs left out, for the caller to report

    @property
    def name(self) -> str:
        return self.task.name

    def prompts(self, split: str, n: int, kind: str, n_shots: int = 10, seed_offset: int = 0) -> list[ICLPrompt]:
        """Prompts whose queries come from `split`; demonstrations always come from the training split."""
        queries = getattr(self.splits, split)
        if not queries:
            raise UserError(f"task {self.name!r} has no {split} pairs")
        if n > MAX_PROMPTS:
            raise UserError(f"{n} prompts asked of task {self.name!r}, which has {len(queries)} {split} queries; "
                            f"at most {MAX_PROMPTS} prompts per run (ask for fewer)")
        return build_prompts(self.splits.train, n, n_shots=n_shots, kind=kind, seed=self.seed + seed_offset,
                             template=self.template, query_pairs=queries)

    def count_note(self, flag: str, n: int, split: str = "train") -> str | None:
        """A line to show when `n` prompts are more than the split's distinct queries (they repeat)."""
        have = len(getattr(self.splits, split))
        if have and n > have:
            return (f"{flag} {n} is more than the {have} {split} queries of {self.name!r}: queries repeat (each "
                    f"with other demonstrations); {have} distinct queries will be used")
        return None

    def ids(self, prompts: list[ICLPrompt]) -> list[int]:
        return [self.answer_token[p.answer] for p in prompts]


def prepare_task(tokenizer, task: RelationTask, seed: int = 0, template: PromptTemplate | None = None,
                 min_pairs: int = 2) -> PreparedTask:
    """The pairs whose answer has a usable first token under `tokenizer`, split by `seed`; refused with fewer than
    `min_pairs` (the left-out pairs are in `problems`)."""
    template = template or PromptTemplate()
    kept, ids, problems = resolve_answers(tokenizer, task.pairs, template)
    if len(kept) < min_pairs:
        raise UserError(f"task {task.name!r} has {len(kept)} pairs with a usable first answer token; "
                        f"need at least {min_pairs}")
    return PreparedTask(task, split_pairs(kept, seed=seed), {y: t for (_, y), t in zip(kept, ids)},
                        template, seed, problems)
