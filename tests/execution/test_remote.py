"""Remote execution, offline: nnsight's in-process dry run (remote="local") and a loopback NDIF server.

The client side is what a user of a hosted model has: a weightless (meta) copy of the architecture built from a
cached config and tokenizer. The loopback server holds the real (tiny, random) weights and executes each request with
nnsight's own server-side deserialisation, so these tests drive nnsight's real RemoteBackend end to end.
"""

from __future__ import annotations

import os
import socket

import nnsight
import pytest
import torch

from conftest import make_tiny_model
from support.remote_fixtures import serve_copy, write_hub_cache

from fv_remote import execution as R
from fv_remote.core.errors import UserError
from fv_remote.fv.extract import trace_heads, trace_heads_batches
from fv_remote.execution import DryRun, NDIF

REPO = "test-org/tiny-llama"
TEXTS = ["Q: hot\nA: cold\n\nQ: up\nA: down\n\nQ: big\nA:", "Q: up\nA:", "the quick brown fox"]
ANSWERS = [7, 11, 13]
SIZES: dict[str, tuple[int, int]] = {}  # stage -> (payload bytes, result bytes), printed at the end


@pytest.fixture(scope="module")
def local_model(tiny_tokenizer):
    return make_tiny_model("llama", tiny_tokenizer)


@pytest.fixture(scope="module")
def hub_cache(local_model, tiny_tokenizer, tmp_path_factory):
    """A Hugging Face cache holding only REPO's config and tokenizer (what a remote user downloads; no weights)."""
    return write_hub_cache(tmp_path_factory.mktemp("hf-cache"), REPO, local_model.hf, tiny_tokenizer)


@pytest.fixture(scope="module")
def server(local_model, tiny_tokenizer):
    with serve_copy(local_model, tiny_tokenizer, REPO, hang_s=1.5) as srv, pytest.MonkeyPatch.context() as mp:
        mp.setenv("NDIF_HOST", srv.host)
        mp.delenv("NDIF_API_KEY", raising=False)
        yield srv
    print("\nloopback NDIF sizes (payload bytes, result bytes):", SIZES)


@pytest.fixture
def ndif(server, monkeypatch):
    server.reset()
    server.exec_timeout = 60.0
    monkeypatch.setenv("NDIF_HOST", server.host)
    return server


@pytest.fixture(scope="module")
def remote_model(hub_cache):
    return R.load_remote_model(REPO, cache_dir=hub_cache)


def _assert_close(a: dict, b: dict, tol: float = 1e-4) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape, key
        assert torch.allclose(a[key].float(), b[key].float(), atol=tol, rtol=0), key


# -- the weightless client model ---------------------------------------------------------------------------------

def test_remote_model_is_weightless_and_keyed_by_repo(remote_model, local_model):
    assert all(p.device.type == "meta" for p in remote_model.hf.parameters())
    assert remote_model.adapter.describe() == local_model.adapter.describe()
    assert f'"repo_id": "{REPO}"' in remote_model.lm.to_model_key()  # no Hub lookup offline


def test_remote_model_without_config_is_a_clear_error(hub_cache):
    with pytest.raises(UserError, match="cannot get the config of 'test-org/not-cached'"):
        R.load_remote_model("test-org/not-cached", cache_dir=hub_cache)
    with pytest.raises(UserError, match="repo id"):
        R.load_remote_model("tiny-llama")


# -- results equal local ones ----------------------------------------------------------------------------------

def test_trace_heads_dry_run_matches_local(local_model):
    want = trace_heads(local_model, TEXTS, ANSWERS, positions=(-2, -1))
    got = trace_heads(local_model.using(DryRun()), TEXTS, ANSWERS, positions=(-2, -1))
    _assert_close(want, got)


def test_trace_heads_on_loopback_is_one_request_and_matches_local(local_model, remote_model, ndif):
    want = trace_heads(local_model, TEXTS, ANSWERS, positions=(-2, -1))
    executor = NDIF()
    got = trace_heads(remote_model.using(executor), TEXTS, ANSWERS, positions=(-2, -1))
    _assert_close(want, got)
    assert ndif.n_requests == 1
    job, record = ndif.jobs[0], executor.last  # the executor keeps a record per request it sent
    assert job.status == "COMPLETED" and record.job_id == job.id and len(executor.records) == 1
    assert record.payload_bytes == job.payload_bytes and record.result_bytes == job.result_bytes
    SIZES["trace_heads (3 prompts, 2 positions)"] = (job.payload_bytes, job.result_bytes)


def test_many_batches_are_one_request(local_model, remote_model, ndif):
    batches = [(TEXTS[:2], ANSWERS[:2]), (TEXTS[2:], ANSWERS[2:]), (TEXTS, ANSWERS)]
    want = [trace_heads(local_model, t, a) for t, a in batches]
    got = trace_heads_batches(remote_model.using(NDIF()), batches)
    assert len(got) == len(want)
    for w, g in zip(want, got):
        _assert_close(w, g)
    assert ndif.n_requests == 1
    SIZES["trace_heads_batches (3 batches)"] = (ndif.jobs[0].payload_bytes, ndif.jobs[0].result_bytes)


def test_extract_on_loopback_is_one_request_resumes_and_loses_nothing(local_model, remote_model, ndif, tmp_path):
    from fv_remote.data import load_task
    from fv_remote.fv.extract import extract
    from fv_remote.store.activations import ActivationStore

    task = load_task("antonym")
    kw = dict(n_shots=2, batch_size=3, seed=0)
    want = ActivationStore(str(tmp_path / "local.zarr"))
    extract(local_model, task, want, n_prompts=8, **kw)

    got = ActivationStore(str(tmp_path / "remote.zarr"))
    extract(remote_model.using(NDIF()), task, got, n_prompts=4, **kw)  # 2 batches, one request
    assert ndif.n_requests == 1
    ndif.fail = "error"
    with pytest.raises(UserError, match="failed on the server"):
        extract(remote_model.using(NDIF()), task, got, n_prompts=8, **kw)
    assert got.n_complete(task.name) == 4  # the failed request lost nothing already stored
    ndif.fail = None
    result = extract(remote_model.using(NDIF()), task, got, n_prompts=8, **kw)  # resumes at prompt 4
    assert result.n_new == 4 and got.n_complete(task.name) == 8
    assert ndif.n_requests == 3
    a, b = want.open(task.name), got.open(task.name)
    for name in ("head_out", "answer_prob"):
        assert abs(a[name].values - b[name].values).max() <= 1e-4, name
    for name in ("top1_token", "answer_token", "text"):
        assert (a[name].values == b[name].values).all(), name
    SIZES["extract (4 prompts, 2 batches)"] = (ndif.jobs[0].payload_bytes, ndif.jobs[0].result_bytes)


# -- the sandbox is real ---------------------------------------------------------------------------------------

def test_helpers_must_be_registered_to_ship(remote_model, ndif):
    """A helper from an installed package is pickled by reference; NDIF does not have fv_remote."""
    import cloudpickle

    names = R.register_traces()
    for name in names:
        cloudpickle.unregister_pickle_by_value(__import__(name, fromlist=["_"]))
    try:
        with pytest.raises(UserError, match=r"failed on the server: .*fv_remote") as info:
            trace_heads(remote_model.using(NDIF()), TEXTS[:1], ANSWERS[:1])
    finally:
        for name in names:
            cloudpickle.register_pickle_by_value(__import__(name, fromlist=["_"]))
    assert ndif.jobs[-1].id in str(info.value)


def _trace_importing_os(model, remote):
    site = model.adapter.head_site(model.lm, 0)
    with model.lm.trace("Q: up\nA:", **R.trace_options(model.using(R.resolve(remote)))):
        import os as forbidden

        width = nnsight.save(site.input.shape[-1] + len(forbidden.sep))
    return width


def test_forbidden_import_fails_on_server_but_not_in_dry_run(local_model, remote_model, ndif):
    # nnsight's dry run has no sandbox: the same trace passes there ...
    assert _trace_importing_os(local_model, "local") == local_model.adapter.head_width + len(os.sep)
    # ... and fails on the (loopback) server, whose import whitelist is NDIF's.
    with pytest.raises(UserError) as info:
        _trace_importing_os(remote_model, True)
    assert "Module os is not whitelisted" in str(info.value)
    assert ndif.jobs[-1].id in str(info.value)


def test_forbidden_module_in_payload_is_refused(remote_model, ndif):
    import subprocess

    lm = remote_model.lm
    with pytest.raises(UserError, match="subprocess is not whitelisted"):
        with lm.trace("Q: up\nA:", **R.trace_options(remote_model.using(R.NDIF()))):
            out = lm.output.logits.save()
            subprocess.run(["true"])
    assert ndif.n_requests == 1


# -- failures end with one clear line and the job id -----------------------------------------------------------

def test_server_error_names_the_job(remote_model, ndif):
    ndif.fail = "error"
    with pytest.raises(UserError) as info:
        trace_heads(remote_model.using(NDIF()), TEXTS, ANSWERS)
    message = str(info.value)
    assert ndif.jobs[0].id in message and "simulated server error" in message and "\n" not in message


def test_execution_timeout_names_the_job(remote_model, ndif):
    ndif.exec_timeout, ndif.delay_s = 0.2, 1.0
    with pytest.raises(UserError, match="execution timeout") as info:
        trace_heads(remote_model.using(NDIF()), TEXTS, ANSWERS)
    assert ndif.jobs[0].id in str(info.value)


def test_client_timeout_names_the_job(remote_model, ndif, monkeypatch):
    monkeypatch.setenv("FV_REMOTE_TIMEOUT", "0.5")
    ndif.fail = "hang"
    with pytest.raises(UserError, match=r"no result .* within 0\.5 s") as info:
        trace_heads(remote_model.using(NDIF()), TEXTS, ANSWERS)
    assert ndif.jobs[0].id in str(info.value)


def test_dropped_connection_names_the_job(remote_model, ndif):
    ndif.fail = "drop"
    with pytest.raises(UserError, match="dropped|closed") as info:
        trace_heads(remote_model.using(NDIF()), TEXTS, ANSWERS)
    assert ndif.jobs[0].id in str(info.value)


def test_api_key_is_sent_and_a_refusal_is_clear(remote_model, ndif, monkeypatch):
    ndif.api_key = "secret"
    try:
        with pytest.raises(UserError, match="refused the request: Missing or invalid NDIF API key"):
            trace_heads(remote_model.using(NDIF()), TEXTS[:1], ANSWERS[:1])
        monkeypatch.setenv("NDIF_API_KEY", "secret")
        assert R.api_key() == "secret"
        trace_heads(remote_model.using(NDIF()), TEXTS[:1], ANSWERS[:1])
        assert ndif.jobs[-1].status == "COMPLETED"
    finally:
        ndif.api_key = None


def test_unreachable_host_is_a_clear_error(remote_model, monkeypatch):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("NDIF_HOST", f"http://127.0.0.1:{port}")
    with pytest.raises(UserError, match="cannot reach NDIF"):
        trace_heads(remote_model.using(NDIF()), TEXTS[:1], ANSWERS[:1])
    with pytest.raises(UserError, match="cannot reach NDIF"):
        R.status()
    monkeypatch.setenv("NDIF_HOST", "ndif.example")
    with pytest.raises(UserError, match="http"):
        R.host()


def test_bad_remote_value():
    with pytest.raises(UserError, match="remote must be"):
        R.resolve("yes")


# -- status and version check ----------------------------------------------------------------------------------

@pytest.mark.parametrize("style", ["ndif-0.1.2", "complete"])
def test_status_lists_hosted_models(ndif, style):
    """ndif 0.1.2 + nnsight 0.8.1 report a served model as COLD without details, beside a RUNNING replica entry:
    the model is running (with a note saying what is unknown); a server with details is read as before."""
    ndif.status_style = style
    try:
        state = R.status()
    finally:
        ndif.status_style = "ndif-0.1.2"
    assert [m["repo_id"] for m in state.models] == [REPO]
    assert state.running(REPO) and not state.running("meta-llama/Llama-3.1-70B")
    (entry,) = state.models
    assert entry["task"] == "text-generation"
    if style == "complete":
        assert entry["level"] == "HOT" and not entry["note"]
    else:
        assert entry["level"] == "COLD" and entry["replicas"] == 1 and "without details" in entry["note"]


def test_check_versions(ndif):
    result = R.check()
    assert result.ok and "nnsight" in result.message
    ndif.env_override = {"nnsight": "0.7.3"}
    try:
        result = R.check()
        assert not result.ok and "0.7.3" in result.message and "\n" not in result.message
    finally:
        ndif.env_override = {}


def test_cli_status_and_check(ndif):
    from typer.testing import CliRunner

    from fv_remote.cli.app import _register, app

    _register()
    runner = CliRunner()
    result = runner.invoke(app, ["remote", "status", "--model", REPO])
    assert result.exit_code == 0, result.output
    assert REPO in result.output and "running" in result.output
    result = runner.invoke(app, ["remote", "check"])
    assert result.exit_code == 0, result.output
    ndif.env_override = {"nnsight": "0.7.3"}
    try:
        result = runner.invoke(app, ["remote", "check"])
        assert result.exit_code != 0 and isinstance(result.exception, UserError)
        assert "0.7.3" in str(result.exception)
    finally:
        ndif.env_override = {}
