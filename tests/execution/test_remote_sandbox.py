"""The stages under NDIF's process sandbox, through the loopback server's emulation of it (tests/support/loopback_ndif.py):
untrusted requests (`FV_REMOTE_SANDBOX=1` puts `"trusted": false` in the envelope, or a `sandbox=True` server) run
with the runner's limits: no parameter can be read, every value crosses as a copy, no gradient crosses.

`fit` and `decode` project through the model's own modules inside a tiny trace (traces/projection.py), so they give
the local results sandboxed too; extract, cma and steer only read and write activations. The emulation itself is
checked: reading `.weight` fails, a module call outside a trace fails, and a gradient does not reach a vector the body
added to the residual stream.
"""

from __future__ import annotations

import copy

import nnsight
import numpy as np
import pytest
import torch

from support.loopback_ndif import LoopbackNDIF
from support.remote_fixtures import assert_same_decoding, hosted_model_fixtures, point_client_at, toy_vector_fixtures

from fv_remote import execution as R
from fv_remote.data import RelationTask
from fv_remote.relational.decode import decode_many
from fv_remote.core.errors import UserError
from fv_remote.fv.evaluate import fit_function_vector
from fv_remote.fv.steering import Condition, Steer, logits_conditions, score_conditions
from fv_remote.data.tasks import prepare_task
from fv_remote.traces.patching import add_to_residual
from fv_remote.fv.vectors import build_function_vector, head_vectors
from fv_remote.execution import NDIF, resolve

REPO = "test-org/tiny-llama-sandbox"
WORDS = ["hot", "cold", "up", "down", "big", "small", "the", "quick", "brown", "fox", "lazy", "dog", "over"]
PAIRS = [(a, b) for a in WORDS for b in WORDS if a != b][:60]
TASK = RelationTask("toy", PAIRS)
PROMPTS = ["Q: hot\nA:", "Q: the quick brown\nA:", "Q: up\nA: down\n\nQ: big\nA:"]
TOL = 1e-4


local, hub_cache, server, remote_model = hosted_model_fixtures(REPO, hang_s=1.0)


@pytest.fixture
def ndif(server, monkeypatch, hub_cache):
    """The loopback server, every request of the test sent as untrusted (sandboxed)."""
    monkeypatch.setenv("FV_REMOTE_SANDBOX", "1")
    return point_client_at(server, monkeypatch, hub_cache)


prepared, means_aie, fv = toy_vector_fixtures(TASK)


def _all_sandboxed(ndif, n: int) -> None:
    assert ndif.n_requests == n, f"{ndif.n_requests} requests"
    for job in ndif.jobs:
        assert job.status == "COMPLETED", (job.error, ndif.log[-1:])
        assert job.sandboxed


# -- fit and decode: no parameter read, same numbers ----------------------------------------------------------------

def test_head_vectors_sandboxed(local, remote_model, means_aie, ndif):
    means, _ = means_aie
    heads = [(2, 1), (0, 3), (1, 2), (0, 0)]  # out of forward order, two in one layer
    got = head_vectors(remote_model.using(NDIF()), means, heads)
    torch.testing.assert_close(got, head_vectors(local, means, heads), atol=TOL, rtol=0)
    _all_sandboxed(ndif, 1)


def test_fit_sandboxed(local, remote_model, means_aie, prepared, ndif):
    means, aie = means_aie
    want, want_sweep = fit_function_vector(local, prepared, means, aie, k=4, n_prompts=10, batch_size=5)
    got, got_sweep = fit_function_vector(remote_model.using(NDIF()), prepared, means, aie, k=4, n_prompts=10, batch_size=5)
    assert got_sweep == want_sweep and got.layer == want.layer and got.heads == want.heads
    torch.testing.assert_close(got.vector, want.vector, atol=TOL, rtol=0)
    torch.testing.assert_close(got.head_vectors, want.head_vectors, atol=TOL, rtol=0)
    no_sweep, _ = fit_function_vector(remote_model.using(NDIF()), prepared, means, aie, k=4, layer=1)
    torch.testing.assert_close(no_sweep.vector, want.vector, atol=TOL, rtol=0)
    _all_sandboxed(ndif, 2)


def test_decode_sandboxed(local, remote_model, ndif):
    gen = torch.Generator().manual_seed(5)
    named = [(name, 3 * torch.randn(local.adapter.d_model, generator=gen)) for name in ("a", "b", "c")]
    words = ["hot", "cold", "fox", "zzz"]
    want = decode_many(local, named, words, 8)
    got = decode_many(remote_model.using(NDIF()), named, words, 8)
    assert_same_decoding(got, want, TOL)
    _all_sandboxed(ndif, 1)


def test_bf16_sandboxed_server(local, remote_model, means_aie, tiny_tokenizer, hub_cache, monkeypatch):
    """A bf16 model behind a sandbox=True server: the projections compute in the activations' dtype."""
    from fv_remote.models.loading import wrap_model

    hosted = wrap_model(copy.deepcopy(local.hf).to(torch.bfloat16), tiny_tokenizer, name=REPO)
    means, _ = means_aie
    with LoopbackNDIF({REPO: hosted.lm}, hang_s=1.0, sandbox=True) as srv:
        point_client_at(srv, monkeypatch, hub_cache)
        monkeypatch.delenv("FV_REMOTE_SANDBOX", raising=False)  # the server sandboxes every request on its own
        heads = [(1, 2), (0, 1)]
        got = head_vectors(remote_model.using(NDIF()), means, heads)
        torch.testing.assert_close(got, head_vectors(local, means, heads), atol=0.1, rtol=0.05)
        named = [("fv", got.sum(0))]
        top = decode_many(remote_model.using(NDIF()), named, [], 5)[0].top
        assert all(np.isfinite(v) for _, v in top) and len(top) == 5
        assert srv.n_requests == 2 and all(j.status == "COMPLETED" and j.sandboxed for j in srv.jobs)


# -- the activation-only stages still work sandboxed ----------------------------------------------------------------

def test_extract_cma_steer_sandboxed(local, remote_model, means_aie, fv, prepared, ndif, tmp_path):
    from fv_remote.fv.cma import run_cma
    from fv_remote.fv.extract import extract
    from fv_remote.store.activations import ActivationStore

    stores = {}
    for name, model, remote in (("local", local, False), ("sandboxed", remote_model, True)):
        store = ActivationStore(str(tmp_path / f"{name}.zarr"))
        extract(model.using(resolve(remote)), TASK, store, n_prompts=6, n_shots=2, batch_size=4)
        stores[name] = store.open("toy")
    for var in ("head_out", "answer_prob"):
        np.testing.assert_allclose(stores["sandboxed"][var].values, stores["local"][var].values, atol=TOL, rtol=0)
    assert (stores["sandboxed"]["top1_token"].values == stores["local"]["top1_token"].values).all()

    means, _ = means_aie
    aie = {}
    for name, model, remote in (("local", local, False), ("sandboxed", remote_model, True)):
        store = ActivationStore(str(tmp_path / f"cma-{name}.zarr"))
        aie[name] = run_cma(model.using(resolve(remote)), prepared, store, means, n_prompts=2, n_shots=2).aie.values
    np.testing.assert_allclose(aie["sandboxed"], aie["local"], atol=TOL, rtol=0)

    prompts = prepared.prompts("test", 12, kind="zero_shot", n_shots=0)
    texts, ids = [p.text for p in prompts], prepared.ids(prompts)
    conditions = [Condition(texts, None, ids, 5), Condition(texts, Steer(fv), ids, 5)]
    assert score_conditions(remote_model.using(NDIF()), conditions) == score_conditions(local, conditions)
    steered = [Condition(PROMPTS), Condition(PROMPTS, Steer(fv, layer=2, scale=0.5), batch_size=2),
               Condition(PROMPTS[:1], Steer(fv, distributed=True))]
    want = logits_conditions(local, steered)
    got = logits_conditions(remote_model.using(NDIF()), steered)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=TOL, rtol=0)
    assert (want[1] - want[0]).abs().max() > 1e-3  # the steer did something, and did it sandboxed too
    _all_sandboxed(ndif, 4)


# -- the emulation is real -------------------------------------------------------------------------------------------

def _read_weight(model):
    site = model.adapter.head_site(model.lm, 0)
    with R.stage_session(model.using(R.NDIF())):
        total = site.weight.float().sum().item()
        total = nnsight.save(total)
    return total


def test_reading_a_weight_fails_only_sandboxed(local, remote_model, ndif, monkeypatch):
    want = float(local.adapter.head_site(local.hf, 0).weight.float().sum())
    with pytest.raises(UserError, match=r"AttributeError: 'Envoy' object \(nor its module\) has attribute 'weight'"):
        _read_weight(remote_model)
    assert ndif.jobs[-1].sandboxed
    monkeypatch.setenv("FV_REMOTE_SANDBOX", "0")  # trusted (the default with auth off): the model actor's weights
    assert _read_weight(remote_model) == pytest.approx(want, abs=1e-4)
    assert not ndif.jobs[-1].sandboxed
    monkeypatch.setattr(ndif, "sandbox", True)  # a server that sandboxes everything, whatever the envelope says
    with pytest.raises(UserError, match="has attribute 'weight'"):
        _read_weight(remote_model)
    assert ndif.jobs[-1].sandboxed


def test_module_call_outside_a_trace_fails_sandboxed(remote_model, ndif):
    """What `project_heads` used to do: call the head site in the session body, where the runner has no weights."""
    site, width = remote_model.adapter.head_site(remote_model.lm, 0), remote_model.adapter.head_width
    with pytest.raises(UserError, match="outside a trace"):
        with R.stage_session(remote_model.using(R.NDIF())):
            out = site(torch.zeros(1, width)).sum().item()
            out = nnsight.save(out)
    assert ndif.jobs[-1].sandboxed


def _add_and_backward(model):
    """A session that adds a trainable vector at layer 1 and back-propagates a loss of the logits: its gradient."""
    ad, lm = model.adapter, model.lm
    layer, unembed, is_tuple, d = ad.layer(lm, 1), ad.unembed(lm), ad.layer_output_is_tuple, ad.d_model
    ids = torch.tensor([[1, 2, 3, 4]])
    with R.stage_session(model.using(R.NDIF())):
        vector = torch.zeros(d, requires_grad=True)
        with lm.trace(input_ids=ids):
            add_to_residual(layer, is_tuple, vector)
            loss = unembed.output[:, -1].float().logsumexp(-1).sum()
        loss.backward()
        grad = vector.grad
        vector = loss = None
        grad = nnsight.save(grad)
    return grad


def test_gradient_does_not_cross_the_sandbox(remote_model, ndif, monkeypatch):
    assert _add_and_backward(remote_model) is None  # the body's backward only reached its copy of the logits
    assert ndif.jobs[-1].sandboxed and ndif.jobs[-1].status == "COMPLETED"
    monkeypatch.setenv("FV_REMOTE_SANDBOX", "0")
    grad = _add_and_backward(remote_model)
    assert grad is not None and grad.abs().max() > 0  # trusted: the graph runs through the model
    assert not ndif.jobs[-1].sandboxed


def test_ffv_session_refuses_when_sandboxed(remote_model, prepared, ndif):
    """FFV training in one session (`ffv_session.run_jobs`): sandboxed, the vector never gets a gradient, and the
    session says so instead of returning the untrained initial vector (what the real NDIF sandbox led to)."""
    from fv_remote.relational.ffv import FinetuneSettings, examples
    from fv_remote.relational.ffv_session import Plan, run_jobs

    plan = Plan(remote_model)
    s = FinetuneSettings(steps=2, lr=0.2, batch_size=4, eval_every=2, patience=4, l2=0.0)
    train = plan.data(examples(prepared, "train", 8), s.batch_size)
    plan.job(s, train, None, 1, torch.ones(remote_model.adapter.d_model))
    with pytest.raises(UserError, match="no gradient reached the steering vector"):
        run_jobs(remote_model.using(R.NDIF()), plan.datasets, plan.jobs)
    assert ndif.jobs[-1].sandboxed
