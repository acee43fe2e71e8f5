"""`execution.stage` and `Executor.run`: plans to JSON and back, local parts, one body in a session, a submitted
job's file and its fetch replaying the stage's own commit. A toy stage, no model."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fv_remote.core.errors import UserError
from fv_remote.execution import DryRun, Executor, JobRecord, JobSubmitted, Local, PollResult
from fv_remote.execution import jobs as J
from fv_remote.execution.stage import Stage, in_process, plan_from_json, plan_to_json

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Inner:
    name: str
    sizes: tuple[int, ...]


@dataclass
class CountPlan:
    path: str
    values: list[int]
    inner: Inner
    labels: dict = field(default_factory=dict)
    handle: Any = in_process()


class Count(Stage[CountPlan, list]):
    """Doubles each value (the body) and appends the doubled values to a file (the commit)."""

    name = "count"
    plan_type = CountPlan
    bodies: list[list[int]] = []

    def parts(self, plan: CountPlan) -> list[CountPlan]:
        return [dataclasses.replace(plan, values=[v]) for v in plan.values]

    def body(self, model: Any, plan: CountPlan) -> list[int]:
        self.bodies.append(list(plan.values))
        if getattr(model, "submit", False):  # what NDIF(wait=False)'s backend does once the request is sent
            raise JobSubmitted(JobRecord(job_id="job-1", host="http://test", payload_bytes=123))
        return [2 * v for v in plan.values]

    def commit(self, plan: CountPlan, outputs: list[int], progress: Any = None) -> list:
        with open(plan.path, "a") as f:
            f.writelines(f"{v}\n" for v in outputs)
        return Path(plan.path).read_text().split()


COUNT = Count()


class FakeModel:
    def __init__(self, submit: bool = False, executor: Executor | None = None):
        self.submit, self.executor, self.model_id = submit, executor, "toy"

    def using(self, executor: Executor) -> FakeModel:
        return FakeModel(self.submit, executor)


class Session(Executor):
    session = True


def _plan(tmp_path, values=(1, 2, 3)) -> CountPlan:
    return CountPlan(str(tmp_path / "out.txt"), list(values), Inner("x", (1, 2)), {"a": 1}, handle=object())


def test_plan_json_round_trip_leaves_out_in_process_fields(tmp_path):
    plan = _plan(tmp_path)
    data = plan_to_json(plan)
    assert "handle" not in data and json.loads(json.dumps(data)) == data
    back = plan_from_json(CountPlan, json.loads(json.dumps(data)))
    assert back == plan and back.handle is None and isinstance(back.inner, Inner) and back.inner.sizes == (1, 2)
    with pytest.raises(TypeError, match="in_process"):
        plan_to_json(CountPlan("p", [object()], Inner("x", ())))  # type: ignore[list-item]


def test_local_runs_part_by_part_and_a_session_the_whole_plan(tmp_path):
    COUNT.bodies.clear()
    assert Local().run(COUNT, FakeModel(), _plan(tmp_path)) == ["2", "4", "6"]
    assert COUNT.bodies == [[1], [2], [3]]  # each part's body, then its commit, before the next part
    COUNT.bodies.clear()
    assert Session().run(COUNT, FakeModel(), _plan(tmp_path, (5,))) == ["2", "4", "6", "10"]
    assert COUNT.bodies == [[5]]


def test_a_submitted_stage_writes_its_job_and_fetch_replays_the_commit(tmp_path, monkeypatch):
    monkeypatch.setenv("FV_REMOTE_JOBS", str(tmp_path / "jobs"))
    plan = _plan(tmp_path)
    with pytest.raises(JobSubmitted) as info:
        Session().run(COUNT, FakeModel(submit=True), plan)
    job = info.value.job
    assert job.id == "job-1" and job.path.is_file() and not Path(plan.path).exists()  # nothing committed
    data = json.loads(job.path.read_text())
    assert data["stage"] == "count" and data["plan"] == plan_to_json(plan) and data["model"] == "toy"
    job.note(top=3)
    polls = []
    monkeypatch.setattr(J, "_poll", lambda d: polls.append(d["job_id"]) or PollResult("job-1", "RUNNING"))
    loaded = J.Job.load("job-1", {"count": COUNT})
    assert loaded.plan == plan and loaded.status() == "RUNNING"
    assert loaded.fetch() == ("RUNNING", "job job-1 (count) is RUNNING; fetch it again later")
    monkeypatch.setattr(J, "_poll", lambda d: PollResult("job-1", "COMPLETED", {"outputs": [7, 8]}, 10))
    shown = []
    monkeypatch.setitem(J.REPORTERS, "count", lambda report, result: shown.append((report, result)))
    assert loaded.fetch() == ("COMPLETED", "count: stored")
    assert Path(plan.path).read_text().split() == ["7", "8"] and shown == [({"top": 3}, ["7", "8"])]
    assert J.Job.load("job-1", {"count": COUNT}).fetch()[0] == "FETCHED"  # fetching twice is harmless
    assert Path(plan.path).read_text().split() == ["7", "8"]


def test_a_job_of_an_unknown_stage_or_a_damaged_plan_is_one_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FV_REMOTE_JOBS", str(tmp_path))
    (tmp_path / "old.json").write_text(json.dumps({"job_id": "old", "stage": "cma", "details": {}}))
    with pytest.raises(UserError, match="another version"):
        J.Job.load("old", {"count": COUNT})
    (tmp_path / "bad.json").write_text(json.dumps({"job_id": "bad", "stage": "count", "plan": {"values": [1]}}))
    with pytest.raises(UserError, match="damaged count plan"):
        J.Job.load("bad", {"count": COUNT})


def test_dry_run_is_a_session_and_local_is_not():
    assert DryRun().session and not Local().session and Local().local_fast_paths


def test_no_stage_helper_takes_a_remote_argument():
    """The executor travels with the model: `remote` parameters live nowhere but the execution package."""
    offenders = []
    for path in (ROOT / "fv_remote").rglob("*.py"):
        if "execution" in path.parts:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"remote: Target|remote=remote|details\[|job_details|no_wait\(", line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == []
