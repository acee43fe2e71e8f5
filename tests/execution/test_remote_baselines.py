"""The other vectors through the loopback NDIF server: the residuals stage and each method's fit-vector stage give
the local numbers, in ONE request each; `residuals --remote --no-wait` + `jobs fetch` stores what a blocking run
stores."""

from __future__ import annotations

import json
import time

import pytest
import torch
from typer.testing import CliRunner

from support.remote_fixtures import hosted_model_fixtures, ndif_fixture

from fv_remote.baselines.fit import fit_vector
from fv_remote.baselines.residuals import load_residuals, read_residual_stream
from fv_remote.data import RelationTask
from fv_remote.data.tasks import prepare_task
from fv_remote.execution import NDIF
from fv_remote.store.activations import ActivationStore

REPO = "test-org/tiny-llama-baselines"
WORDS = ["hot", "cold", "up", "down", "big", "small", "the", "quick", "brown", "fox", "lazy", "dog", "over"]
TASK = RelationTask("toy", [(a, b) for a in WORDS for b in WORDS if a != b][:60])
TOL = 1e-4

local, hub_cache, server, remote_model = hosted_model_fixtures(REPO, hang_s=1.0)


ndif = ndif_fixture()


@pytest.fixture(scope="module")
def local_reads(local, tmp_path_factory):
    store = ActivationStore(str(tmp_path_factory.mktemp("local") / "s.zarr"))
    read_residual_stream(local, TASK, store, n_prompts=5, n_shots=2, batch_size=2)
    return load_residuals(store, "toy")


def test_residuals_remote_equals_local_in_one_request(local_reads, remote_model, ndif, tmp_path):
    store = ActivationStore(str(tmp_path / "r.zarr"))
    result = read_residual_stream(remote_model.using(NDIF()), TASK, store, n_prompts=5, n_shots=2, batch_size=2)
    assert result.n_new == 5 and ndif.n_requests == 1 and ndif.jobs[0].status == "COMPLETED"
    got = load_residuals(store, "toy")
    torch.testing.assert_close(got.icl, local_reads.icl, atol=TOL, rtol=0)
    torch.testing.assert_close(got.zero_shot, local_reads.zero_shot, atol=TOL, rtol=0)


@pytest.mark.parametrize("method", ["task-vector", "icv", "mean-diff", "pca"])
def test_fit_vector_remote_equals_local_in_one_request(method, local, local_reads, remote_model, ndif,
                                                       tiny_tokenizer):
    prepared = prepare_task(tiny_tokenizer, TASK, seed=0, min_pairs=3)
    want, want_sweep = fit_vector(local, prepared, local_reads, method, n_prompts=6, batch_size=4)
    got, got_sweep = fit_vector(remote_model.using(NDIF()), prepared, local_reads, method, n_prompts=6,
                                batch_size=4)
    assert ndif.n_requests == 1 and ndif.jobs[0].status == "COMPLETED"
    assert got_sweep == want_sweep and got.layer == want.layer and got.meta["scale"] == want.meta["scale"]
    torch.testing.assert_close(got.vector, want.vector, atol=TOL, rtol=0)


def test_residuals_no_wait_then_fetch(local_reads, ndif, tmp_path, tiny_tokenizer):
    from fv_remote.cli.app import _register, app

    _register()
    toy_dir = tmp_path / "data"
    toy_dir.mkdir()
    (toy_dir / "toy.json").write_text(json.dumps([{"input": a, "output": b} for a, b in TASK.pairs]))
    url = str(tmp_path / "remote.zarr")
    runner = CliRunner()
    args = ["residuals", "--task", "toy", "--data-dir", str(toy_dir), "--store", url, "--model", REPO,
            "--n-prompts", "5", "--n-shots", "2", "--batch-size", "2", "--remote", "--no-wait"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    job_id = ndif.jobs[0].id
    assert ActivationStore(url).n_complete("toy/residual") == 0  # nothing stored before the fetch
    for _ in range(200):
        if ndif.jobs[0].status in ("COMPLETED", "ERROR"):
            break
        time.sleep(0.05)
    result = runner.invoke(app, ["jobs", "fetch", job_id])
    assert result.exit_code == 0, result.output
    got = load_residuals(ActivationStore(url), "toy")
    torch.testing.assert_close(got.icl, local_reads.icl, atol=TOL, rtol=0)
