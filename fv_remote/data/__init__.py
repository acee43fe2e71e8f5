"""Relation datasets: the bundled tasks, readers for public formats, and in-context prompts."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fv_remote.data.formats import (MCAnalogy, RelationTask, read_analogy_csv, read_bats_pairs, read_mc_analogies,
                                    read_relation_json, read_semeval2012, read_semeval2012_ratings, read_task_json,
                                    read_todd_json)
from fv_remote.data.prompts import (PROMPT_KINDS, ICLPrompt, PromptTemplate, Splits, answer_first_token, build_prompts,
                                    resolve_answers, split_pairs)
from fv_remote.core.errors import UserError, did_you_mean

__all__ = ["RelationTask", "MCAnalogy", "list_tasks", "load_task", "read_relation_json", "read_todd_json",
           "read_task_json", "read_bats_pairs", "read_semeval2012", "read_semeval2012_ratings", "read_mc_analogies",
           "read_analogy_csv", "PromptTemplate", "Splits", "ICLPrompt", "PROMPT_KINDS", "split_pairs", "build_prompts",
           "answer_first_token", "resolve_answers"]


def _bundled():
    return resources.files(__name__).joinpath("relations")


def list_tasks() -> list[str]:
    """Names of the bundled tasks, sorted."""
    folder = _bundled()
    if not folder.is_dir():
        return []
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def load_task(name_or_path: str | Path, data_dir: str | Path | None = None) -> RelationTask:
    """A task by bundled name, by name inside `data_dir` (DATA_DIR/NAME.json or DATA_DIR/*/NAME.json, e.g. Todd
    et al.'s abstractive/ and extractive/ folders), or from a .json file in either JSON format."""
    text = str(name_or_path)
    if data_dir is not None and not Path(text).is_file():
        return _from_data_dir(text, Path(data_dir))
    if text.endswith(".json") or Path(text).is_file():
        return read_task_json(text)  # a missing file becomes a UserError there
    names = list_tasks()
    if text in names:
        with resources.as_file(_bundled().joinpath(f"{text}.json")) as path:
            task = read_relation_json(path)
        task.source = f"bundled:{text}"
        return task
    raise UserError(
        f"unknown task {text!r}{did_you_mean(text, names)}; see `fv-remote data list` for the bundled tasks, "
        "or give a path to a .json file, or --data-dir with a folder of NAME.json files"
    )


def _from_data_dir(name: str, data_dir: Path) -> RelationTask:
    if not data_dir.is_dir():
        raise UserError(f"data dir {data_dir} is not a folder")
    stem = name[: -len(".json")] if name.endswith(".json") else name
    files = sorted(data_dir.glob("*.json")) + sorted(data_dir.glob("*/*.json"))
    for path in files:
        if path.stem == stem:
            return read_task_json(path)
    available = sorted({p.stem for p in files})
    hint = "; it has no .json files"
    if available:
        hint = f"; it has {len(available)} tasks, e.g. {', '.join(available[:5])}"
    raise UserError(f"no task {stem!r} in {data_dir}{did_you_mean(stem, available)}{hint}")
