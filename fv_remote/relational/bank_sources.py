"""Build one bank from labelled public sources (`fv_remote.data.sources`), with a build report.

The report (JSON next to the bank, `BANK.build.json`) says per source how many relations were offered, built and
unusable (each unusable one with its number of pairs and why), and the seconds spent training each built
relation; a resumed build keeps the times already recorded.

SemEval-2012's subcategories have 18-29 pairs, fewer than the 20 training pairs other relations get after the
70/15/15 split, so each relation trains on min(--n-train, its training split) pairs, and one whose training split
is under `min_train` is reported unusable.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fv_remote.relational.bank import RelationBank
from fv_remote.relational.bank_build import build_bank
from fv_remote.core.checks import write_output
from fv_remote.data.sources import Collection, Unusable
from fv_remote.core.errors import UserError
from fv_remote.core.progress import Progress
from fv_remote.relational.ffv import FinetuneSettings
from fv_remote.models.loading import LoadedModel
from fv_remote.data.tasks import prepare_task


def report_path(bank_path: str | Path) -> Path:
    bank_path = Path(bank_path)
    return bank_path.with_name(bank_path.name.replace(".safetensors", "") + ".build.json")


def plan_train_sizes(tokenizer, collection: Collection, n_train: int, min_train: int,
                     seed: int = 0) -> dict[str, int]:
    """Per task: the training pairs it gets; tasks below `min_train` move to `collection.unusable`."""
    sizes, keep = {}, []
    for task in collection.tasks:
        try:
            prepared = prepare_task(tokenizer, task, seed=seed, min_pairs=2)
            have = len(prepared.splits.train)
        except UserError:
            have, prepared = 0, None
        if have < min_train:
            usable = 0 if prepared is None else sum(len(s) for s in (prepared.splits.train, prepared.splits.valid,
                                                                     prepared.splits.test))
            collection.unusable.append(Unusable(
                task.name, task.labels.get("source", ""), len(task),
                f"{usable} of {len(task)} pairs have a usable first answer token: {have} training pairs after the "
                f"70/15/15 split, fewer than {min_train}"))
            continue
        sizes[task.name] = min(n_train, have)
        keep.append(task)
    collection.tasks = keep
    return sizes


def build_from_sources(model: LoadedModel, collection: Collection, path: str | Path, layer: int, n_train: int = 20,
                       min_train: int = 10, n_valid: int = 20, settings: FinetuneSettings | None = None,
                       seed: int = 0, resume: bool = True, on_task: Callable[[str, str], None] | None = None,
                       progress: Progress | None = None) -> tuple[RelationBank, dict[str, Any]]:
    """Train every usable relation of `collection` into the bank at `path`; returns the bank and the report."""
    path = Path(path)
    sizes = plan_train_sizes(model.tokenizer, collection, n_train, min_train, seed)
    old = _read_report(report_path(path)) if resume else {}
    seconds: dict[str, float] = dict(old.get("train_s", {}))
    skipped: dict[str, str] = {}
    total = len(collection.tasks)
    done = 0
    clock = [time.monotonic()]

    def track(name: str, status: str) -> None:
        now = time.monotonic()
        if status == "done":
            seconds[name] = round(now - clock[0], 2)
        elif status.startswith("skipped"):
            skipped[name] = status.removeprefix("skipped: ")
        clock[0] = now
        if on_task:
            on_task(name, status)

    started = time.monotonic()
    bank = RelationBank.load(path, require=False) if resume and path.exists() else None
    groups: list[tuple[int, list]] = []  # runs of consecutive tasks with one training size, in source order
    for task in collection.tasks:
        if groups and groups[-1][0] == sizes[task.name]:
            groups[-1][1].append(task)
        else:
            groups.append((sizes[task.name], [task]))
    for size, tasks in groups:
        offset = done

        def step(i: int, n: int, offset: int = offset) -> None:
            if progress:
                progress(offset + i, total)

        clock[0] = time.monotonic()
        bank = build_bank(model, tasks, path, layer=layer, n_train=size, n_valid=n_valid, settings=settings,
                          seed=seed, resume=resume or bank is not None, on_task=track, progress=step)
        done += len(tasks)
    if bank is None:
        raise UserError("no usable relations in the given sources")
    bank.settings.update({"n_train": n_train, "min_train": min_train, "n_train_per_relation": "min(n_train, "
                          "training split)", "sources": sorted({t.labels.get("source", "") for t in collection.tasks})})
    bank.save(path)
    report = _report(bank, collection, skipped, seconds, time.monotonic() - started, old)
    write_output(report_path(path), json.dumps(report, indent=1))
    return bank, report


def _read_report(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def _report(bank: RelationBank, collection: Collection, skipped: dict[str, str], seconds: dict[str, float],
            wall: float, old: dict) -> dict[str, Any]:
    in_bank = {e.name: e for e in bank.entries}
    per: dict[str, dict[str, Any]] = {}
    for task in collection.tasks:
        src = task.labels.get("source", "")
        row = per.setdefault(src, {"offered": 0, "built": 0, "unusable": 0, "train_s": 0.0})
        row["offered"] += 1
        if task.name in in_bank:
            row["built"] += 1
            row["train_s"] = round(row["train_s"] + seconds.get(task.name, 0.0), 1)
    unusable = [u.as_json() for u in collection.unusable]
    unusable += [{"name": n, "source": n.split(":", 1)[0], "n_pairs": None, "reason": why}
                 for n, why in skipped.items()]
    for u in unusable:
        row = per.setdefault(u["source"], {"offered": 0, "built": 0, "unusable": 0, "train_s": 0.0})
        row["unusable"] += 1
        if u["name"] not in skipped:
            row["offered"] += 1
    return {"bank": len(bank), "per_source": per, "unusable": unusable, "train_s": seconds,
            "train_s_total": round(sum(seconds.values()), 1),
            "wall_s_this_run": round(wall, 1), "wall_s_runs": [*old.get("wall_s_runs", []), round(wall, 1)]}


def select_sources(bank: RelationBank, sources: list[str], path: str | Path = "BANK") -> RelationBank:
    """The bank's entries whose `source` label is one of `sources` (same order), e.g. to leave out the relations
    a test set was drawn from."""
    have = sorted({str(e.meta.get("source", "")) for e in bank.entries})
    unknown = [x for x in sources if x not in have]
    if unknown:
        raise UserError(f"{path} has no entries from source(s) {', '.join(unknown)}; its sources: {', '.join(have)}")
    picked = [e for e in bank.entries if e.meta.get("source") in sources]
    return RelationBank(bank.model, picked, dict(bank.settings, selected_sources=list(sources)))
