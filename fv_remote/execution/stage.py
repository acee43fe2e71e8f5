"""A stage as a type: a name, a typed JSON-able plan, one body, one commit.

`Executor.run(stage, model, plan)` runs `stage.body(model, plan)` where the model's executor says (its `with
stage_session(model):` is one NDIF request, nnsight's dry run, or nothing locally) and then `stage.commit(plan,
outputs)`. With `NDIF(wait=False)` the body's request is submitted instead: the executor writes a job file holding
the stage's name and its plan as JSON, and `jobs fetch` later replays the same `commit` on the job's saved values.
So what a blocking run stores and what a fetched job stores is one piece of code.

A plan is a dataclass of plain values (str, int, float, bool, None, lists, dicts). A field that lives only in this
process (an open store, encoded tensors) is marked `in_process()`: a job file leaves it out, so whatever reads it
copes with its default (a commit reopens the store from its URL).
"""

from __future__ import annotations

import dataclasses
import typing
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Generic, TypeVar

from fv_remote.core.errors import UserError

P = TypeVar("P")
R = TypeVar("R")


def in_process(default: Any = None) -> Any:
    """A plan field that lives only in this process: a job file leaves it out (read back, it is `default`)."""
    return dataclasses.field(default=default, metadata={"in_process": True}, compare=False, repr=False)


def plan_to_json(plan: Any) -> dict[str, Any]:
    """The plan's fields as JSON values (body-only fields left out)."""
    return {f.name: _jsonable(getattr(plan, f.name)) for f in dataclasses.fields(plan)
            if not f.metadata.get("in_process")}


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plan_to_json(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"plan field value {type(value).__name__} is not JSON-able; mark the field in_process()")


def plan_from_json(plan_type: type[P], data: dict[str, Any]) -> P:
    """A plan back from its job-file JSON (nested plan dataclasses rebuilt; body-only fields at their defaults)."""
    hints = typing.get_type_hints(plan_type)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(plan_type):  # type: ignore[arg-type]
        if f.metadata.get("in_process") or f.name not in data:
            continue
        value, hint = data[f.name], hints.get(f.name)
        if isinstance(hint, type) and dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = plan_from_json(hint, value)
        elif typing.get_origin(hint) is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    return plan_type(**kwargs)


class Stage(ABC, Generic[P, R]):
    """One stage of the pipeline. Subclasses set `name` and `plan_type` and write `body` and `commit` once.

    `body(model, plan)`: the nnsight work, inside `with stage_session(model):` (traces and `fv_remote.traces`
    helpers only, so that it ships); returns what `commit` needs (saved values when in a session).
    `commit(plan, outputs, progress)`: what gets stored or written, and the stage's result; the same code for a
    blocking run and for `jobs fetch`, so it reads only the plan and the outputs.
    `result_key`: the name under which the body's outputs come back in a submitted job's saved values.
    `can_submit`: whether the stage may be submitted without waiting (its commit needs nothing but the plan).
    """

    name: ClassVar[str]
    plan_type: ClassVar[type]
    result_key: ClassVar[str] = "outputs"
    can_submit: ClassVar[bool] = True

    @abstractmethod
    def body(self, model: Any, plan: P) -> Any:
        """The stage's nnsight work where the model's executor runs it."""

    @abstractmethod
    def commit(self, plan: P, outputs: Any, progress: Any = None) -> R:
        """Store or write the outputs; return the stage's result."""

    def parts(self, plan: P) -> list[P]:
        """How a run outside a session splits the plan: each part's body and commit run before the next part's, so
        results are stored as they come (an interrupted run keeps them; progress moves per part). A session runs
        the whole plan as one request. Default: one part."""
        return [plan]

    def cost(self, dims: Any, options: Any) -> tuple[Any, Any] | None:
        """The stage as one request from a model's config alone (`fv_remote.plan.cost`): (its `Plan`,
        `rebuild(units)` the same for fewer units, or None when it cannot be split); None: no cost model."""
        return None

    def summary(self, plan: P, result: R) -> str:
        """One line saying what a fetched job stored (shown by `jobs fetch`)."""
        return f"{self.name}: stored"

    def outputs_from_saved(self, plan: P, saved: dict[str, Any]) -> Any:
        """The body's outputs among a job's saved values."""
        if self.result_key not in saved:
            raise UserError(f"the {self.name} job's result has no {self.result_key!r} "
                            f"(saved: {', '.join(saved) or 'nothing'})")
        return saved[self.result_key]

    def __repr__(self) -> str:
        return f"<stage {self.name}>"
