"""`--no-wait` for the long remote stages (cma, finetune, bank build) through the loopback NDIF server.

Each stage is submitted with `NDIF(wait=False)` (nothing stored; the executor writes the job file), fetched later with
`fv_remote.stages.fetch_job` (the stage's own commit), and what the fetch stores is compared with the blocking remote
run of the same stage: the store's TASK/cma group, the FFV (file and training record), the bank file. Fetching twice
is harmless. Same
set-up as test_remote_relational.py: a weightless client copy of a tiny model, the real weights on the server.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from support.remote_fixtures import hosted_model_fixtures, ndif_fixture

from fv_remote import execution as R
from fv_remote.relational.bank import RelationBank
from fv_remote.relational.bank_build import build_bank
from fv_remote.data import RelationTask
from fv_remote.core.errors import UserError
from fv_remote.relational.ffv import FinetuneSettings, train_ffv
from fv_remote.execution.jobs import load_job
from fv_remote.stages import fetch_job
from fv_remote.data.tasks import prepare_task
from fv_remote.fv.vectors import FunctionVector
from fv_remote.execution import NDIF

REPO = "test-org/tiny-llama-nowait"
WORDS = ["hot", "cold", "up", "down", "big", "small", "the", "quick", "brown", "fox", "lazy", "dog", "over"]
PAIRS = [(a, b) for a in WORDS for b in WORDS if a != b][:60]
TASKS = [RelationTask("toy", PAIRS), RelationTask("rev", [(b, a) for a, b in PAIRS]),
         RelationTask("few", PAIRS[:3])]  # too few pairs: skipped before submission
SETTINGS = FinetuneSettings(steps=6, lr=0.2, batch_size=4, eval_every=2, patience=4, l2=0.01,
                            allow_unchanged=True)  # tiny random models seldom beat their start: remote == local is tested, not learning (issue 26)
TOL = 1e-4


local, hub_cache, server, remote_model = hosted_model_fixtures(REPO, hang_s=1.0)


ndif = ndif_fixture()


@pytest.fixture(scope="module")
def prepared(tiny_tokenizer):
    return prepare_task(tiny_tokenizer, TASKS[0], seed=0, min_pairs=4)


def _submit(fn, report: dict | None = None) -> str:
    """Run `fn` (a stage on a `NDIF(wait=False)` model): it must submit and raise JobSubmitted with the job's handle,
    its job file written; keep `report` (what the CLI would) in it; return the job id."""
    with pytest.raises(R.JobSubmitted) as info:
        fn()
    job = info.value.job
    assert job.path.is_file() and job.id == info.value.record.job_id
    if report:
        job.note(**report)
    return job.id


SUBMIT = NDIF(wait=False)


def _wait_done(ndif, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while ndif.jobs[-1].status not in ("COMPLETED", "ERROR") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ndif.jobs[-1].status == "COMPLETED", ndif.log[-1:]


def _fetch_twice(job_id: str) -> str:
    state, message = fetch_job(job_id)
    assert state == "COMPLETED", message
    again, note = fetch_job(job_id)
    assert again == "FETCHED" and "already fetched" in note
    assert load_job(job_id)["state"] == "fetched"
    return message


def _close(got, want, path: str = "value") -> None:
    """Equal, floats (also in tensors, lists, dicts) within TOL."""
    if isinstance(want, torch.Tensor):
        torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    elif isinstance(want, dict):
        assert got.keys() == want.keys(), path
        for key in want:
            _close(got[key], want[key], f"{path}[{key!r}]")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            _close(g, w, f"{path}[{i}]")
    elif isinstance(want, float):
        assert abs(got - want) <= TOL or (np.isnan(got) and np.isnan(want)), f"{path}: {got} != {want}"
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


# -- cma ------------------------------------------------------------------------------------------------------------

def test_cma_no_wait_then_fetch_equals_blocking(local, remote_model, prepared, ndif, tmp_path):
    from fv_remote.fv.cma import load_aie, run_cma
    from fv_remote.fv.extract import extract, mean_heads_tensor
    from fv_remote.store.activations import ActivationStore

    stores = []
    for name in ("blocking", "later"):
        store = ActivationStore(str(tmp_path / f"{name}.zarr"))
        extract(local, TASKS[0], store, n_prompts=4, n_shots=2, batch_size=4)
        zarr.open_group(store.url, mode="r+", path="toy")["correct"][:] = True  # a random model gets none right
        stores.append(store)
    blocking, later = stores
    means = mean_heads_tensor(blocking, "toy")
    # One prompt stored before, so the job starts at prompt 1 (resumed) as the blocking run does.
    for store in stores:
        run_cma(local, prepared, store, means, n_prompts=1, n_shots=2)
    want = run_cma(remote_model.using(NDIF()), prepared, blocking, means, n_prompts=3, n_shots=2)
    plot = tmp_path / "aie.png"
    job_id = _submit(lambda: run_cma(remote_model.using(SUBMIT), prepared, later, means, n_prompts=3, n_shots=2,
                                     plot=plot),
                     {"top": 3})
    assert later.n_complete("toy/cma") == 1  # nothing stored before the fetch
    assert load_job(job_id)["plan"]["start"] == 1
    _wait_done(ndif)
    _fetch_twice(job_id)
    assert later.n_complete("toy/cma") == 3 and plot.exists()
    a, b = blocking.open("toy/cma"), later.open("toy/cma")
    assert np.abs(a["indirect_effect"].values - b["indirect_effect"].values).max() <= TOL
    assert np.abs(a["p_corrupted"].values - b["p_corrupted"].values).max() <= TOL
    for name in ("query", "answer", "text"):
        assert (a[name].values == b[name].values).all(), name
    # Same provenance; only the wall-clock stamp of when each store was written may differ (1 s resolution).
    want_attrs, got_attrs = blocking.attrs("toy/cma"), later.attrs("toy/cma")
    assert "created" in want_attrs and "created" in got_attrs
    assert {k: v for k, v in want_attrs.items() if k != "created"} == \
        {k: v for k, v in got_attrs.items() if k != "created"}
    assert np.abs(load_aie(later, "toy").values - want.aie.values).max() <= TOL
    assert ndif.n_requests == 2  # the blocking run and the submission; polls never submit
    # Storing the same results again with the stage's commit is a no-op.
    from fv_remote.execution import poll_job
    from fv_remote.stages import load_job as job_handle

    job = job_handle(job_id)
    again = job.stage.commit(job.plan, job.stage.outputs_from_saved(job.plan, poll_job(job_id).result))
    assert again.n_new == 0 and later.n_complete("toy/cma") == 3


def test_cma_fetch_refuses_a_store_that_moved_on(local, remote_model, prepared, ndif, tmp_path):
    from fv_remote.fv.cma import run_cma
    from fv_remote.fv.extract import extract, mean_heads_tensor
    from fv_remote.store.activations import ActivationStore

    store = ActivationStore(str(tmp_path / "s.zarr"))
    extract(local, TASKS[0], store, n_prompts=4, n_shots=2, batch_size=4)
    zarr.open_group(store.url, mode="r+", path="toy")["correct"][:] = True
    means = mean_heads_tensor(store, "toy")
    job_id = _submit(lambda: run_cma(remote_model.using(SUBMIT), prepared, store, means, n_prompts=3, n_shots=2),
                     {"top": 3})
    _wait_done(ndif)
    # Another run appends meanwhile (remotely, once the job is done: the loopback server runs in this process and
    # its copy of cma.py's session code would mislead a trace of that file started locally or concurrently).
    run_cma(remote_model.using(NDIF()), prepared, store, means, n_prompts=1, n_shots=2)
    with pytest.raises(UserError, match="changed since it was submitted"):
        fetch_job(job_id)
    assert store.n_complete("toy/cma") == 1 and load_job(job_id)["state"] == "submitted"


# -- finetune -------------------------------------------------------------------------------------------------------

def test_finetune_no_wait_then_rebuild_equals_blocking(remote_model, prepared, ndif):
    """--layer auto with a random init: the layer search and the scaling on the server, rebuilt from the job."""
    from fv_remote.execution import poll_job
    from fv_remote.stages import load_job as job_handle

    kw = dict(init="random", layer="auto", n_train=8, n_valid=6, settings=SETTINGS, quick_steps=3)
    want = train_ffv(remote_model.using(NDIF()), prepared, None, **kw)
    job_id = _submit(lambda: train_ffv(remote_model.using(SUBMIT), prepared, None, **kw))
    job = job_handle(job_id)  # the plan as read back from the job file
    _wait_done(ndif)
    got = job.stage.commit(job.plan, job.stage.outputs_from_saved(job.plan, poll_job(job_id).result))
    _close(got.result.ffv.vector, want.result.ffv.vector)
    assert (got.result.ffv.layer, got.result.ffv.model, got.result.ffv.task, got.result.ffv.kind) == \
        (want.result.ffv.layer, want.result.ffv.model, want.result.ffv.task, want.result.ffv.kind)
    _close(got.result.ffv.meta, want.result.ffv.meta)
    _close(got.result.history, want.result.history)
    _close(got.layer_search, want.layer_search)
    assert (got.n_train, got.n_valid, got.result.best_step) == (want.n_train, want.n_valid, want.result.best_step)


def _cli(*args: str):
    from fv_remote.cli.app import _register, app

    _register()
    return CliRunner().invoke(app, list(args))


def test_cli_finetune_no_wait_then_jobs_fetch(local, ndif, tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "toy.json").write_text(json.dumps([{"input": a, "output": b} for a, b in PAIRS]))
    fv = FunctionVector(vector=torch.randn(local.adapter.d_model, generator=torch.Generator().manual_seed(2)),
                        model=local.model_id, task="toy", layer=1, heads=[(1, 0), (0, 1)])
    fv_path = fv.save(tmp_path / "toy.fv.safetensors")
    args = ("--task", "toy", "--data-dir", str(data_dir), "--fv", str(fv_path), "--n-train", "8", "--n-valid", "6",
            "--steps", "4", "--batch-size", "4", "--model", REPO, "--allow-unchanged", "--remote")
    want_path, got_path = tmp_path / "blocking.ffv.safetensors", tmp_path / "later.ffv.safetensors"
    result = _cli("finetune", *args, "--no-evaluate", "--out", str(want_path))
    assert result.exit_code == 0, result.output
    result = _cli("finetune", *args, "--no-wait", "--out", str(got_path))
    assert result.exit_code == 0, result.output
    job_id = ndif.jobs[-1].id
    assert f"job {job_id}" in result.output and not got_path.exists()
    assert ndif.n_requests == 2  # the blocking run (no evaluation) and the submission
    _wait_done(ndif)
    result = _cli("jobs", "fetch", job_id)
    assert result.exit_code == 0, result.output
    assert "evaluate it: fv-remote evaluate --fv" in result.output and f"--ffv {got_path}" in result.output
    assert got_path.with_name("later.ffv_loss.png").exists()
    got, want = FunctionVector.load(got_path), FunctionVector.load(want_path)
    _close(got.vector, want.vector)
    assert (got.layer, got.heads, got.kind) == (want.layer, want.heads, want.kind)
    _close(got.meta, want.meta)
    result = _cli("jobs", "fetch", job_id)
    assert result.exit_code == 0 and "already fetched" in result.output
    assert ndif.n_requests == 2
    for command in (("finetune", *args[:-1], "--no-wait"), ("cma", "--task", "toy", "--store", "x.zarr", "--no-wait"),
                    ("bank", "build", "--tasks", "toy", "--no-wait")):
        result = _cli(*command)
        assert isinstance(result.exception, UserError) and "--no-wait needs --remote" in str(result.exception)


# -- bank build -----------------------------------------------------------------------------------------------------

def test_bank_no_wait_then_fetch_equals_blocking(remote_model, ndif, tmp_path):
    kw = dict(layer=1, n_train=8, n_valid=6, settings=SETTINGS)
    want_path, got_path = tmp_path / "blocking.safetensors", tmp_path / "later.safetensors"
    want = build_bank(remote_model.using(NDIF()), TASKS, want_path, resume=False, **kw)
    # Resume: "toy" already in the later bank, so only "rev" is trained by the job (as the blocking run would).
    seed = RelationBank(remote_model.model_id)
    seed.add(want.get("toy"))
    seed.save(got_path)
    log = []
    job_id = _submit(lambda: build_bank(remote_model.using(SUBMIT), TASKS, got_path,
                                        on_task=lambda name, status: log.append((name, status.split(":")[0])), **kw))
    assert sorted(log) == [("few", "skipped"), ("toy", "kept")]
    assert RelationBank.load(got_path).names == ["toy"]  # nothing written before the fetch
    assert [e["name"] for e in load_job(job_id)["plan"]["entries"]] == ["rev"]
    _wait_done(ndif)
    message = _fetch_twice(job_id)
    assert str(got_path) in message
    got = RelationBank.load(got_path)
    assert got.names == want.names == ["toy", "rev"]
    _close(got.vectors, want.vectors)
    assert got.layers == want.layers
    for a, b in zip(got.entries, want.entries):
        _close(a.meta, b.meta)
    assert got.settings == json.loads(json.dumps(want.settings, default=str))
    # Writing the same results again with the stage's commit leaves the bank as it is.
    from fv_remote.execution import poll_job
    from fv_remote.stages import load_job as job_handle

    job = job_handle(job_id)
    again = job.stage.commit(job.plan, job.stage.outputs_from_saved(job.plan, poll_job(job_id).result))
    assert again.names == ["toy", "rev"]
    _close(RelationBank.load(got_path).vectors, want.vectors)
