"""The `bank build` stage: one FFV per relation, every relation a job of one session body, added to the bank file as
each is trained (an interrupted build resumes). The file itself is `relational.bank.RelationBank`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fv_remote.core.checks import note_kept
from fv_remote.data import RelationTask
from fv_remote.core.errors import UserError
from fv_remote.execution import executor_of, run_stage
from fv_remote.execution.stage import Stage, in_process
from fv_remote.relational.ffv import FinetuneSettings
from fv_remote.models.loading import LoadedModel
from fv_remote.core.progress import Progress
from fv_remote.data.tasks import prepare_task
from fv_remote.fv.vectors import FunctionVector

from fv_remote.relational.bank import RelationBank


def build_bank(model: LoadedModel, tasks: Iterable[RelationTask], path: str | Path, layer: int | None = None,
               init: str = "zero", fv_dir: str | Path | None = None, n_train: int = 20, n_valid: int = 30,
               settings: FinetuneSettings | None = None, seed: int = 0, resume: bool = True,
               on_task: Callable[[str, str], None] | None = None,
               progress: Progress | None = None) -> RelationBank:
    """Fine-tune one FFV per task and write the bank to `path` after each (an interrupted build resumes).

    `init="fv"` starts each relation from `fv_dir/<task>.fv.safetensors` (and its layer unless `layer` is given);
    `on_task(name, status)` reports "done", "kept" (already in the bank) or "skipped: why". The training is the
    session body of `relational.ffv_session`: locally one run per relation (written as each finishes); on NDIF every
    missing relation in ONE request, the bank written once it has come back. With `NDIF(wait=False)` that request is
    submitted and `JobSubmitted` raised (nothing written); its `job` writes the bank later.
    """
    s = settings or FinetuneSettings()
    tasks = list(tasks)
    if not tasks:
        raise UserError("no relations to build a bank from")
    if init != "fv" and layer is None:
        raise UserError("give --layer: bank vectors trained from zero/random need a layer to live at")
    path = Path(path)
    bank = RelationBank.load(path, require=False) if resume and path.exists() else RelationBank(model.model_id)
    bank.check_model(model)
    bank.settings = {"init": init, "layer": layer, "n_train": n_train, "n_valid": n_valid, "seed": seed,
                     "finetune": s.as_dict()}
    todo = []
    for i, task in enumerate(tasks):
        if task.name in bank.names:
            if on_task:
                on_task(task.name, "kept")
            if progress:
                progress(i + 1, len(tasks))
            continue
        try:
            prepared, fv = _prepare_relation(model, task, init, fv_dir, n_train, seed)
        except UserError as exc:
            if on_task:
                on_task(task.name, f"skipped: {exc}")
            continue
        todo.append((i, task, prepared, fv))
    # One session body trains the relations. A session executor (NDIF, dry run) runs every relation in one request;
    # locally each relation is its own run, written to the bank as it finishes (an interrupted build resumes there).
    parts = [todo] if executor_of(model).session else [[entry] for entry in todo]
    for part in parts:
        if part:
            plan = _bank_plan(model, part, path, resume, bank, layer, init, n_train, n_valid, s, len(tasks), on_task)
            run_stage(BANK, model, plan, progress)
    return bank.require_entries(path)


@dataclass
class BankPlan:
    """Relations to fine-tune as jobs of one body, and the bank file their FFVs are added to (`entries`: each
    relation's labels, index among the build's tasks and training sizes)."""

    path: str
    model: str
    resume: bool  # add to the bank now in the file (else start an empty one)
    bank_settings: dict
    n_tasks: int
    init: str
    settings: dict  # FinetuneSettings.as_dict()
    entries: list[dict]
    n_jobs: int
    work: Any = in_process()  # ffv_session.Plan: the jobs and their data as tensors
    bank: Any = in_process()  # this build's RelationBank (a fetched job reads the file)
    on_task: Any = in_process()
    refused: Any = in_process()  # "name: why" of the relations the commit refused (set by it; `summary` lists them)


class Bank(Stage[BankPlan, RelationBank]):
    """A bank of FFVs: every relation a job of one session (`ffv_session.run_jobs`); each trained relation is added
    to the bank file (entries of the same name replaced, so writing twice is harmless)."""

    name = "bank"
    plan_type = BankPlan
    result_key = "results"

    def body(self, model: LoadedModel, plan: BankPlan) -> list[dict]:
        from fv_remote.relational.ffv_session import run_jobs

        return run_jobs(model, plan.work.datasets, plan.work.jobs) if plan.n_jobs else []

    def commit(self, plan: BankPlan, outputs: list[dict], progress: Progress | None = None) -> RelationBank:
        from fv_remote.relational.ffv_session import source_from_info, to_result

        if len(outputs) != plan.n_jobs:
            raise UserError(f"the job returned {len(outputs)} fine-tuning runs, expected {plan.n_jobs}")
        path = Path(plan.path)
        bank = plan.bank
        if bank is None:
            bank = RelationBank.load(path, require=False) if plan.resume and path.exists() else \
                RelationBank(plan.model)
            if bank.model != plan.model:
                raise UserError(f"the bank at {path} is now for model {bank.model!r}, the job trained vectors for "
                                f"{plan.model!r}; nothing written")
            bank.settings = plan.bank_settings
        s = FinetuneSettings(**plan.settings)
        plan.refused = []
        for entry, out in zip(plan.entries, outputs):
            try:
                ffv = to_result(plan.model, out, s, entry["name"], plan.init, source_from_info(entry["source_fv"]),
                                int(entry["n_train"]), int(entry["n_valid"]), int(entry["n_batches"]),
                                entry.get("trained_pairs")).ffv  # None in a job file from before the record
            except UserError as exc:  # diverged, never moved or its own start: skip the relation, keep the others
                plan.refused.append(f"{entry['name']}: skipped: {exc}")  # said, not dropped silently
                if plan.on_task:
                    plan.on_task(entry["name"], f"skipped: {exc}")
                continue
            _add(bank, path, entry, ffv, out["baseline_acc"], plan.on_task, progress, int(entry["index"]),
                 plan.n_tasks)
        return bank

    def cost(self, dims: Any, o: Any) -> tuple[Any, Any]:
        from fv_remote.plan.cost import DTYPE_BYTES
        from fv_remote.relational.ffv import finetune_cost

        layer = round(0.4 * dims.n_layers) if o.layer is None else o.layer  # `bank build`'s default

        def make(n: int) -> Any:
            return finetune_cost(dims, o.n_train, o.n_valid, o.tokens(0), o.steps, o.batch_size or 32, o.eval_every,
                                 layer, nbytes=DTYPE_BYTES[o.dtype], relations=n, baseline=True, stage="bank")
        return make(o.relations), make

    def summary(self, plan: BankPlan, result: RelationBank) -> str:
        return "\n".join([f"bank {plan.path}: {len(result)} relations for {result.model}", *(plan.refused or []),
                          f"see `fv-remote bank info {plan.path}`"])


BANK = Bank()


def _task_info(task: RelationTask) -> dict[str, Any]:
    return {"name": task.name, "category": task.category, "relation_words": list(task.relation_words),
            "source": task.source, "labels": dict(task.labels)}


def _prepare_relation(model: LoadedModel, task: RelationTask, init: str, fv_dir: str | Path | None, n_train: int,
                      seed: int) -> tuple[Any, FunctionVector | None]:
    """The task prepared for the model and, for init "fv", its FV; a UserError skips the relation."""
    prepared = prepare_task(model.tokenizer, task, seed=seed, min_pairs=n_train + 2)
    if len(prepared.splits.train) < n_train:
        raise UserError(f"{len(prepared.splits.train)} training pairs, fewer than --n-train {n_train}")
    fv = None
    if init == "fv":
        fv = FunctionVector.load(Path(fv_dir or ".") / f"{task.name}.fv.safetensors")
    return prepared, fv


def _add(bank: RelationBank, path: Path, task: dict[str, Any], ffv: FunctionVector, baseline: float | None,
         on_task: Callable[[str, str], None] | None, progress: Progress | None, i: int,
         total: int) -> None:
    """Add one trained relation (`task`: `_task_info`) and write the bank."""
    extra: dict[str, Any] = {"task": task["name"], "category": task["category"],
                             "relation_words": list(task["relation_words"]), "source": task["source"],
                             **task.get("labels", {})}  # a labelled task's source/class/subcategory
    if baseline is not None:
        extra["zero_shot_valid_acc"] = baseline
    if not torch.isfinite(ffv.vector).all():  # training diverged: a NaN entry would poison every CFV using it
        if on_task:
            on_task(task["name"], "skipped: training diverged (the vector has NaN/inf); try a smaller --lr")
        if progress:
            progress(i + 1, total)
        return
    bank.add_vector(ffv, name=task["name"], **extra)
    bank.save(path)
    note_kept(f"bank {path}", f"{len(bank)} relations in {path} (rerun the same command to resume)")
    if on_task:
        on_task(task["name"], "done")
    if progress:
        progress(i + 1, total)


def _bank_plan(model: LoadedModel, todo: list, path: Path, resume: bool, bank: RelationBank, layer: int | None,
               init: str, n_train: int, n_valid: int, s: FinetuneSettings, n_tasks: int,
               on_task: Callable[[str, str], None] | None) -> BankPlan:
    """Every relation of `todo` as one job of one stage body; relations whose plan fails are skipped (reported)."""
    from fv_remote.relational.ffv import examples, initial_plan
    from fv_remote.relational.ffv_session import SCORE_BATCH, Plan, source_info
    from fv_remote.relational.overlap import examples_record

    plan = Plan(model)
    entries = []
    for index, task, prepared, fv in todo:
        try:
            at = model.adapter.check_layer(fv.layer if layer is None else layer)
            train = examples(prepared, "train", n_train)
            valid = examples(prepared, "valid", n_valid) if n_valid and prepared.splits.valid else None
            vector, scale_texts = initial_plan(model, init, fv, train.texts, s.seed)
        except UserError as exc:
            if on_task:
                on_task(task.name, f"skipped: {exc}")
            continue
        train_i = plan.data(train, s.batch_size, s.seed, s.fast)
        valid_i = plan.data(valid, s.batch_size, s.seed, s.fast)
        base_i = plan.data(valid, SCORE_BATCH, fast=False, shuffle=False)  # `ffv.score`'s batches
        plan.job(s, train_i, valid_i, at, vector, scale_texts, baseline=base_i)
        entries.append({**_task_info(task), "index": index, "source_fv": source_info(fv), "n_train": len(train),
                        "n_valid": len(valid) if valid is not None else 0,
                        "n_batches": len(plan.datasets[train_i]) if train_i is not None else 0,
                        "trained_pairs": examples_record(train, valid)})
    return BankPlan(str(path), model.model_id, resume, bank.settings, n_tasks, init, s.as_dict(), entries,
                    len(plan.jobs), plan, bank, on_task)
