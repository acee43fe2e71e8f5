"""A relation task made ready for one model: usable pairs, their first answer tokens, and the seeded splits."""

from __future__ import annotations

from dataclasses import dataclass, field

from fv_remote.data import ICLPrompt, PromptTemplate, RelationTask, Splits, build_prompts, resolve_answers, split_pairs
from fv_remote.errors import UserError


@dataclass
class PreparedTask:
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
        return build_prompts(self.splits.train, n, n_shots=n_shots, kind=kind, seed=self.seed + seed_offset,
                             template=self.template, query_pairs=queries)

    def ids(self, prompts: list[ICLPrompt]) -> list[int]:
        return [self.answer_token[p.answer] for p in prompts]


def prepare_task(tokenizer, task: RelationTask, seed: int = 0, template: PromptTemplate | None = None,
                 min_pairs: int = 2) -> PreparedTask:
    template = template or PromptTemplate()
    kept, ids, problems = resolve_answers(tokenizer, task.pairs, template)
    if len(kept) < min_pairs:
        raise UserError(f"task {task.name!r} has {len(kept)} pairs with a usable first answer token; "
                        f"need at least {min_pairs}")
    return PreparedTask(task, split_pairs(kept, seed=seed), {y: t for (_, y), t in zip(kept, ids)},
                        template, seed, problems)
