"""Where a stage's body runs: `Local`, `DryRun` (nnsight's in-process serialise/deserialise), `NDIF` (one blocking
request) or `NDIF(wait=False)` (submit the request, raise `JobSubmitted`).

A stage takes `remote: Target` and resolves it once with `resolve(remote)`; the shorthands are False/None (local),
True/"ndif" (NDIF) and "local" (dry run). Its body is written once, inside `with stage_session(model, remote):`,
which is a no-op locally and one nnsight session otherwise.

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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Union

import fv_remote.execution.hosted as hosted
from fv_remote.core.errors import UserError
from fv_remote.execution.backend import JobSubmitted, make_backend
from fv_remote.execution.shipping import register_traces

if TYPE_CHECKING:
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
        """The model a stage runs with here (real weights locally; a weightless copy for NDIF)."""
        from fv_remote.models.loading import load_model

        return load_model(name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Local(Executor):
    """Plain local code: the body's traces run one by one in this process."""

    name = "local"
    local_fast_paths = True


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
    name: ClassVar[str] = "ndif"
    session: ClassVar[bool] = True
    ndif: ClassVar[bool] = True

    def session_options(self, model: Any) -> dict[str, Any]:
        register_traces()
        return {"backend": make_backend(model, timeout=self.timeout, blocking=self.wait)}

    def load_model(self, name: str) -> LoadedModel:
        return hosted.load_remote_model(hosted.remote_repo_id(name))


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


def stage_session(model: Any, remote: Target = False) -> Any:
    """The context a stage's body runs in: nothing (local), one NDIF request, or nnsight's in-process dry run.

    Use it directly as `with stage_session(model, remote):` — it returns the session tracer itself, because nnsight
    captures the block from the frame that enters it (a wrapper generator would capture the wrong frame).
    """
    options = resolve(remote).session_options(model)
    if options is None:
        return contextlib.nullcontext()
    return getattr(model, "lm", model).session(**options)


def trace_options(model: Any, remote: Target = False) -> dict[str, Any]:
    """Keyword arguments for a single `lm.trace(...)` that should run locally, on NDIF or as a dry run."""
    return resolve(remote).session_options(model) or {}


__all__ = ["NDIF", "DryRun", "Executor", "JobSubmitted", "Local", "Target", "resolve", "stage_session",
           "trace_options"]
