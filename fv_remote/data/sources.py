"""Public relation collections as labelled bank sources: SemEval-2012 Task 2, BATS and Todd et al.'s tasks.

Each relation becomes a `RelationTask` named `SOURCE:ID` whose `labels` record where it came from:
`source` (semeval2012, bats, todd), `class` (SemEval's 10 classes, BATS's 4 families, Todd's folder) and
`subcategory` (SemEval's 79 subcategories, BATS's 40 relations, Todd's task names). `fv-remote bank build` copies
the labels into every bank entry, so `bank map` can compare the bank's geometry with the sources' own classes.

Relations a source offers but that cannot make a bank vector are returned as `Unusable` rows (name, pairs, why),
for the build to report; nothing is dropped silently. The files are read where they are: nothing is copied.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from fv_remote.data.formats import RelationTask, read_bats_pairs, read_semeval2012, read_todd_json
from fv_remote.core.errors import UserError, did_you_mean

SOURCES = ("semeval2012", "bats", "todd")
# Todd et al.'s folder also holds sentence-level tasks (news topics, sentiment, QA): not relations between words.
MAX_MEDIAN_INPUT_WORDS = 4


@dataclass
class Unusable:
    name: str
    source: str
    n_pairs: int
    reason: str

    def as_json(self) -> dict:
        return {"name": self.name, "source": self.source, "n_pairs": self.n_pairs, "reason": self.reason}


@dataclass
class Collection:
    tasks: list[RelationTask] = field(default_factory=list)
    unusable: list[Unusable] = field(default_factory=list)

    def extend(self, other: "Collection") -> "Collection":
        self.tasks += other.tasks
        self.unusable += other.unusable
        return self


def _labelled(task: RelationTask, source: str, name: str, cls: str, sub: str) -> RelationTask:
    task.labels = {"source": source, "class": cls, "subcategory": sub, "source_file": task.source}
    task.name = f"{source}:{name}"
    return task


def semeval_relations(root: str | Path, min_score: float = 0.0) -> Collection:
    """SemEval-2012's 79 subcategories: paradigm pairs plus the gold-rated pairs scored above `min_score`."""
    tasks = read_semeval2012(root, min_score=min_score)
    out = Collection()
    for sid, task in tasks.items():
        sub = f"{sid} {task.description.split(':', 1)[0].strip()}"
        out.tasks.append(_labelled(task, "semeval2012", sid, task.category, sub))
    return out


def bats_relations(path: str | Path) -> Collection:
    """BATS's 40 relations (pairs_by_relation.json), classed by their family (the section letter)."""
    path = Path(path)
    if path.is_dir():
        path = path / "pairs_by_relation.json"
    out = Collection()
    for rel, task in read_bats_pairs(path).items():
        out.tasks.append(_labelled(task, "bats", rel, task.category, rel))
    return out


def todd_relations(folder: str | Path) -> Collection:
    """Todd et al.'s task files in `folder`; sentence-level tasks are reported as unusable, not built."""
    folder = Path(folder)
    files = sorted(folder.glob("*.json"))
    if not folder.is_dir() or not files:
        raise UserError(f"{folder}: no Todd et al. task files (*.json) here")
    out = Collection()
    for path in files:
        task = read_todd_json(path)
        words = statistics.median(len(x.split()) for x, _ in task.pairs)
        if words > MAX_MEDIAN_INPUT_WORDS:
            out.unusable.append(Unusable(f"todd:{task.name}", "todd", len(task), f"not a word relation: inputs have "
                                         f"{words:g} words (median; at most {MAX_MEDIAN_INPUT_WORDS})"))
            continue
        out.tasks.append(_labelled(task, "todd", task.name, folder.name, task.name))
    return out


def public_collection(semeval: str | Path | None = None, bats: str | Path | None = None,
                      todd: str | Path | None = None) -> Collection:
    """The given sources in a fixed order (SemEval, Todd, BATS), as one labelled collection."""
    if semeval is None and bats is None and todd is None:
        raise UserError("no public sources given: pass --semeval, --todd and/or --bats (or --preset public "
                        "--data-root DIR)")
    out = Collection()
    if semeval is not None:
        out.extend(semeval_relations(semeval))
    if todd is not None:
        out.extend(todd_relations(todd))
    if bats is not None:
        out.extend(bats_relations(bats))
    return out


def pick(collection: Collection, names: list[str]) -> Collection:
    """Only the named relations (`SOURCE:ID`, e.g. semeval2012:1a, todd:antonym), in the sources' order; an unknown
    name is a UserError with the nearest names (a small bank from public sources without building all of them)."""
    known = [t.name for t in collection.tasks] + [u.name for u in collection.unusable]
    missing = [n for n in names if n not in known]
    if missing:
        raise UserError(f"--tasks: no relation {missing[0]!r} in the given sources{did_you_mean(missing[0], known)}; "
                        f"public relations are named SOURCE:ID, e.g. {', '.join(known[:3])}")
    chosen = set(names)
    return Collection([t for t in collection.tasks if t.name in chosen],
                      [u for u in collection.unusable if u.name in chosen])


def preset_paths(name: str, root: str | Path) -> dict[str, Path]:
    """`--preset public`: the three sources in a folder laid out as ../shared/data (never copied)."""
    if name != "public":
        raise UserError(f"unknown preset {name!r}; the one preset is 'public'")
    root = Path(root)
    paths = {"semeval": root / "semeval2012_task2", "todd": root / "todd_fv" / "abstractive",
             "bats": root / "bats" / "pairs_by_relation.json"}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise UserError(f"--preset public expects {root} to hold semeval2012_task2/, todd_fv/abstractive/ and "
                        f"bats/pairs_by_relation.json; missing: {', '.join(missing)}")
    return paths
