"""Every remote-capable stage through the loopback NDIF server: results equal local ones, ONE request per stage.

The client holds a weightless copy of the tiny model (config + tokenizer from a fake Hub cache); the loopback server
holds the real weights and runs each request with nnsight's own deserialisation and NDIF's import whitelist. Also:
`--remote` on the CLI stages, `--no-wait` + `fv-remote jobs status|fetch`, and failures that leave results alone.
Payload and result sizes per stage are collected in SIZES and printed at the end (pytest -s).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from support.loopback_ndif import LoopbackNDIF
from support.remote_fixtures import hosted_model_fixtures, ndif_fixture, toy_vector_fixtures

from fv_remote import execution as R
from fv_remote.data import RelationTask
from fv_remote.core.errors import UserError
from fv_remote.fv.evaluate import evaluate_and_sweep, evaluate_task, fit_function_vector, layer_sweep
from fv_remote.fv.steering import Condition, Steer, generate_many, logits_conditions, score_conditions
from fv_remote.data.tasks import prepare_task
from fv_remote.fv.vectors import FunctionVector, build_function_vector, head_vectors
from fv_remote.execution import DryRun, NDIF

REPO = "test-org/tiny-llama-stages"
WORDS = ["hot", "cold", "up", "down", "big", "small", "the", "quick", "brown", "fox", "lazy", "dog", "over"]
PAIRS = [(a, b) for a in WORDS for b in WORDS if a != b][:60]
TASK = RelationTask("toy", PAIRS)
PROMPTS = ["Q: hot\nA:", "Q: the quick brown\nA:", "Q: up\nA: down\n\nQ: big\nA:"]
SIZES: dict[str, tuple[int, int]] = {}  # stage -> (payload bytes, result bytes)
TOL = 1e-4


local, hub_cache, server, remote_model = hosted_model_fixtures(REPO, hang_s=1.0, sizes=SIZES)


ndif = ndif_fixture()


prepared, means_aie, fv = toy_vector_fixtures(TASK)


def _one_request(ndif, stage: str) -> None:
    assert ndif.n_requests == 1, f"{stage}: {ndif.n_requests} requests"
    job = ndif.jobs[0]
    assert job.status == "COMPLETED", ndif.log[-1:]
    SIZES[stage] = (job.payload_bytes, job.result_bytes)


# -- library functions: local == loopback, one request each --------------------------------------------------------

def test_head_vectors(local, remote_model, means_aie, ndif):
    means, _ = means_aie
    heads = [(2, 1), (0, 3), (0, 0)]
    want = head_vectors(local, means, heads)
    got = head_vectors(remote_model.using(NDIF()), means, heads)
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    _one_request(ndif, "fit without sweep (head_vectors, k=3)")
    torch.testing.assert_close(head_vectors(local.using(DryRun()), means, heads), want, atol=TOL, rtol=0)


def test_steer_logits_all_conditions_in_one_request(local, remote_model, fv, ndif):
    conditions = [Condition(PROMPTS), Condition(PROMPTS, Steer(fv, layer=2, scale=0.5), batch_size=2),
                  Condition(PROMPTS[:1], Steer(fv, distributed=True))]
    want = logits_conditions(local, conditions)
    got = logits_conditions(remote_model.using(NDIF()), conditions)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, atol=TOL, rtol=0)
    assert (want[1] - want[0]).abs().max() > 1e-3  # the steer did something
    _one_request(ndif, "steer --prompt (3 conditions, full logits)")


def test_steer_accuracy(local, remote_model, fv, prepared, ndif):
    prompts = prepared.prompts("test", 12, kind="zero_shot", n_shots=0)
    texts, ids = [p.text for p in prompts], prepared.ids(prompts)
    conditions = [Condition(texts, None, ids, 5), Condition(texts, Steer(fv), ids, 5)]
    want = score_conditions(local, conditions)
    assert score_conditions(remote_model.using(NDIF()), conditions) == want
    _one_request(ndif, "steer --task (2 x 12 prompts, top-1 ids)")


def test_generate(local, remote_model, fv, ndif):
    runs = [(PROMPTS[0], None), (PROMPTS[0], Steer(fv)), (PROMPTS[1], Steer(fv, distributed=True))]
    want = generate_many(local, runs, max_new_tokens=5)
    assert generate_many(remote_model.using(NDIF()), runs, max_new_tokens=5) == want
    _one_request(ndif, "generate (3 runs x 5 tokens)")


def test_layer_sweep(local, remote_model, fv, prepared, ndif):
    want = layer_sweep(local, prepared, fv, n_prompts=10, batch_size=4)
    calls = []
    got = layer_sweep(remote_model.using(NDIF()), prepared, fv, n_prompts=10, batch_size=4,
                      progress=lambda done, total: calls.append((done, total)))
    assert got == want and calls == [(3, 3)]
    _one_request(ndif, "layer sweep (3 layers x 10 prompts)")


def test_evaluate(local, remote_model, fv, prepared, ndif):
    ffv = dataclasses.replace(fv, vector=-fv.vector, kind="ffv")
    kw = dict(n_test=8, n_shots=2, batch_size=4, extra_vectors={"ffv": ffv})
    want = evaluate_task(local, prepared, fv, **kw)
    got = evaluate_task(remote_model.using(NDIF()), prepared, fv, **kw)
    assert got == want and "zero_shot_ffv" in got.extra
    _one_request(ndif, "evaluate (7 conditions x 8 prompts)")
    ndif.reset()
    scores, sweep = evaluate_and_sweep(remote_model.using(NDIF()), prepared, fv, sweep_batch_size=8, **kw)
    assert scores == want and sweep == layer_sweep(local, prepared, fv, batch_size=8)
    _one_request(ndif, "evaluate --sweep (7 conditions + 3 layers)")


def test_fit_with_sweep(local, remote_model, means_aie, prepared, ndif):
    means, aie = means_aie
    want, want_sweep = fit_function_vector(local, prepared, means, aie, k=4, n_prompts=10, batch_size=5)
    got, got_sweep = fit_function_vector(remote_model.using(NDIF()), prepared, means, aie, k=4, n_prompts=10, batch_size=5)
    assert got_sweep == want_sweep and got.layer == want.layer and got.heads == want.heads
    torch.testing.assert_close(got.vector, want.vector, atol=TOL, rtol=0)
    torch.testing.assert_close(got.head_vectors, want.head_vectors, atol=TOL, rtol=0)
    assert got.meta == want.meta
    _one_request(ndif, "fit (k=4 projection + 3-layer sweep)")


def test_bf16_server_runs_every_stage(local, remote_model, fv, prepared, means_aie, tiny_tokenizer, monkeypatch):
    """NDIF serves bf16 weights: float32 vectors and means must be cast to the model's dtype inside the traces."""
    from fv_remote.models.loading import wrap_model

    hosted = wrap_model(copy.deepcopy(local.hf).to(torch.bfloat16), tiny_tokenizer, name=REPO)
    means, aie = means_aie
    with LoopbackNDIF({REPO: hosted.lm}, hang_s=1.0) as srv:
        monkeypatch.setenv("NDIF_HOST", srv.host)
        got = head_vectors(remote_model.using(NDIF()), means, [(1, 2)])
        torch.testing.assert_close(got, head_vectors(local, means, [(1, 2)]), atol=0.1, rtol=0.05)
        logits = logits_conditions(remote_model.using(NDIF()), [Condition(PROMPTS[:1], Steer(fv, distributed=True)),
                                                  Condition(PROMPTS[:1], Steer(fv))])
        assert all(x.dtype == torch.float32 and torch.isfinite(x).all() for x in logits)
        fit_function_vector(remote_model.using(NDIF()), prepared, means, aie, k=2, n_prompts=4)
        generate_many(remote_model.using(NDIF()), [(PROMPTS[0], Steer(fv))], max_new_tokens=2)
        assert srv.n_requests == 4 and all(j.status == "COMPLETED" for j in srv.jobs)


def test_check_shippable_refuses_project_objects(fv):
    from fv_remote.traces.patching import apply_edits

    R.check_shippable(work=[(["a"], [("residual", None, False, fv.vector, 1.0)])], helper=apply_edits)
    with pytest.raises(UserError, match=r"work\[0\]\[1\] is a fv_remote.fv.steering.Steer"):
        R.check_shippable(work=[(["a"], Steer(fv))])
    with pytest.raises(UserError, match="FunctionVector"):
        R.check_shippable(vectors={"fv": fv})


# -- the CLI -----------------------------------------------------------------------------------------------------

def _cli(*args: str):
    from fv_remote.cli.app import _register, app

    _register()
    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    (folder / "toy.json").write_text(json.dumps([{"input": a, "output": b} for a, b in PAIRS]))
    return str(folder)


@pytest.fixture(scope="module")
def fv_file(fv, tmp_path_factory):
    return str(fv.save(tmp_path_factory.mktemp("fv") / "toy.fv.safetensors"))


def test_cli_steer_generate_evaluate(local, fv, fv_file, toy_dir, ndif, tmp_path):
    result = _cli("steer", "--fv", fv_file, "--prompt", PROMPTS[0], "--model", REPO, "--remote")
    assert result.exit_code == 0, result.output
    assert ndif.n_requests == 1
    ndif.reset()
    result = _cli("generate", "--fv", fv_file, "--prompt", "Q: hot\\nA:", "--model", REPO, "--remote",
                  "--max-new-tokens", "3")
    assert result.exit_code == 0, result.output
    want = generate_many(local, [(PROMPTS[0], None), (PROMPTS[0], Steer(fv))], max_new_tokens=3)
    assert repr(want[0]) in result.output and repr(want[1]) in result.output
    assert ndif.n_requests == 1
    ndif.reset()
    out = tmp_path / "eval.json"
    result = _cli("evaluate", "--fv", fv_file, "--model", REPO, "--remote", "--data-dir", toy_dir, "--n-test", "6",
                  "--n-shots", "2", "--sweep", "--plot", str(tmp_path / "sweep.png"), "--json", str(out))
    assert result.exit_code == 0, result.output
    assert ndif.n_requests == 1
    data = json.loads(out.read_text())
    prepared = prepare_task(local.tokenizer, TASK, seed=0, min_pairs=4)
    want_scores, want_sweep = evaluate_and_sweep(local, prepared, fv, n_test=6, n_shots=2)
    assert data["results"] == [want_scores.as_json()]
    assert data["sweep"] == {str(k): v for k, v in want_sweep.items()}
    SIZES["CLI evaluate --sweep (6 test, 2-shot)"] = (ndif.jobs[0].payload_bytes, ndif.jobs[0].result_bytes)
    # The same with --no-wait: nothing written until `jobs fetch`, then the same JSON.
    later = tmp_path / "later.json"
    result = _cli("evaluate", "--fv", fv_file, "--model", REPO, "--remote", "--no-wait", "--data-dir", toy_dir,
                  "--n-test", "6", "--n-shots", "2", "--sweep", "--plot", str(tmp_path / "s2.png"), "--json", str(later))
    assert result.exit_code == 0, result.output
    assert not later.exists() and ndif.n_requests == 2
    _wait_done(ndif)
    result = _cli("jobs", "fetch", ndif.jobs[-1].id)
    assert result.exit_code == 0, result.output
    assert json.loads(later.read_text()) == data and (tmp_path / "s2.png").exists()


def test_cli_fit_and_failure_keeps_the_old_file(local, toy_dir, ndif, tmp_path):
    from fv_remote.fv.cma import run_cma
    from fv_remote.fv.extract import extract, mean_heads_tensor
    from fv_remote.store.activations import ActivationStore

    store = ActivationStore(str(tmp_path / "s.zarr"))
    extract(local, TASK, store, n_prompts=4, n_shots=2, batch_size=4)
    zarr.open_group(store.url, mode="r+", path="toy")["correct"][:] = True  # a random model gets none right
    prepared = prepare_task(local.tokenizer, TASK, seed=0, min_pairs=4)
    run_cma(local, prepared, store, mean_heads_tensor(store, "toy"), n_prompts=2, n_shots=2)
    target = tmp_path / "toy.fv.safetensors"
    args = ("fit", "--task", "toy", "--store", store.url, "--model", REPO, "--remote", "--data-dir", toy_dir,
            "--k", "3", "--out", str(target), "--plot", str(tmp_path / "sweep.png"))
    result = _cli(*args)
    assert result.exit_code == 0, result.output
    assert ndif.n_requests == 1
    from fv_remote.fv.cma import load_aie

    want, _ = fit_function_vector(local, prepared, mean_heads_tensor(store, "toy"), load_aie(store, "toy"), k=3)
    got = FunctionVector.load(target)
    torch.testing.assert_close(got.vector, want.vector, atol=TOL, rtol=0)
    assert (got.layer, got.heads) == (want.layer, want.heads)
    before = target.read_bytes()
    ndif.fail = "error"
    result = _cli(*args[:-4], "--k", "2", *args[-4:])
    assert result.exit_code != 0 and isinstance(result.exception, UserError)
    assert ndif.jobs[-1].id in str(result.exception)
    assert target.read_bytes() == before  # the failed stage wrote nothing


# -- --no-wait and `fv-remote jobs` --------------------------------------------------------------------------------

def _wait_done(ndif, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while ndif.jobs[-1].status not in ("COMPLETED", "ERROR") and time.monotonic() < deadline:
        time.sleep(0.05)


def test_no_wait_extract_then_fetch(local, toy_dir, ndif, tmp_path):
    from fv_remote.fv.extract import extract
    from fv_remote.store.activations import ActivationStore

    want = ActivationStore(str(tmp_path / "local.zarr"))
    extract(local, TASK, want, n_prompts=6, n_shots=2, batch_size=4)
    url = str(tmp_path / "remote.zarr")
    args = ("extract", "--task", "toy", "--data-dir", toy_dir, "--store", url, "--model", REPO, "--n-prompts", "6",
            "--n-shots", "2", "--batch-size", "4", "--remote", "--no-wait")
    result = _cli(*args)
    assert result.exit_code == 0, result.output
    job_id = ndif.jobs[0].id
    assert f"job {job_id}" in result.output.splitlines()  # its own line: scripts read it (no status line before)
    assert ActivationStore(url).n_complete("toy") == 0  # nothing stored before the fetch
    assert json.loads((tmp_path / "jobs" / f"{job_id}.json").read_text())["plan"]["starts"] == [0, 4]
    _wait_done(ndif)
    result = _cli("jobs", "status", job_id)
    assert result.exit_code == 0 and "COMPLETED" in result.output, result.output
    result = _cli("jobs", "fetch", job_id)
    assert result.exit_code == 0, result.output
    got = ActivationStore(url)
    assert got.n_complete("toy") == 6
    a, b = want.open("toy"), got.open("toy")
    assert np.abs(a["head_out"].values - b["head_out"].values).max() <= TOL
    assert np.abs(a["answer_prob"].values - b["answer_prob"].values).max() <= TOL
    for name in ("top1_token", "answer_token", "text", "correct"):
        assert (a[name].values == b[name].values).all(), name
    assert got.attrs("toy")["n_complete"] == 6
    SIZES["extract --no-wait (6 prompts, 2 batches)"] = (ndif.jobs[0].payload_bytes, ndif.jobs[0].result_bytes)
    # Fetching again stores nothing twice, and polling never submits.
    result = _cli("jobs", "fetch", job_id)
    assert result.exit_code == 0 and "already fetched" in result.output
    assert _cli("jobs", "status", job_id).output.count("FETCHED") == 1
    assert got.n_complete("toy") == 6 and ndif.n_requests == 1
    assert job_id in _cli("jobs", "list").output


def test_no_wait_failed_job_and_pending_job(toy_dir, ndif, tmp_path):
    from fv_remote.store.activations import ActivationStore

    url = str(tmp_path / "remote.zarr")
    args = ("extract", "--task", "toy", "--data-dir", toy_dir, "--store", url, "--model", REPO, "--n-prompts", "4",
            "--n-shots", "2", "--remote", "--no-wait")
    ndif.fail = "hang"
    result = _cli(*args)
    assert result.exit_code == 0, result.output
    pending = ndif.jobs[-1].id
    result = _cli("jobs", "fetch", pending)
    assert result.exit_code == 1 and "fetch it again later" in result.output
    ndif.fail = "error"
    result = _cli(*args)
    failed = ndif.jobs[-1].id
    _wait_done(ndif)
    result = _cli("jobs", "fetch", failed)
    assert result.exit_code != 0 and isinstance(result.exception, UserError)
    assert failed in str(result.exception) and "simulated server error" in str(result.exception)
    assert ActivationStore(url).n_complete("toy") == 0
    result = _cli("jobs", "status", "no-such-job")
    assert isinstance(result.exception, UserError) and "no job file" in str(result.exception)
    result = _cli("extract", "--task", "toy", "--data-dir", toy_dir, "--store", url, "--no-wait")
    assert isinstance(result.exception, UserError) and "--remote" in str(result.exception)
