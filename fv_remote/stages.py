"""The stage registry: every stage of fv-remote, registered once, by name.

A stage (`fv_remote.execution.stage.Stage`) is a name, a typed plan, one body and one commit; this is the one list of
them. `jobs fetch` finds a job's stage here, and the CLI's `plan` and ARCHITECTURE.md's stage table are generated
from it (`stage_table`).
"""

from __future__ import annotations

from typing import Any

from fv_remote.baselines.fit import VECTOR_FIT
from fv_remote.baselines.residuals import RESIDUALS
from fv_remote.execution.jobs import Job
from fv_remote.execution.stage import Stage
from fv_remote.fv.cma import CMA_STAGE
from fv_remote.fv.evaluate import EVALUATE, FIT
from fv_remote.fv.extract import EXTRACT
from fv_remote.relational.analogy import ANALOGY
from fv_remote.relational.bank_build import BANK
from fv_remote.relational.decode import DECODE
from fv_remote.relational.ffv import FINETUNE

STAGES: dict[str, Stage] = {stage.name: stage for stage in
                            (EXTRACT, CMA_STAGE, FIT, EVALUATE, FINETUNE, BANK, DECODE, ANALOGY,
                                                      RESIDUALS, VECTOR_FIT)}


def load_job(job_id: str) -> Job:
    """A submitted job's handle from its job file (its stage looked up here)."""
    return Job.load(job_id, STAGES)


def fetch_job(job_id: str, progress: Any = None) -> tuple[str, str]:
    """Poll the job; when COMPLETED store its results with its stage's commit, as the blocking run would have.
    Returns (status, message)."""
    return load_job(job_id).fetch(progress)


def has_cost(stage: Stage) -> bool:
    return type(stage).cost is not Stage.cost


COSTED = tuple(name for name, stage in STAGES.items() if has_cost(stage))  # what `fv-remote plan --stage` takes


def stage_plan(name: str, dims: Any, options: Any) -> tuple[Any, Any]:
    """The cost plan of stage `name` as one request (`fv_remote.plan.cost.Plan`) and its `rebuild(units)`."""
    from fv_remote.core.errors import UserError

    if name not in COSTED:
        raise UserError(f"unknown --stage {name!r}; use one of {', '.join(COSTED)}")
    planned = STAGES[name].cost(dims, options.check())
    assert planned is not None
    return planned


def stage_table() -> list[dict[str, str]]:
    """One row per registered stage: name, plan type, class, whether it can be submitted without waiting, whether
    it has a cost model, and the first paragraph of its docstring."""
    rows = []
    for stage in STAGES.values():
        cls = type(stage)
        rows.append({"stage": stage.name, "module": cls.__module__.removeprefix("fv_remote."),
                     "plan": stage.plan_type.__name__, "class": cls.__name__,
                     "no-wait": "yes" if stage.can_submit else "no", "cost": "yes" if has_cost(stage) else "no",
                     "about": " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())})
    return rows
