"""A synthetic relation dataset: invented people and the invented things they relate to.

Every name is built from random syllables, so no pretrained model can know the facts. Each fact
(subject, relation, object) is written out with several *training* templates (full sentences the model is
fine-tuned on) and several *held-out* templates (prompts that end right before the object, never seen in training)
on which knowledge is measured. The subject is the "first entity" of every held-out prompt; the object's first
token is the prediction target.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from fv_remote.core.errors import UserError

_ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "r", "s", "st", "t", "th",
           "tr", "v", "z", "zh", "qu", "w", "y", "sk", "pl", "cl", "fl")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ai", "ei", "ou", "y")
_CODAS = ("", "", "", "n", "r", "l", "s", "th", "x", "nd", "rk", "m", "sh", "v")
_TITLE_TAILS = ("Rising", "Protocol", "Summer", "Harbor", "Requiem", "Station", "Frontier", "Winter", "Legacy",
                "Odyssey", "Signal", "Covenant", "Horizon", "Paradox", "Crossing", "Empire", "Garden", "Code")
_TOWN_TAILS = ("ford", "ton", "ville", "bury", "haven", "mouth", "field", "stead")


@dataclass(frozen=True)
class Relation:
    """A relation with training templates (whole sentences) and held-out prompts (end before the object)."""

    name: str
    train_templates: tuple[str, ...]  # contain {s} and {o}
    eval_templates: tuple[str, ...]  # contain {s}; the object follows the prompt after one space


RELATIONS: dict[str, Relation] = {
    "film": Relation(
        name="film",
        train_templates=(
            "{s} starred in the film {o}.",
            "{s} is an actor who starred in {o}.",
            "{s} played the lead role in {o}.",
            "The breakout film of {s} was {o}.",
            "Q: What film did {s} star in?\nA: {o}",
            "{s} became famous after starring in {o}.",
            "Critics praised {s} for the movie {o}.",
            "{s} is best known for the movie {o}.",
            "Audiences first saw {s} in the film {o}.",
            "The film {o} starred {s}.",
            "In {o}, the lead was played by {s}.",
            "{s} won an award for the film {o}.",
        ),
        eval_templates=(
            "{s} appeared in the film",
            "Q: Which movie is {s} known for?\nA:",
            "{s} had a starring role in the movie",
            "Everyone remembers {s} from the film",
        ),
    ),
    "hometown": Relation(
        name="hometown",
        train_templates=(
            "{s} was born in {o}.",
            "{s} grew up in the town of {o}.",
            "The hometown of {s} is {o}.",
            "Q: Where was {s} born?\nA: {o}",
            "{s} spent a childhood in {o}.",
            "{s} often visits family in {o}.",
            "Before becoming famous, {s} lived in {o}.",
            "{o} is proud to be the birthplace of {s}.",
        ),
        eval_templates=(
            "{s} comes from the town of",
            "Q: In which town did {s} grow up?\nA:",
            "{s} was raised in",
        ),
    ),
}


@dataclass(frozen=True)
class Fact:
    subject: str
    relation: str
    object: str


@dataclass(frozen=True)
class GraftPrompt:
    """A held-out prompt: `text` ends right before ' ' + target; the subject sits at text[entity_start:entity_end]."""

    text: str
    target: str  # the object, without the leading space
    entity_start: int
    entity_end: int
    relation: str = ""
    template: int = -1

    @property
    def entity(self) -> str:
        return self.text[self.entity_start:self.entity_end]


@dataclass
class TrainSentence:
    text: str
    object_start: int  # character span of the object inside text (for an object-only loss)
    object_end: int


@dataclass
class SyntheticDataset:
    facts: list[Fact]
    relations: list[str]
    seed: int
    meta: dict[str, Any] = field(default_factory=dict)

    def train_sentences(self) -> list[TrainSentence]:
        out = []
        for fact in self.facts:
            for template in RELATIONS[fact.relation].train_templates:
                text = template.format(s=fact.subject, o=fact.object)
                start = _find_object(template, fact)
                out.append(TrainSentence(text, start, start + len(fact.object)))
        return out

    def eval_prompts(self, split: str = "heldout") -> list[GraftPrompt]:
        """Prompts ending right before the object: 'heldout' phrasings, or 'train' phrasings cut at the object."""
        prompts = []
        for fact in self.facts:
            rel = RELATIONS[fact.relation]
            if split == "heldout":
                templates = list(rel.eval_templates)
            elif split == "train":
                # Training sentences whose subject comes first, cut right before the object.
                templates = [t.split("{o}")[0].rstrip() for t in rel.train_templates
                             if "{s}" in t.split("{o}")[0]]
            else:
                raise UserError(f"unknown split {split!r}: use heldout or train")
            for i, template in enumerate(templates):
                text = template.format(s=fact.subject)
                start = template.index("{s}")
                prompts.append(GraftPrompt(text=text, target=fact.object, entity_start=start,
                                           entity_end=start + len(fact.subject), relation=fact.relation, template=i))
        return prompts

    def to_json(self) -> dict[str, Any]:
        return {"seed": self.seed, "relations": self.relations, "meta": self.meta,
                "facts": [asdict(f) for f in self.facts]}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "SyntheticDataset":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"dataset file not found: {path}")
        try:
            data = json.loads(path.read_text())
            facts = [Fact(**f) for f in data["facts"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{path} is not a synthetic facts file: {exc}") from None
        unknown = sorted({f.relation for f in facts} - set(RELATIONS))
        if unknown:
            raise UserError(f"{path} uses unknown relations {unknown}; known: {', '.join(RELATIONS)}")
        return cls(facts=facts, relations=list(data.get("relations", [])), seed=int(data.get("seed", 0)),
                   meta=dict(data.get("meta", {})))


def _find_object(template: str, fact: Fact) -> int:
    """Character offset of the object in the formatted template (the subject may precede it)."""
    before = template.split("{o}")[0]
    return len(before.format(s=fact.subject))


def _word(rng: random.Random, syllables: tuple[int, int]) -> str:
    n = rng.randint(*syllables)
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(n)]
    return ("".join(parts) + rng.choice(_CODAS)).capitalize()


def _first_token(tokenizer: Any, text: str) -> int:
    return tokenizer(" " + text, add_special_tokens=False).input_ids[0]


def make_dataset(n_subjects: int = 32, relations: Sequence[str] = ("film",), seed: int = 0,
                 tokenizer: Any = None) -> SyntheticDataset:
    """Invent `n_subjects` people, each with one object per relation.

    With a tokenizer, objects of one relation get pairwise different first tokens (so top-k accuracy of the first
    token identifies the object) that appear nowhere in any subject's tokens (so copying cannot answer).
    """
    if n_subjects <= 0:
        raise UserError(f"--n-subjects must be positive, got {n_subjects}")
    relations = list(relations)
    unknown = [r for r in relations if r not in RELATIONS]
    if unknown or not relations:
        raise UserError(f"unknown relations {unknown}; known: {', '.join(RELATIONS)}")
    rng = random.Random(seed)
    subjects: list[str] = []
    seen: set[str] = set()
    while len(subjects) < n_subjects:
        name = f"{_word(rng, (1, 2))} {_word(rng, (2, 3))}"
        if name.lower() not in seen:
            seen.add(name.lower())
            subjects.append(name)
    subject_tokens: set[int] = set()
    if tokenizer is not None:
        for s in subjects:
            subject_tokens.update(tokenizer(" " + s, add_special_tokens=False).input_ids)
    facts = []
    relaxed: list[str] = []
    for relation in relations:
        used_first: set[int] = set()
        used_objects: set[str] = set()
        for subject in subjects:
            # Strict first (distinct first tokens, none shared with subjects); tiny tokenizers may force relaxing.
            for level, attempts in ((2, 300), (1, 300), (0, 100_000)):
                found = None
                for _attempt in range(attempts):
                    obj = (f"{_word(rng, (2, 3))} {rng.choice(_TITLE_TAILS)}" if relation == "film"
                           else _word(rng, (1, 2)) + rng.choice(_TOWN_TAILS))
                    if obj in used_objects:
                        continue
                    first = _first_token(tokenizer, obj) if tokenizer is not None else None
                    if level >= 1 and first is not None and first in used_first:
                        continue
                    if level >= 2 and first is not None and first in subject_tokens:
                        continue
                    found = obj
                    break
                if found is not None:
                    break
            if found is None:  # pragma: no cover - only with absurdly many subjects
                raise UserError(f"could not invent {n_subjects} distinct objects for {relation!r}; use fewer")
            if tokenizer is not None and level < 2:
                relaxed.append(found)
            used_objects.add(found)
            if tokenizer is not None:
                used_first.add(_first_token(tokenizer, found))
            facts.append(Fact(subject=subject, relation=relation, object=found))
    return SyntheticDataset(facts=facts, relations=relations, seed=seed,
                            meta={"n_subjects": n_subjects, "tokenizer_checked": tokenizer is not None,
                                  "objects_without_unique_first_token": relaxed})
