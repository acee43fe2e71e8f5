"""A relation bank: fine-tuned function vectors for many relations in one safetensors file.

File layout: tensors `vectors` [N, d_model] (float32) and `layers` [N] (int64); metadata `format`
("fv-remote-bank"), `model`, `names` (JSON list), `entries` (JSON list of per-relation dicts: task, category,
relation_words, layer, init, n_train, n_valid, valid_acc, ...), `settings` (JSON) and `library_version`.

Vectors may sit at different layers (e.g. a bank merged from FFVs fine-tuned at each FV's own layer);
`fv-remote bank build` trains every relation at one common layer by default, so that composite vectors are
genuine single vectors and cosines between bank vectors compare like with like.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from fv_remote.core.version import __version__
from fv_remote.core.checks import note_kept
from fv_remote.data import RelationTask
from fv_remote.core.errors import UserError, did_you_mean
from fv_remote.execution import executor_of, run_stage
from fv_remote.execution.stage import Stage, in_process
from fv_remote.relational.ffv import FinetuneSettings
from fv_remote.models.loading import LoadedModel
from fv_remote.core.progress import Progress
from fv_remote.data.tasks import prepare_task
from fv_remote.fv.vectors import FunctionVector

FORMAT = "fv-remote-bank"
BUILD_HINT = "fv-remote bank build --out {path}"


@dataclass
class BankEntry:
    name: str
    vector: torch.Tensor  # [d_model]
    layer: int
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class RelationBank:
    """FFVs of one model, one entry per relation, in one safetensors file (`save`/`load`; `build_bank` fills it)."""

    model: str
    entries: list[BankEntry] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    @property
    def vectors(self) -> torch.Tensor:
        if not self.entries:
            return torch.empty(0)
        return torch.stack([e.vector.float() for e in self.entries])

    @property
    def layers(self) -> list[int]:
        return [e.layer for e in self.entries]

    def get(self, name: str) -> BankEntry:
        for entry in self.entries:
            if entry.name == name:
                return entry
        raise UserError(f"no relation {name!r} in the bank{did_you_mean(name, self.names)}; "
                        f"it has {len(self)}: {', '.join(self.names[:8])}{', ...' if len(self) > 8 else ''}")

    def add(self, entry: BankEntry) -> None:
        """Add or replace (same name) an entry."""
        self.entries = [e for e in self.entries if e.name != entry.name] + [entry]

    def add_vector(self, fv: FunctionVector, name: str | None = None, **meta: Any) -> None:
        if fv.model != self.model:
            raise UserError(f"vector for model {fv.model!r} cannot join a bank for {self.model!r}")
        info = {"kind": fv.kind, **{k: v for k, v in fv.meta.items() if k in ("init", "n_train", "n_valid",
                                                                             "best_valid_acc", "best_valid_loss",
                                                                             "best_step")}, **meta}
        self.add(BankEntry(name or fv.task, fv.vector.detach().float().clone(), int(fv.layer), info))

    def function_vector(self, name: str) -> FunctionVector:
        """One entry as an FFV (steer with it, evaluate it, decode it)."""
        entry = self.get(name)
        return FunctionVector(vector=entry.vector, model=self.model, task=entry.name, layer=entry.layer,
                              kind="ffv", meta=dict(entry.meta))

    def check_model(self, model: LoadedModel) -> None:
        d = self.vectors.shape[-1] if self.entries else model.adapter.d_model
        if self.model != model.model_id or d != model.adapter.d_model:
            raise UserError(f"this bank was built for model {self.model!r} (d_model {d}), not {model.model_id!r} "
                            f"(d_model {model.adapter.d_model}); build one for it with "
                            f"`fv-remote bank build --model {model.name} --out BANK.safetensors`")
        for entry in self.entries:
            model.adapter.check_layer(entry.layer)

    def require_entries(self, path: str | Path = "BANK.safetensors") -> "RelationBank":
        if not self.entries:
            raise UserError(f"the relation bank {path} is empty; build one with `{BUILD_HINT.format(path=path)}`")
        return self

    def save(self, path: str | Path) -> Path:
        if self.entries:
            tensors = {"vectors": self.vectors.contiguous(),
                       "layers": torch.tensor(self.layers, dtype=torch.int64)}
        else:
            tensors = {"vectors": torch.zeros(0, 1), "layers": torch.zeros(0, dtype=torch.int64)}
        metadata = {"format": FORMAT, "model": self.model, "names": json.dumps(self.names),
                    "entries": json.dumps([e.meta for e in self.entries], default=str),
                    "settings": json.dumps(self.settings, default=str), "library_version": __version__}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=metadata)
        return tmp.replace(path)  # a crash mid-write never leaves a half-written bank; `_add` notes it as kept

    @classmethod
    def load(cls, path: str | Path, require: bool = True) -> "RelationBank":
        """Read a bank; `require` refuses a missing or empty one with the command that builds it."""
        from fv_remote.core.checks import read_safetensors

        path = Path(path)
        if not path.exists():
            raise UserError(f"no relation bank at {path}; build one with `{BUILD_HINT.format(path=path)}`")
        tensors, metadata = read_safetensors(path, "relation-bank")
        if metadata.get("format") != FORMAT or "vectors" not in tensors:
            from fv_remote.core.kinds import wrong_kind

            raise wrong_kind(path, "a relation bank", "add a single vector to a bank with `fv-remote bank build`"
                             if "vector" in tensors else "")
        try:
            names = json.loads(metadata.get("names", "[]"))
            metas = json.loads(metadata.get("entries", "[]"))
            settings = json.loads(metadata.get("settings", "{}"))
            vectors, layers = tensors["vectors"], tensors["layers"].tolist()
            if not isinstance(names, list) or vectors.ndim != 2 or len(layers) != vectors.shape[0] or \
                    (names and len(names) != vectors.shape[0]) or not isinstance(metas, list):
                raise ValueError("names, vectors and layers do not match")
            entries = [BankEntry(str(n), vectors[i], int(layers[i]), metas[i] if i < len(metas) else {})
                       for i, n in enumerate(names)]
            bank = cls(str(metadata["model"]), entries, settings if isinstance(settings, dict) else {})
        except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as exc:
            raise UserError(f"{path} is a damaged relation bank ({type(exc).__name__}: {exc})") from None
        for entry in entries:
            if not torch.isfinite(entry.vector).all():
                raise UserError(f"{path}: the vector of relation {entry.name!r} has NaN/inf values; rebuild it "
                                f"(`{BUILD_HINT.format(path=path)}` after removing the file)")
        return bank.require_entries(path) if require else bank


def info(bank: RelationBank) -> dict[str, Any]:
    """A summary for `fv-remote bank info --json`."""
    rows = []
    for e in bank.entries:
        rows.append({"name": e.name, "layer": e.layer, "norm": round(float(e.vector.norm()), 4),
                     "category": e.meta.get("category", ""), "n_train": e.meta.get("n_train"),
                     "valid_acc": e.meta.get("best_valid_acc"),
                     "zero_shot_valid_acc": e.meta.get("zero_shot_valid_acc"),
                     "init": e.meta.get("init"), "relation_words": e.meta.get("relation_words", [])})
    return {"model": bank.model, "n": len(bank), "d_model": int(bank.vectors.shape[-1]) if bank.entries else None,
            "layers": sorted(set(bank.layers)), "settings": bank.settings, "entries": rows}


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
                                int(entry["n_train"]), int(entry["n_valid"]), int(entry["n_batches"])).ffv
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
                        "n_batches": len(plan.datasets[train_i]) if train_i is not None else 0})
    return BankPlan(str(path), model.model_id, resume, bank.settings, n_tasks, init, s.as_dict(), entries,
                    len(plan.jobs), plan, bank, on_task)
