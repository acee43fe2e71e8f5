"""Where a stage's body runs: `Local`, `DryRun` (nnsight's in-process serialise/deserialise), `NDIF` (one blocking
request) or `NDIF(wait=False)` (submit the request, raise `JobSubmitted`).

The executor is chosen once, when the model is loaded (`Executor.load_model`, `load_remote_model`) or rebound with
`model.using(executor)`; stages read it from the model (`executor_of`). A stage (`fv_remote.execution.stage.Stage`)
runs with `executor_of(model).run(stage, model, plan)`: its body, written once inside `with stage_session(model):`
(a no-op locally, one nnsight session otherwise), then its commit. The shorthands of `resolve` (False/None local,
True/"ndif" NDIF, "local" dry run) are for `model.using(...)`.

How a body runs remotely (nnsight 0.8.1):
- the block's *source text* travels, with only the variables it reads; modules, the tokenizer and the interleaver go
  as ids the server resolves against its own copy of the model. Helpers called inside it must come from
  `fv_remote.traces` (registered to ship by value) and plain values (ints, lists, tensors) — never objects of
  `fv_remote` classes (adapters, LoadedModel): those are pickled by reference and the server does not have them;
- only values marked with `nnsight.save` come back, pushed into the caller's frame when the block ends. The server
  matches them by object id against *every* variable of the block, so a value saved only to leave a trace (a KV
  cache, logits) comes back too while a variable still holds it, and ids of freed saved objects get reused: a block
  ends by setting every variable it created except its results to None (tests/test_remote_results.py checks this
  per stage; benchmarks/REMOTE_SIZES.md has the sizes).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Union

import fv_remote.execution.hosted as hosted
from fv_remote.core.errors import UserError
from fv_remote.execution.backend import JobSubmitted, make_backend
from fv_remote.execution.shipping import register_traces

if TYPE_CHECKING:
    from fv_remote.execution.stage import Stage
    from fv_remote.models.loading import LoadedModel


class Executor:
    """Where a stage's body runs. `session`: the body runs inside one nnsight session (everything it returns must be
    saved); `ndif`: the body leaves this process (the model may be weightless; only `fv_remote.traces` helpers and
    plain values may be read); `local_fast_paths`: a stage may run its local-only fast path instead of its body
    (only where a benchmark in benchmarks/ shows it is worth more than 1.2x: analogy's cached-prefix scoring,
    bench_analogy_body.py)."""

    name: ClassVar[str] = ""
    session: ClassVar[bool] = False
    ndif: ClassVar[bool] = False
    local_fast_paths: ClassVar[bool] = False

    def session_options(self, model: Any) -> dict[str, Any] | None:
        """Keyword arguments of `lm.session(...)` / `lm.trace(...)` for this target; None: plain local code."""
        return None

    def load_model(self, name: str) -> LoadedModel:
        """The model a stage runs with here (real weights locally; a weightless copy for NDIF), bound to this
        executor."""
        from fv_remote.models.loading import load_model

        return load_model(name).using(self)

    def run(self, stage: Stage, model: Any, plan: Any, progress: Any = None) -> Any:
        """Run `stage` on `model` (bound to this executor): its body here, then its commit. A submit-only executor
        (`NDIF(wait=False)`) writes the job file (stage name + plan) and raises `JobSubmitted` with its `job`
        handle instead; `job.fetch()` (or `fv-remote jobs fetch ID`) later replays the same commit."""
        if executor_of(model) is not self:
            model = model.using(self)
        if not self.session:  # part by part, each stored before the next is computed (the last result is the run's)
            result = None
            for part in stage.parts(plan):
                result = stage.commit(part, stage.body(model, part), progress)
            return result
        try:
            outputs = stage.body(model, plan)
        except JobSubmitted as submitted:
            from fv_remote.execution.jobs import Job

            submitted.job = Job.create(stage, plan, submitted, getattr(model, "model_id", ""))
            raise
        return stage.commit(plan, outputs, progress)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@dataclass(repr=True)
class Local(Executor):
    """Plain local code: the body's traces run one by one in this process. `placement` (device, dtype, device map;
    `fv_remote.models.placement.Placement`) says where `load_model` puts the weights; None: `Placement.from_env()`
    (float32, on the GPU when CUDA is available, else the CPU)."""

    placement: Any = None
    name: ClassVar[str] = "local"
    local_fast_paths: ClassVar[bool] = True

    def load_model(self, name: str) -> LoadedModel:
        from fv_remote.models.loading import load_model

        return load_model(name, self.placement).using(self)


class DryRun(Executor):
    """nnsight's in-process dry run: the whole body is serialised and deserialised as for NDIF, then run here."""

    name = "dry-run"
    session = True

    def session_options(self, model: Any) -> dict[str, Any]:
        register_traces()
        return {"remote": "local"}


@dataclass(repr=True)
class NDIF(Executor):
    """One NDIF request per stage. `wait=False` submits it and raises `JobSubmitted` (nothing computed or stored
    here; `execution.jobs` stores the results later). `timeout`: the client's wait limit (FV_REMOTE_TIMEOUT)."""

    wait: bool = True
    timeout: float | None = None
    records: list = field(default_factory=list, repr=False, compare=False)  # one JobRecord per request, in order
    name: ClassVar[str] = "ndif"
    session: ClassVar[bool] = True
    ndif: ClassVar[bool] = True

    def session_options(self, model: Any) -> dict[str, Any]:
        register_traces()
        backend = make_backend(model, timeout=self.timeout, blocking=self.wait)
        self.records.append(backend.record)
        return {"backend": backend}

    @property
    def last(self) -> Any:
        """The `JobRecord` of this executor's latest request (job id, bytes each way, seconds), or None."""
        return self.records[-1] if self.records else None

    def load_model(self, name: str) -> LoadedModel:
        return hosted.load_remote_model(hosted.remote_repo_id(name)).using(self)  # this one (timeout, wait)


# What a stage's `remote` parameter accepts: an executor, or a shorthand resolved by `resolve`.
Target = Union[Executor, bool, str, None]


def resolve(target: Target) -> Executor:
    """The executor a `remote` argument names: an Executor as is; False/None -> Local, True/"ndif" -> NDIF,
    "local" -> DryRun."""
    if isinstance(target, Executor):
        return target
    if target is None or target is False:
        return Local()
    if target is True or target == "ndif":
        return NDIF()
    if target == "local":
        return DryRun()
    raise UserError(f"remote must be an Executor, False (local), True (NDIF) or 'local' (serialise in-process), "
                    f"got {target!r}")


def load_remote_model(repo_id: str, revision: str | None = None, **kwargs: Any) -> LoadedModel:
    """A weightless local copy of an NDIF-hosted model (`hosted.load_remote_model`), its stages bound to `NDIF()`."""
    return hosted.load_remote_model(repo_id, revision, **kwargs).using(NDIF())


def run_stage(stage: Stage, model: Any, plan: Any, progress: Any = None) -> Any:
    """`stage` on `model`, where the model's executor runs it (see `Executor.run`)."""
    return executor_of(model).run(stage, model, plan, progress)


def executor_of(model: Any) -> Executor:
    """The executor a model is bound to (`Local()` unless it was loaded or rebound for another)."""
    bound = getattr(model, "executor", None)
    return bound if isinstance(bound, Executor) else Local()


def stage_session(model: Any) -> Any:
    """The context a stage's body runs in, from the model's executor: nothing (local), one NDIF request, or
    nnsight's in-process dry run.

    Use it directly as `with stage_session(model):` — it returns the session tracer itself, because nnsight
    captures the block from the frame that enters it (a wrapper generator would capture the wrong frame).
    """
    options = executor_of(model).session_options(model)
    if options is None:
        return contextlib.nullcontext()
    return getattr(model, "lm", model).session(**options)


def trace_options(model: Any) -> dict[str, Any]:
    """Keyword arguments for a single `lm.trace(...)` that should run where the model's executor says."""
    return executor_of(model).session_options(model) or {}


__all__ = ["NDIF", "DryRun", "Executor", "JobSubmitted", "Local", "Target", "executor_of", "load_remote_model",
           "resolve", "run_stage", "stage_session", "trace_options"]
